"""Running streaming queries as a job: until they end, a timeout, or SIGTERM/SIGINT, which stop
them between two micro-batches."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from pyspark.sql import DataFrame
from pyspark.sql.streaming import DataStreamWriter, StreamingQuery

from pipelines.core.delta import streaming_query_id
from pipelines.core.times import spark_interval

log = logging.getLogger(__name__)


def with_trigger(writer: DataStreamWriter, available_now: bool, interval: timedelta) -> DataStreamWriter:
    """``availableNow`` (what the source holds at start, in rate-limited batches, then stop) or
    a processing-time trigger of ``interval``."""
    if available_now:
        return writer.trigger(availableNow=True)
    return writer.trigger(processingTime=spark_interval(interval))


class BatchGate:
    """Lets a job stop its streaming queries between two micro-batches.

    Spark has no such stop: ``query.stop()`` interrupts the query wherever it is, and a query
    with a backlog is always inside a batch (the next starts as soon as one commits). So each
    ``foreachBatch`` handler runs through :meth:`wrap`: once :meth:`close` is called, a batch
    that starts holds before its handler writes anything, and :func:`stop_between_batches`
    stops each query when it is idle or held. The batch it was in has finished and committed;
    the held one (planned in the checkpoint, nothing written) runs again, with the same offsets,
    on the next start.
    """

    def __init__(self) -> None:
        self._closed = threading.Event()
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        """From now on every batch that starts holds before writing."""
        self._closed.set()

    def holds(self, query: StreamingQuery) -> bool:
        """Whether ``query`` is held at the gate (safe to stop: it has written nothing)."""
        with self._lock:
            return query.id in self._held

    def wrap(self, handler: Callable[[DataFrame, int], None]) -> Callable[[DataFrame, int], None]:
        """``handler`` behind the gate, for ``foreachBatch``."""

        def gated(batch: DataFrame, batch_id: int) -> None:
            if self._closed.is_set():
                self._hold(batch, batch_id)
            handler(batch, batch_id)

        return gated

    def _hold(self, batch: DataFrame, batch_id: int) -> None:
        spark = batch.sparkSession
        query_id = streaming_query_id(spark)
        with self._lock:
            self._held.add(query_id)
        log.info("query %s: batch %d held, not run: the job is stopping", query_id, batch_id)
        # Sleep in the JVM, on the query's own thread (PySpark pins a callback's calls to the
        # calling thread): query.stop() interrupts it and the sleep throws. Returning instead
        # would let Spark commit a batch nothing was written for.
        sleep = spark.sparkContext._jvm.java.lang.Thread.sleep
        try:
            while True:
                sleep(200)
        except Exception as error:  # noqa: BLE001 - Py4J's error for the JVM's InterruptedException
            if "java.lang.InterruptedException" not in str(error):
                raise
            # Spark ends a query as stopped, not failed, when stop() was called and the error a
            # foreachBatch call returns reads as an interrupted Py4J call. It matches that with
            # a backtracking regex: the Java stack trace would overflow its stack, so the error
            # it gets is this one line.
            raise HeldBatchInterrupted(f"{PY4J_INTERRUPTED}: batch {batch_id} held at the gate") from None
        finally:
            with self._lock:
                self._held.discard(query_id)


class HeldBatchInterrupted(Exception):
    """A batch held at a :class:`BatchGate` was interrupted by ``query.stop()`` (an expected stop:
    the Py4J server's error log of it is dropped)."""


#: What Spark's StreamExecution.isInterruptionException recognises in a Python error.
PY4J_INTERRUPTED = "py4j.protocol.Py4JJavaError: An error occurred while calling Thread.sleep: java.lang.InterruptedException"


class _DropHeldBatchErrors(logging.Filter):
    """Py4J's callback server logs every error a Python callback returns, with its traceback;
    a held batch's interruption is how a job stops, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], HeldBatchInterrupted))


logging.getLogger("py4j.clientserver").addFilter(_DropHeldBatchErrors())


def stop_between_batches(queries: Sequence[StreamingQuery], gate: BatchGate | None = None,
                         grace: float = 300.0) -> None:
    """Stop every query between two batches: close ``gate``, then stop each query when it is
    idle or held at the gate, waiting at most ``grace`` seconds in all for its current batch
    (after that it is interrupted: also safe, the batch is replayed exactly once on the next
    start). Without a gate a query is stopped when it is seen idle."""
    if gate is not None:
        gate.close()
    deadline = time.monotonic() + grace
    for query in queries:
        while (query.isActive and query.status["isTriggerActive"] and not (gate and gate.holds(query))
               and time.monotonic() < deadline):
            time.sleep(0.05)
        if query.isActive:
            query.stop()


def raise_failures(queries: Sequence[StreamingQuery]) -> None:
    """Wait for the queries to end and raise the first one's failure, if any."""
    for query in queries:
        query.awaitTermination()
    for query in queries:
        if query.exception() is not None:
            raise query.exception()


def run_queries(queries: list[StreamingQuery], timeout: float | None = None,
                restart: Callable[[StreamingQuery], StreamingQuery | None] | None = None,
                gate: BatchGate | None = None) -> None:
    """Block until every query has ended (``availableNow``), ``timeout`` seconds pass, or a
    SIGTERM/SIGINT arrives; then stop them between batches (``gate``: the one their handlers
    run through) and raise the first failure.

    ``restart(query)``, called for a query that failed, may return its replacement (started
    from the same checkpoint), which takes its place in ``queries``; None lets it fail."""
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the current batch", signum)
        stop_requested.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not stop_requested.is_set():
            for i, query in enumerate(queries):
                if restart is not None and not query.isActive and query.exception() is not None:
                    replacement = restart(query)
                    if replacement is not None:
                        queries[i] = replacement
            if not any(q.isActive for q in queries):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            for query in queries:
                query.awaitTermination(0.5)
        stop_between_batches(queries, gate)
        raise_failures(queries)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
