"""The ingest's per-batch metrics: the row each batch appends to ``ops/stream_metrics`` and its
log line (the listener that records them is :class:`pipelines.core.progress.ProgressListener`).

A process killed right after a batch commits loses that batch's row, never its data:
reconciliation then shows the gap as unaccounted records instead of hiding it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType, TimestampType

from pipelines.core.progress import offsets_behind_latest, operator_sum, parse_time, watermark_time
from pipelines.ingest.sinks import BatchResult, IngestBatchWriter

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


def metrics_row(progress: Any, topic: str | None, result: BatchResult | None) -> dict[str, Any]:
    """One metrics row from a ``StreamingQueryProgress`` and the batch's write result."""
    event_time = progress.eventTime or {}
    return {
        "query_name": progress.name or "",
        "query_id": str(progress.id),
        "run_id": str(progress.runId),
        "batch_id": int(progress.batchId),
        "topic": topic,
        "batch_timestamp": parse_time(progress.timestamp),
        "input_rows": int(progress.numInputRows),
        "input_rows_per_second": float(progress.inputRowsPerSecond or 0.0),
        "processed_rows_per_second": float(progress.processedRowsPerSecond or 0.0),
        "batch_duration_ms": int(progress.batchDuration),
        "offsets_behind_latest": offsets_behind_latest(progress),
        "watermark": watermark_time(event_time.get("watermark")),
        "max_event_time": parse_time(event_time.get("max")),
        "bronze_rows": result.bronze_rows if result else None,
        "dead_letter_rows": result.dead_letter_rows if result else None,
        "duplicates_dropped": operator_sum(
            progress, lambda op: (op.customMetrics or {}).get("numDroppedDuplicateRows")
        ),
        "dropped_by_watermark": operator_sum(progress, lambda op: op.numRowsDroppedByWatermark),
        "state_rows": operator_sum(progress, lambda op: op.numRowsTotal),
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
    handler: IngestBatchWriter
    table: str | None
    schema: StructType = METRICS_SCHEMA

    def row(self, progress: Any) -> dict[str, Any]:
        return metrics_row(progress, self.topic, self.handler.results.pop(int(progress.batchId), None))

    def line(self, row: Mapping[str, Any]) -> str:
        return format_progress(row)
