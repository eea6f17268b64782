"""Per-batch progress of streaming queries, from a ``StreamingQueryListener``: one readable log
line and one row in a Delta metrics table per batch, for every query a job registers with a
reporter (the ingest's: :mod:`pipelines.ingest.metrics`; the feature views':
:mod:`pipelines.features.metrics`).

The metrics rows are written idempotently (``txnAppId`` = ``metrics:<query id>``,
``txnVersion`` = batch id). The listener runs after a batch commits, so a process killed in
that instant loses that one batch's metrics row (never its data).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from pyspark.sql import SparkSession
from pyspark.sql.streaming import StreamingQueryListener
from pyspark.sql.types import StructType

from pipelines.core.delta import write_delta_idempotent
from pipelines.core.prometheus import observe_progress, partition_offsets

log = logging.getLogger("pipelines.progress")


def parse_time(text: str | None) -> datetime | None:
    """A time of a progress event (ISO-8601, ``Z``) as an aware UTC datetime; None stays None."""
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def watermark_time(text: str | None) -> datetime | None:
    """Spark reports the epoch until a query has a watermark: that means "none yet"."""
    moment = parse_time(text)
    return None if moment is None or moment.timestamp() == 0 else moment


def _offsets_total(offsets: Any) -> int | None:
    """Sum of a Kafka source offset JSON (``{"topic": {"0": 12, ...}}``) over partitions."""
    by_partition = partition_offsets(offsets)
    return None if by_partition is None else sum(by_partition.values())


def offsets_behind_latest(progress: Any) -> int | None:
    """Records the query still has to read after this batch, over all its Kafka sources."""
    total = 0
    for source in progress.sources:
        end, latest = _offsets_total(source.endOffset), _offsets_total(source.latestOffset)
        if end is None or latest is None:
            return None
        total += latest - end
    return total


def operator_sum(progress: Any, read: Callable[[Any], Any]) -> int | None:
    """The sum of ``read(operator)`` over the progress's state operators (None when none reports it)."""
    values = [read(op) for op in (progress.stateOperators or [])]
    values = [int(v) for v in values if v is not None]
    return sum(values) if values else None


class Reporter(Protocol):
    """What a job registers per query: how a batch's progress becomes its metrics row and its log
    line, and the Delta table (None: log only) and schema the row goes to."""

    table: str | None
    schema: StructType

    def row(self, progress: Any) -> dict[str, Any]: ...

    def line(self, row: Mapping[str, Any]) -> str: ...


class ProgressListener(StreamingQueryListener):
    """Logs each batch of the registered queries and appends it to their metrics table."""

    def __init__(self, spark: SparkSession, restart_markers: Sequence[str] = ()):
        self._spark = spark
        #: Texts that mark a query failure as a planned restart (logged as such, not as an error).
        self.restart_markers = tuple(restart_markers)
        self.reporters: dict[str, Reporter] = {}
        self.rows: list[dict[str, Any]] = []
        self._recorded: dict[str, int] = {}
        self._lock = threading.Lock()

    def register(self, query_name: str, reporter: Reporter) -> None:
        self.reporters[query_name] = reporter

    def drain(self, queries: list[Any], timeout: float) -> None:
        """Wait until the last batch of each of ``queries`` has been recorded (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        for query in queries:
            # Idle triggers report progress too, under the next batch id, but no listener event
            # follows them: only batches that ran (they have an addBatch duration) are awaited.
            ran = [int(p.batchId) for p in query.recentProgress if "addBatch" in (p.durationMs or {})]
            if not ran:
                continue
            while time.monotonic() < deadline:
                with self._lock:
                    if self._recorded.get(str(query.id), -1) >= max(ran):
                        break
                time.sleep(0.1)

    def onQueryStarted(self, event: Any) -> None:
        if event.name in self.reporters:
            log.info("%s started (id %s, run %s)", event.name, event.id, event.runId)

    def onQueryProgress(self, event: Any) -> None:
        progress = event.progress
        reporter = self.reporters.get(progress.name)
        if reporter is None:
            return
        try:
            row = reporter.row(progress)
        except Exception:  # noqa: BLE001 - a malformed progress event must not stop the listener
            log.exception("could not read the progress of batch %s of %s: %s", progress.batchId, progress.name,
                          progress.json)
            return
        log.info(reporter.line(row))
        try:
            observe_progress(progress, row)
        except Exception:  # noqa: BLE001 - metrics must never stop the data path
            log.exception("could not export the metrics of batch %s of %s", progress.batchId, progress.name)
        log.debug("%s batch %s durations (ms): %s", progress.name, progress.batchId, progress.durationMs)
        with self._lock:
            self.rows.append(row)
        if reporter.table:
            try:
                frame = self._spark.createDataFrame([row], reporter.schema)
                write_delta_idempotent(frame, reporter.table, f"metrics:{row['query_id']}", row["batch_id"])
            except Exception:  # noqa: BLE001 - metrics must never stop the data path
                log.exception("could not append batch %s of %s to the metrics table", row["batch_id"], row["query_name"])
        with self._lock:
            self._recorded[row["query_id"]] = max(self._recorded.get(row["query_id"], -1), row["batch_id"])

    def onQueryIdle(self, event: Any) -> None:
        pass

    def onQueryTerminated(self, event: Any) -> None:
        if event.exception and any(marker in event.exception for marker in self.restart_markers):
            # Not a failure: the job restarts the query (e.g. to decode a newly registered schema).
            log.info("query %s stopped to be restarted: %s", event.id, event.exception.splitlines()[0])
        elif event.exception:
            log.error("query %s failed: %s", event.id, event.exception)
        else:
            log.info("query %s stopped", event.id)
