"""The per-batch metrics row and log line, from a progress event as Spark reports it."""

from __future__ import annotations

from datetime import datetime, timezone

from pyspark.sql.streaming.listener import StreamingQueryProgress

from pipelines.features.metrics import feature_metrics_row, format_feature_progress
from pipelines.features.sinks import FeatureBatchResult, OnlineResult
from pipelines.ingest.metrics import format_progress, metrics_row
from pipelines.ingest.sinks import BatchResult

PROGRESS = {
    "id": "7ad0c644-247d-4bcd-8bf7-d38aed49fbaa",
    "runId": "73e9e71a-0386-4c8e-99be-7ae39b95ced3",
    "name": "ingest_transactions",
    "timestamp": "2026-11-23T21:19:11.361Z",
    "batchId": 7,
    "batchDuration": 13422,
    "numInputRows": 250000,
    "inputRowsPerSecond": 20000.0,
    "processedRowsPerSecond": 18626.0,
    "durationMs": {"addBatch": 13254, "triggerExecution": 13422},
    "eventTime": {"watermark": "2026-11-16T20:45:49.000Z", "max": "2026-11-23T20:51:49.000Z"},
    "stateOperators": [{
        "operatorName": "dedupeWithinWatermark", "numRowsTotal": 495257, "numRowsUpdated": 247000,
        "allUpdatesTimeMs": 1, "numRowsRemoved": 0, "allRemovalsTimeMs": 0, "commitTimeMs": 1,
        "memoryUsedBytes": 1, "numRowsDroppedByWatermark": 0, "numShufflePartitions": 4,
        "numStateStoreInstances": 4, "customMetrics": {"numDroppedDuplicateRows": 2401},
    }],
    "sources": [{
        "description": "KafkaV2[Subscribe[transactions]]",
        "startOffset": {"transactions": {"0": 100, "1": 100}},
        "endOffset": {"transactions": {"0": 125100, "1": 125000}},
        "latestOffset": {"transactions": {"0": 380000, "1": 379948}},
        "numInputRows": 250000, "inputRowsPerSecond": 20000.0, "processedRowsPerSecond": 18626.0,
        "metrics": {},
    }],
    "sink": {"description": "ForeachBatchSink", "numOutputRows": -1},
}


def test_metrics_row_reads_every_figure_of_the_batch():
    row = metrics_row(StreamingQueryProgress.fromJson(PROGRESS), "transactions", BatchResult(242685, 4912, True))
    row.pop("recorded_at")
    assert row == {
        "query_name": "ingest_transactions",
        "query_id": "7ad0c644-247d-4bcd-8bf7-d38aed49fbaa",
        "run_id": "73e9e71a-0386-4c8e-99be-7ae39b95ced3",
        "batch_id": 7,
        "topic": "transactions",
        "batch_timestamp": datetime(2026, 11, 23, 21, 19, 11, 361000, tzinfo=timezone.utc),
        "input_rows": 250000,
        "input_rows_per_second": 20000.0,
        "processed_rows_per_second": 18626.0,
        "batch_duration_ms": 13422,
        "offsets_behind_latest": (380000 - 125100) + (379948 - 125000),
        "watermark": datetime(2026, 11, 16, 20, 45, 49, tzinfo=timezone.utc),
        "max_event_time": datetime(2026, 11, 23, 20, 51, 49, tzinfo=timezone.utc),
        "bronze_rows": 242685,
        "dead_letter_rows": 4912,
        "duplicates_dropped": 2401,
        "dropped_by_watermark": 0,
        "state_rows": 495257,
    }


def test_epoch_watermark_means_no_watermark_yet():
    first = dict(PROGRESS, eventTime={"watermark": "1970-01-01T00:00:00.000Z"})
    assert metrics_row(StreamingQueryProgress.fromJson(first), "transactions", None)["watermark"] is None


def test_progress_line_reads_in_one_glance():
    row = metrics_row(StreamingQueryProgress.fromJson(PROGRESS), "transactions", BatchResult(242685, 4912, True))
    assert format_progress(row) == (
        "ingest_transactions batch 7: 250,000 rows in 13.4s (18,626 rows/s), behind 509,848, "
        "watermark 2026-11-16 20:45:49, bronze 242,685, dlq 4,912, duplicates 2,401, state 495,257"
    )


def test_progress_line_shouts_when_the_watermark_dropped_rows():
    late = dict(PROGRESS, stateOperators=[dict(PROGRESS["stateOperators"][0], numRowsDroppedByWatermark=3)])
    line = format_progress(metrics_row(StreamingQueryProgress.fromJson(late), "transactions", None))
    assert line.endswith("bronze ?, dlq ?, duplicates 2,401, state 495,257, DROPPED BY WATERMARK 3")


def test_feature_progress_reports_freshness_of_the_online_store():
    progress = dict(PROGRESS, name="features_account_velocity", stateOperators=[dict(
        PROGRESS["stateOperators"][0], operatorName="transformWithStateInPandasExec", numRowsTotal=1200,
        customMetrics={})])
    newest = datetime(2026, 11, 23, 21, 19, 0, tzinfo=timezone.utc)
    row = feature_metrics_row(StreamingQueryProgress.fromJson(progress), "account_velocity",
                              FeatureBatchResult(250000, OnlineResult(900, 3, newest)))
    # The batch started 21:19:11.361 and took 13.422 s: it ended 24.783 s after the newest event.
    assert row["freshness_seconds"] == 24.783
    assert (row["feature_rows"], row["online_written"], row["online_stale"], row["state_rows"]) == (250000, 900, 3, 1200)
    line = format_feature_progress(dict(row, freshness_seconds=2.5))
    assert line == (
        "features_account_velocity batch 7: 250,000 rows in 13.4s, feature rows 250,000, online 900 written / "
        "3 stale, newest online event 2026-11-23 21:19:00 (2.5s old), watermark 2026-11-16 20:45:49, "
        "dropped by watermark 0, state 1,200"
    )
