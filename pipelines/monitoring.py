"""Per-batch progress of the ingest queries: one readable log line and one row in a Delta
metrics table per batch, from a ``StreamingQueryListener``.

The metrics rows are written idempotently (``txnAppId`` = ``metrics:<query id>``,
``txnVersion`` = batch id). The listener runs after a batch commits, so a process killed in
that instant loses that one batch's metrics row (never its data): reconciliation then shows
the gap as unaccounted records instead of hiding it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql.streaming import StreamingQueryListener
from pyspark.sql.types import (
    DoubleType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from pipelines.sinks import BatchResult, write_delta_idempotent

log = logging.getLogger("pipelines.progress")

METRICS_SCHEMA = StructType(
    [
        StructField("query_name", StringType(), False),
        StructField("query_id", StringType(), False),
        StructField("run_id", StringType(), False),
        StructField("batch_id", LongType(), False),
        StructField("topic", StringType(), True),
        StructField("batch_timestamp", TimestampType(), False),
        StructField("input_rows", LongType(), False),
        StructField("input_rows_per_second", DoubleType(), True),
        StructField("processed_rows_per_second", DoubleType(), True),
        StructField("batch_duration_ms", LongType(), False),
        StructField("offsets_behind_latest", LongType(), True),
        StructField("watermark", TimestampType(), True),
        StructField("max_event_time", TimestampType(), True),
        StructField("bronze_rows", LongType(), True),
        StructField("dead_letter_rows", LongType(), True),
        StructField("duplicates_dropped", LongType(), True),
        StructField("dropped_by_watermark", LongType(), True),
        StructField("state_rows", LongType(), True),
        StructField("recorded_at", TimestampType(), False),
    ]
)


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def _watermark(text: str | None) -> datetime | None:
    """Spark reports the epoch until a query has a watermark: that means "none yet"."""
    moment = _parse_time(text)
    return None if moment is None or moment.timestamp() == 0 else moment


def _offsets_total(offsets: Any) -> int | None:
    """Sum of a Kafka source offset JSON (``{"topic": {"0": 12, ...}}``) over partitions."""
    try:
        if isinstance(offsets, str):
            offsets = json.loads(offsets)
        return sum(int(o) for partitions in offsets.values() for o in partitions.values())
    except (ValueError, TypeError, AttributeError):  # absent or not a Kafka offset map
        return None


def offsets_behind_latest(progress: Any) -> int | None:
    """Records the query still has to read after this batch, over all its Kafka sources."""
    total = 0
    for source in progress.sources:
        end, latest = _offsets_total(source.endOffset), _offsets_total(source.latestOffset)
        if end is None or latest is None:
            return None
        total += latest - end
    return total


def metrics_row(progress: Any, topic: str | None, result: BatchResult | None) -> dict[str, Any]:
    """One metrics row from a ``StreamingQueryProgress`` and the batch's write result."""
    operators = progress.stateOperators or []
    event_time = progress.eventTime or {}

    def operator_sum(read: Callable[[Any], Any]) -> int | None:
        values = [read(op) for op in operators]
        values = [int(v) for v in values if v is not None]
        return sum(values) if values else None

    return {
        "query_name": progress.name or "",
        "query_id": str(progress.id),
        "run_id": str(progress.runId),
        "batch_id": int(progress.batchId),
        "topic": topic,
        "batch_timestamp": _parse_time(progress.timestamp),
        "input_rows": int(progress.numInputRows),
        "input_rows_per_second": float(progress.inputRowsPerSecond or 0.0),
        "processed_rows_per_second": float(progress.processedRowsPerSecond or 0.0),
        "batch_duration_ms": int(progress.batchDuration),
        "offsets_behind_latest": offsets_behind_latest(progress),
        "watermark": _watermark(event_time.get("watermark")),
        "max_event_time": _parse_time(event_time.get("max")),
        "bronze_rows": result.bronze_rows if result else None,
        "dead_letter_rows": result.dead_letter_rows if result else None,
        "duplicates_dropped": operator_sum(lambda op: (op.customMetrics or {}).get("numDroppedDuplicateRows")),
        "dropped_by_watermark": operator_sum(lambda op: op.numRowsDroppedByWatermark),
        "state_rows": operator_sum(lambda op: op.numRowsTotal),
        "recorded_at": datetime.now(timezone.utc),
    }


def format_progress(row: Mapping[str, Any]) -> str:
    """The one-line summary of a batch, for logs."""

    def n(key: str) -> str:
        return "?" if row.get(key) is None else f"{row[key]:,}"

    watermark = row["watermark"].strftime("%Y-%m-%d %H:%M:%S") if row["watermark"] else "-"
    line = (
        f"{row['query_name']} batch {row['batch_id']}: {row['input_rows']:,} rows in "
        f"{row['batch_duration_ms'] / 1000:.1f}s ({row['processed_rows_per_second']:,.0f} rows/s), "
        f"behind {n('offsets_behind_latest')}, watermark {watermark}, bronze {n('bronze_rows')}, "
        f"dlq {n('dead_letter_rows')}, duplicates {n('duplicates_dropped')}, state {n('state_rows')}"
    )
    if row.get("dropped_by_watermark"):
        line += f", DROPPED BY WATERMARK {row['dropped_by_watermark']:,}"
    return line


class IngestProgressListener(StreamingQueryListener):
    """Logs each batch of the registered queries and appends it to the metrics table."""

    def __init__(self, spark: SparkSession, metrics_path: str | None):
        self._spark = spark
        self.metrics_path = metrics_path
        #: query name -> (topic, handler whose results to read)
        self.queries: dict[str, tuple[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []
        self._recorded: dict[str, int] = {}
        self._lock = threading.Lock()

    def register(self, query_name: str, topic: str, handler: Any) -> None:
        self.queries[query_name] = (topic, handler)

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
        if event.name in self.queries:
            log.info("%s started (id %s, run %s)", event.name, event.id, event.runId)

    def onQueryProgress(self, event: Any) -> None:
        progress = event.progress
        if progress.name not in self.queries:
            return
        topic, handler = self.queries[progress.name]
        result = handler.results.pop(int(progress.batchId), None)
        try:
            row = metrics_row(progress, topic, result)
        except Exception:  # noqa: BLE001 - a malformed progress event must not stop the listener
            log.exception("could not read the progress of batch %s of %s: %s", progress.batchId, progress.name,
                          progress.json)
            return
        log.info(format_progress(row))
        log.debug("%s batch %s durations (ms): %s", progress.name, progress.batchId, progress.durationMs)
        with self._lock:
            self.rows.append(row)
        if self.metrics_path:
            try:
                frame = self._spark.createDataFrame([row], METRICS_SCHEMA)
                write_delta_idempotent(frame, self.metrics_path, f"metrics:{row['query_id']}", row["batch_id"])
            except Exception:  # noqa: BLE001 - metrics must never stop the data path
                log.exception("could not append batch %s of %s to the metrics table", row["batch_id"], row["query_name"])
        with self._lock:
            self._recorded[row["query_id"]] = max(self._recorded.get(row["query_id"], -1), row["batch_id"])

    def onQueryIdle(self, event: Any) -> None:
        pass

    def onQueryTerminated(self, event: Any) -> None:
        if event.exception:
            log.error("query %s failed: %s", event.id, event.exception)
        else:
            log.info("query %s stopped", event.id)
