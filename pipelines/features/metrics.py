"""The feature views' per-batch metrics: the row each batch appends to ``ops/feature_metrics``
(rows, Redis writes, freshness) and its log line (recorded by
:class:`pipelines.core.progress.ProgressListener`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType, TimestampType

from pipelines.core.progress import operator_sum, parse_time, watermark_time
from pipelines.core.times import utc_assuming_local
from pipelines.features.sinks import FeatureBatchResult, FeatureBatchWriter

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


def feature_metrics_row(progress: Any, view: str, result: FeatureBatchResult | None) -> dict[str, Any]:
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
        newest = utc_assuming_local(newest)
    started = parse_time(progress.timestamp)
    ended = started + timedelta(milliseconds=int(progress.batchDuration)) if started else recorded_at
    return {
        "query_name": progress.name or "",
        "query_id": str(progress.id),
        "run_id": str(progress.runId),
        "batch_id": int(progress.batchId),
        "view": view,
        "batch_timestamp": parse_time(progress.timestamp),
        "input_rows": int(progress.numInputRows),
        "batch_duration_ms": int(progress.batchDuration),
        "feature_rows": result.rows if result else None,
        "online_written": online.written if online else None,
        "online_stale": online.stale if online else None,
        "newest_online_event_time": newest,
        "freshness_seconds": (ended - newest).total_seconds() if newest else None,
        "watermark": watermark_time((progress.eventTime or {}).get("watermark")),
        "dropped_by_watermark": operator_sum(progress, lambda op: op.numRowsDroppedByWatermark),
        "state_rows": operator_sum(progress, lambda op: op.numRowsTotal),
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
    handler: FeatureBatchWriter
    table: str | None
    schema: StructType = FEATURE_METRICS_SCHEMA

    def row(self, progress: Any) -> dict[str, Any]:
        return feature_metrics_row(progress, self.view, self.handler.results.pop(int(progress.batchId), None))

    def line(self, row: Mapping[str, Any]) -> str:
        return format_feature_progress(row)
