"""Running streaming queries as a job: until they end, a timeout, or SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from pyspark.sql.streaming import DataStreamWriter, StreamingQuery

from pipelines.core.times import spark_interval

log = logging.getLogger(__name__)


def with_trigger(writer: DataStreamWriter, available_now: bool, interval: timedelta) -> DataStreamWriter:
    """``availableNow`` (what the source holds at start, in rate-limited batches, then stop) or
    a processing-time trigger of ``interval``."""
    if available_now:
        return writer.trigger(availableNow=True)
    return writer.trigger(processingTime=spark_interval(interval))


def stop_gracefully(queries: Sequence[StreamingQuery], grace: float = 300.0) -> None:
    """Stop every query, each between two batches if it gets there within ``grace`` seconds
    (an interrupted batch is safe too: it is replayed, exactly once, on the next start)."""
    deadline = time.monotonic() + grace
    for query in queries:
        while query.isActive and query.status["isTriggerActive"] and time.monotonic() < deadline:
            time.sleep(0.2)
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
                restart: Callable[[StreamingQuery], StreamingQuery | None] | None = None) -> None:
    """Block until every query has ended (``availableNow``), ``timeout`` seconds pass, or a
    SIGTERM/SIGINT arrives; then stop them gracefully and raise the first failure.

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
        stop_gracefully(queries)
        raise_failures(queries)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
