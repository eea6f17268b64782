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
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
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

from pipelines.online import as_utc
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


def _operator_sum(progress: Any, read: Callable[[Any], Any]) -> int | None:
    values = [read(op) for op in (progress.stateOperators or [])]
    values = [int(v) for v in values if v is not None]
    return sum(values) if values else None


def metrics_row(progress: Any, topic: str | None, result: BatchResult | None) -> dict[str, Any]:
    """One metrics row from a ``StreamingQueryProgress`` and the batch's write result."""
    event_time = progress.eventTime or {}
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
        "duplicates_dropped": _operator_sum(
            progress, lambda op: (op.customMetrics or {}).get("numDroppedDuplicateRows")
        ),
        "dropped_by_watermark": _operator_sum(progress, lambda op: op.numRowsDroppedByWatermark),
        "state_rows": _operator_sum(progress, lambda op: op.numRowsTotal),
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


@dataclass
class IngestReporter:
    """Turns an ingest query's progress into its metrics row and log line."""

    topic: str
    handler: Any
    table: str | None
    schema: StructType = METRICS_SCHEMA

    def row(self, progress: Any) -> dict[str, Any]:
        return metrics_row(progress, self.topic, self.handler.results.pop(int(progress.batchId), None))

    def line(self, row: Mapping[str, Any]) -> str:
        return format_progress(row)


FEATURE_METRICS_SCHEMA = StructType(
    [
        StructField("query_name", StringType(), False),
        StructField("query_id", StringType(), False),
        StructField("run_id", StringType(), False),
        StructField("batch_id", LongType(), False),
        StructField("view", StringType(), False),
        StructField("batch_timestamp", TimestampType(), False),
        StructField("input_rows", LongType(), False),
        StructField("batch_duration_ms", LongType(), False),
        StructField("feature_rows", LongType(), True),
        StructField("online_written", LongType(), True),
        StructField("online_stale", LongType(), True),
        StructField("newest_online_event_time", TimestampType(), True),
        StructField("freshness_seconds", DoubleType(), True),
        StructField("watermark", TimestampType(), True),
        StructField("dropped_by_watermark", LongType(), True),
        StructField("state_rows", LongType(), True),
        StructField("recorded_at", TimestampType(), False),
    ]
)


def feature_metrics_row(progress: Any, view: str, result: Any) -> dict[str, Any]:
    """One feature-metrics row: what the batch wrote, and how fresh Redis is after it.

    ``freshness_seconds`` = the batch's end (its start + ``batchDuration``) - the newest event
    time Redis accepted in it: the age of the freshest online value when it landed. Measured
    from the batch end, not from when the listener gets to the row, so a listener busy with
    other queries' rows does not make Redis look staler than it was.
    """
    recorded_at = datetime.now(timezone.utc)
    online = result.online if result else None
    newest = online.newest_event_time if online else None
    if newest is not None:
        newest = as_utc(newest)
    started = _parse_time(progress.timestamp)
    ended = started + timedelta(milliseconds=int(progress.batchDuration)) if started else recorded_at
    return {
        "query_name": progress.name or "",
        "query_id": str(progress.id),
        "run_id": str(progress.runId),
        "batch_id": int(progress.batchId),
        "view": view,
        "batch_timestamp": _parse_time(progress.timestamp),
        "input_rows": int(progress.numInputRows),
        "batch_duration_ms": int(progress.batchDuration),
        "feature_rows": result.rows if result else None,
        "online_written": online.written if online else None,
        "online_stale": online.stale if online else None,
        "newest_online_event_time": newest,
        "freshness_seconds": (ended - newest).total_seconds() if newest else None,
        "watermark": _watermark((progress.eventTime or {}).get("watermark")),
        "dropped_by_watermark": _operator_sum(progress, lambda op: op.numRowsDroppedByWatermark),
        "state_rows": _operator_sum(progress, lambda op: op.numRowsTotal),
        "recorded_at": recorded_at,
    }


def format_feature_progress(row: Mapping[str, Any]) -> str:
    def n(key: str) -> str:
        return "?" if row.get(key) is None else f"{row[key]:,}"

    newest = row["newest_online_event_time"]
    fresh = (f"newest online event {newest.strftime('%Y-%m-%d %H:%M:%S')} ({row['freshness_seconds']:,.1f}s old)"
             if newest else "nothing new online")
    watermark = row["watermark"].strftime("%Y-%m-%d %H:%M:%S") if row["watermark"] else "-"
    return (
        f"{row['query_name']} batch {row['batch_id']}: {row['input_rows']:,} rows in "
        f"{row['batch_duration_ms'] / 1000:.1f}s, feature rows {n('feature_rows')}, online {n('online_written')} "
        f"written / {n('online_stale')} stale, {fresh}, watermark {watermark}, "
        f"dropped by watermark {n('dropped_by_watermark')}, state {n('state_rows')}"
    )


@dataclass
class FeatureReporter:
    """Turns a feature query's progress into its metrics row and log line."""

    view: str
    handler: Any
    table: str | None
    schema: StructType = FEATURE_METRICS_SCHEMA

    def row(self, progress: Any) -> dict[str, Any]:
        return feature_metrics_row(progress, self.view, self.handler.results.pop(int(progress.batchId), None))

    def line(self, row: Mapping[str, Any]) -> str:
        return format_feature_progress(row)


class ProgressListener(StreamingQueryListener):
    """Logs each batch of the registered queries and appends it to their metrics table."""

    def __init__(self, spark: SparkSession):
        self._spark = spark
        #: query name -> reporter (``row(progress)``, ``line(row)``, ``table``, ``schema``)
        self.reporters: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self._recorded: dict[str, int] = {}
        self._lock = threading.Lock()

    def register(self, query_name: str, reporter: Any) -> None:
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
        from pipelines.avro_bronze import NEW_WRITER_SCHEMA_MARKER

        if event.exception and NEW_WRITER_SCHEMA_MARKER in event.exception:
            # Not a failure: the ingest restarts the query to decode a newly registered schema.
            log.info("query %s stopped for a new writer schema (it restarts)", event.id)
        elif event.exception:
            log.error("query %s failed: %s", event.id, event.exception)
        else:
            log.info("query %s stopped", event.id)
