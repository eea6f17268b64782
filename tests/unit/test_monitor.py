"""fp-monitor's reading of a streaming checkpoint and its measures' verdicts, on hand-written files;
the Prometheus metrics a batch's progress updates."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from types import SimpleNamespace

from prometheus_client import REGISTRY

from pipelines.core.prometheus import observe_progress
from pipelines.monitor.check import Measure, committed_offsets, readable_path


def write_batch(checkpoint, batch: int, offsets: str, committed: bool) -> None:
    (checkpoint / "offsets").mkdir(parents=True, exist_ok=True)
    (checkpoint / "commits").mkdir(parents=True, exist_ok=True)
    (checkpoint / "offsets" / str(batch)).write_text(
        'v1\n{"batchWatermarkMs":0,"batchTimestampMs":1796430000000,"conf":{}}\n' + offsets + "\n")
    if committed:
        (checkpoint / "commits" / str(batch)).write_text('v1\n{"nextBatchWatermarkMs":0}\n')


def test_the_committed_offsets_are_those_of_the_last_batch_with_a_commit(tmp_path):
    write_batch(tmp_path, 0, '{"tx":{"1":10,"0":12}}', committed=True)
    write_batch(tmp_path, 1, '{"tx":{"1":25,"0":30}}', committed=True)
    write_batch(tmp_path, 2, '{"tx":{"1":40,"0":41}}', committed=False)  # planned, cut short
    (tmp_path / "offsets" / ".3.0b8c-tmp.tmp").write_text("half")
    assert committed_offsets(str(tmp_path)) == {"tx": {0: 30, 1: 25}}


def test_a_checkpoint_without_a_committed_batch_has_no_offsets(tmp_path):
    assert committed_offsets(str(tmp_path / "never-started")) is None
    write_batch(tmp_path, 0, '{"tx":{"0":5}}', committed=False)
    assert committed_offsets(str(tmp_path)) is None


def test_a_measure_breaches_only_over_its_threshold_and_says_so():
    assert not Measure("lag", "tx", 20.0, 20.0, "records").breached
    over = Measure("lag", "tx", 21.0, 20.0, "records", "partition 0: 21")
    assert over.line() == "BREACH lag tx: 21 records (threshold 20 records); partition 0: 21"
    never = Measure("staleness", "v", math.inf, 60.0, "s", "no feature row yet")
    assert never.breached and never.line() == "BREACH staleness v: none yet (threshold 60 s); no feature row yet"


def test_dbfs_paths_are_read_through_the_fuse_mount_and_others_as_they_are():
    assert readable_path("dbfs:/feature-platform/prod/_checkpoints/ingest/tx") == "/dbfs/feature-platform/prod/_checkpoints/ingest/tx"
    assert readable_path("s3://bucket/lake") == "s3://bucket/lake" and readable_path("/tmp/lake") == "/tmp/lake"


def test_a_batch_updates_lag_per_partition_and_the_ingest_and_view_counters():
    progress = SimpleNamespace(
        name="ingest_tx_prom", id="q", numInputRows=40, batchDuration=1500,
        sources=[SimpleNamespace(endOffset='{"tx_prom":{"0":100,"1":50}}', latestOffset={"tx_prom": {"0": 130, "1": 50}})])
    row = {"batch_timestamp": datetime(2026, 12, 5, 1, 0, tzinfo=timezone.utc), "topic": "tx_prom",
           "bronze_rows": 37, "dead_letter_rows": 3}
    observe_progress(progress, row)
    observe_progress(progress, {**row, "bronze_rows": 10, "dead_letter_rows": 0})
    observe_progress(SimpleNamespace(name="features_v_prom", id="f", numInputRows=5, batchDuration=10, sources=[]),
                     {"view": "v_prom", "freshness_seconds": 4.5, "batch_timestamp": None})

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels)

    assert value("fp_kafka_lag_records", query="ingest_tx_prom", topic="tx_prom", partition="0") == 30
    assert value("fp_kafka_lag_records", query="ingest_tx_prom", topic="tx_prom", partition="1") == 0
    assert value("fp_batches_total", query="ingest_tx_prom") == 2
    assert value("fp_input_rows_total", query="ingest_tx_prom") == 80
    assert value("fp_batch_duration_seconds", query="ingest_tx_prom") == 1.5
    assert value("fp_last_batch_timestamp_seconds", query="ingest_tx_prom") == row["batch_timestamp"].timestamp()
    assert (value("fp_bronze_rows_total", topic="tx_prom"), value("fp_dead_letter_rows_total", topic="tx_prom")) == (47, 3)
    assert value("fp_view_freshness_seconds", view="v_prom") == 4.5
