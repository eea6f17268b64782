"""fp-monitor's reading of a streaming checkpoint and its measures' verdicts, on hand-written files;
its dead-letter rate and online p99 from hand-written Delta tables, its thresholds' validation, and
the report page of a hand-written history; the Prometheus metrics a batch's progress updates."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pyarrow as pa
import pytest
from deltalake import write_deltalake
from prometheus_client import REGISTRY

from pipelines.core.errors import ConfigError
from pipelines.core.prometheus import observe_progress
from pipelines.core.settings import PROJECT_ROOT, Settings, load_settings
from pipelines.monitor.check import (
    Measure,
    committed_offsets,
    dead_letter_measures,
    online_p99_measures,
    readable_path,
)
from pipelines.monitor.report import render_report
from tests.pages import PageOutline

CONF = PROJECT_ROOT / "conf"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)


def at(clock: str) -> datetime:
    """``HH:MM:SS`` on NOW's day, UTC."""
    return datetime.combine(NOW.date(), datetime.strptime(clock, "%H:%M:%S").time(), timezone.utc)


def settings_in(tmp_path, **monitoring) -> Settings:
    """The local settings (topics transactions and labels) with a lake under ``tmp_path``."""
    return load_settings("local", CONF, {"storage": {"root": str(tmp_path / "lake")}, "monitoring": monitoring})


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


# The ingest's tables, reduced to the columns fp-monitor reads (and one to tell rows apart).
BRONZE = pa.schema([("transaction_id", pa.string()), ("ingested_at", pa.timestamp("us", tz="UTC")),
                    ("event_date", pa.date32())])
DEAD_LETTERS = pa.schema([("kafka_topic", pa.string()), ("kafka_offset", pa.int64()), ("error_class", pa.string()),
                          ("failed_at", pa.timestamp("us", tz="UTC")), ("failed_date", pa.date32())])


def write_ingest_tables(settings: Settings) -> None:
    """In the 15 minutes up to NOW (11:45:00 to 12:00:00, both in): transactions 12 bronze rows
    and 4 dead letters (3 missing_field, 1 bad_json at exactly 11:45:00); labels no bronze row and
    2 dead letters. Before the window: 5 bronze rows and a bad_json of transactions."""
    def bronze(ids: range, moment: datetime) -> pa.Table:
        return pa.Table.from_pylist([{"transaction_id": f"t{i}", "ingested_at": moment, "event_date": moment.date()}
                                     for i in ids], schema=BRONZE)

    path = settings.storage.bronze_path("transactions")
    write_deltalake(path, bronze(range(5), at("11:44:59")), mode="append", partition_by=["event_date"])
    write_deltalake(path, bronze(range(5, 12), at("11:50:00")), mode="append", partition_by=["event_date"])
    write_deltalake(path, bronze(range(12, 17), at("11:59:59")), mode="append", partition_by=["event_date"])
    dead = [("transactions", 1, "missing_field", "11:46:00"), ("transactions", 2, "missing_field", "11:52:00"),
            ("transactions", 3, "missing_field", "11:59:00"), ("transactions", 4, "bad_json", "11:45:00"),
            ("transactions", 0, "bad_json", "11:44:59"), ("labels", 7, "bad_json", "11:58:00"),
            ("labels", 8, "bad_json", "11:58:30")]
    write_deltalake(settings.storage.dead_letter_path, pa.Table.from_pylist(
        [{"kafka_topic": topic, "kafka_offset": offset, "error_class": error_class, "failed_at": at(clock),
          "failed_date": NOW.date()} for topic, offset, error_class, clock in dead], schema=DEAD_LETTERS),
        mode="append", partition_by=["failed_date"])


def test_a_topic_whose_dead_letter_share_of_the_window_is_over_the_threshold_breaches_naming_each_error_class(tmp_path):
    settings = settings_in(tmp_path, max_dead_letter_rate=0.2, min_records_for_rate=10)
    write_ingest_tables(settings)
    (transactions,) = dead_letter_measures(settings, ["transactions"], NOW)
    # 4 dead letters of 12 + 4 records: 25% > 20%.
    assert transactions.breached and transactions.records == 16
    assert transactions.error_classes == {"missing_field": 3, "bad_json": 1}
    assert transactions.line() == ("BREACH dead_letter_rate transactions: 25.0% (threshold 20.0%); "
                                   "4 of 16 records in the last 15m: missing_field 3, bad_json 1")


def test_a_topic_with_fewer_records_in_the_window_than_the_minimum_is_shown_but_not_judged(tmp_path):
    settings = settings_in(tmp_path, max_dead_letter_rate=0.2, min_records_for_rate=10)
    write_ingest_tables(settings)
    (labels,) = dead_letter_measures(settings, ["labels"], NOW)
    # Both of its 2 records are dead letters: 100%, but 2 records are fewer than 10.
    assert not labels.breached and labels.value == 1.0 and labels.records == 2
    assert labels.line() == ("skip   dead_letter_rate labels: 100.0% (threshold 20.0%); 2 of 2 records in the "
                             "last 15m: bad_json 2; fewer than 10 records: not judged")


def test_a_topic_without_any_record_in_the_window_has_no_rate_and_no_breach(tmp_path):
    settings = settings_in(tmp_path, min_records_for_rate=1)
    (transactions,) = dead_letter_measures(settings, ["transactions"], NOW)  # no table at all
    assert math.isnan(transactions.value) and not transactions.breached and transactions.records == 0
    assert transactions.line() == ("skip   dead_letter_rate transactions: none (threshold 5.0%); 0 of 0 records in "
                                   "the last 15m; fewer than 1 records: not judged")


LIVE_METRICS = pa.schema([("query_name", pa.string()), ("interval_start", pa.timestamp("us", tz="UTC")),
                          ("interval_end", pa.timestamp("us", tz="UTC")), ("events", pa.int64()),
                          ("event_to_redis_p99", pa.float64())])
SCORING_METRICS = pa.schema([("interval_start", pa.timestamp("us", tz="UTC")),
                             ("interval_end", pa.timestamp("us", tz="UTC")), ("model_name", pa.string()),
                             ("scored", pa.int64()), ("p99_s", pa.float64())])


def test_the_latest_recent_interval_over_its_p99_objective_breaches_and_a_job_without_one_is_said_unmeasured(tmp_path):
    settings = settings_in(tmp_path)  # objectives: fp-live 1 s, fp-score scoring.latency_slo_p99 (2 s)
    write_deltalake(settings.storage.live_metrics_path, pa.Table.from_pylist([
        {"query_name": "live_transactions", "interval_start": at("11:59:30"), "interval_end": at("11:59:40"),
         "events": 500, "event_to_redis_p99": 0.4},
        {"query_name": "live_transactions", "interval_start": at("11:59:40"), "interval_end": at("11:59:50"),
         "events": 480, "event_to_redis_p99": 1.7},
        # labels' last interval ended 10 minutes ago (the window is 5): not measured.
        {"query_name": "live_labels", "interval_start": at("11:49:50"), "interval_end": at("11:50:00"),
         "events": 20, "event_to_redis_p99": 9.0},
    ], schema=LIVE_METRICS))
    write_deltalake(settings.storage.scoring_metrics_path, pa.Table.from_pylist([
        {"interval_start": at("11:59:20"), "interval_end": at("11:59:30"), "model_name": "fraud", "scored": 300,
         "p99_s": 0.44},
    ], schema=SCORING_METRICS))
    measures = online_p99_measures(settings, NOW)
    assert [m.line() for m in measures] == [
        "skip   online_p99 fp-live labels: none (threshold 1 s); no interval ended in the last 5m: not measured",
        "BREACH online_p99 fp-live transactions: 1.7 s (threshold 1 s); interval ended 2026-12-05T11:59:50+00:00, "
        "480 events",
        "ok     online_p99 fp-score fraud: 0.44 s (threshold 2 s); interval ended 2026-12-05T11:59:30+00:00, 300 events",
    ]
    assert [m.breached for m in measures] == [False, True, False]


def test_the_latest_interval_decides_and_one_without_an_event_is_not_measured_though_an_earlier_one_breached(tmp_path):
    settings = settings_in(tmp_path)
    write_deltalake(settings.storage.scoring_metrics_path, pa.Table.from_pylist([
        {"interval_start": at("11:57:00"), "interval_end": at("11:57:10"), "model_name": "fraud", "scored": 40,
         "p99_s": 3.5},
        {"interval_start": at("11:57:10"), "interval_end": at("11:57:20"), "model_name": "fraud", "scored": 0,
         "p99_s": None},
    ], schema=SCORING_METRICS))
    scorer = [m for m in online_p99_measures(settings, NOW) if m.subject.startswith("fp-score")]
    assert [(m.line(), m.breached) for m in scorer] == [
        ("skip   online_p99 fp-score fraud: none (threshold 2 s); interval ended 2026-12-05T11:57:20+00:00 without "
         "an event: not measured", False)]


def test_without_any_recorded_interval_each_online_job_gets_a_line_saying_it_was_not_measured(tmp_path):
    settings = settings_in(tmp_path, max_online_p99="500ms")
    lines = [m.line() for m in online_p99_measures(settings, NOW)]
    assert lines == [
        "skip   online_p99 fp-live labels: none (threshold 0.5 s); no interval ended in the last 5m: not measured",
        "skip   online_p99 fp-live transactions: none (threshold 0.5 s); no interval ended in the last 5m: not measured",
        "skip   online_p99 fp-score: none (threshold 0.5 s); no interval ended in the last 5m: not measured",
    ]


@pytest.mark.parametrize("key, value, reason", [
    ("dead_letter_window", "0s", "must be positive"),
    ("dead_letter_window", "a while", "is not a duration"),
    ("max_dead_letter_rate", 1.5, "is not a share in \\[0, 1\\)"),
    ("max_dead_letter_rate", -0.1, "is not a share in \\[0, 1\\)"),
    ("max_dead_letter_rate", "high", "is not a number"),
    ("min_records_for_rate", 0, "must be at least 1"),
    ("max_online_p99", "0s", "must be positive"),
    ("online_window", "0ms", "must be positive"),
    ("max_lag", -1, "must not be negative"),
])
def test_a_bad_monitoring_threshold_fails_loading_naming_its_key(tmp_path, key, value, reason):
    with pytest.raises(ConfigError, match=rf"monitoring\.{key}: .*{reason}"):
        settings_in(tmp_path, **{key: value})


def test_max_online_p99_unset_is_one_second_live_and_the_scorers_own_objective():
    defaults = load_settings("local", CONF, {"scoring": {"latency_slo_p99": "3s"}})
    assert defaults.monitoring.online_p99_threshold("live", defaults.scoring) == timedelta(seconds=1)
    assert defaults.monitoring.online_p99_threshold("score", defaults.scoring) == timedelta(seconds=3)
    both = load_settings("local", CONF, {"monitoring": {"max_online_p99": "250ms"}})
    assert both.monitoring.online_p99_threshold("live", both.scoring) == timedelta(milliseconds=250)
    assert both.monitoring.online_p99_threshold("score", both.scoring) == timedelta(milliseconds=250)


def history_row(clock: str, check: str, subject: str, value, threshold: float, breached: bool, detail: str = ""):
    return {"checked_at": at(clock), "check": check, "subject": subject, "value": value, "threshold": threshold,
            "breached": breached, "detail": detail}


def test_the_report_of_a_history_has_one_titled_labelled_plot_per_kind_of_measure_and_the_latest_breaches():
    rows = [
        history_row("11:00:00", "lag", "transactions", 10.0, 100.0, False),
        history_row("11:00:00", "lag", "labels", 0.0, 100.0, False),
        history_row("11:00:00", "staleness", "merchant_hourly", None, 900.0, True, "no feature row yet"),
        history_row("11:00:00", "dead_letter_rate", "transactions", 0.02, 0.05, False),
        history_row("11:05:00", "lag", "transactions", 250.0, 100.0, True, "partition 1: 200"),
        history_row("11:05:00", "lag", "labels", 0.0, 100.0, False),
        history_row("11:05:00", "staleness", "merchant_hourly", 120.0, 900.0, False),
        history_row("11:05:00", "dead_letter_rate", "transactions", 0.08, 0.05, True,
                    "12 of 150 records in the last 15m: missing_field 8, bad_json 4"),
        history_row("11:05:00", "online_p99", "fp-live transactions", 0.3, 1.0, False),
    ]
    page = PageOutline(render_report(rows, at("10:00:00"), at("11:10:00")))
    assert page.scripts == 0
    assert [p["check"] for p in page.plots] == ["lag", "staleness", "dead_letter_rate", "online_p99"]
    titles = [p["texts"]["plot-title"] for p in page.plots]
    assert titles == [["Lag per topic"], ["Staleness per view"], ["Dead-letter rate per topic"],
                      ["Online latency p99 per job"]]
    assert [p["texts"]["y-label"] for p in page.plots] == [
        ["records behind the broker"], ["seconds since the newest event"],
        ["dead letters, % of the window's records"], ["p99 of the latest interval (s)"]]
    assert all(p["texts"]["x-label"] == ["time of the check (UTC)"] for p in page.plots)
    assert [p["texts"]["legend-entry"] for p in page.plots] == [
        ["labels", "transactions", "threshold 100 records"], ["merchant_hourly", "threshold 900 s"],
        ["transactions", "threshold 5.0%"], ["fp-live transactions", "threshold 1 s"]]
    # The latest check (11:05) breached the lag of transactions and the dead-letter rate; the
    # staleness breach of 11:00 is history.
    assert page.rows == [["check", "subject", "value", "threshold", "detail"],
                         ["lag", "transactions", "250 records", "100 records", "partition 1: 200"],
                         ["dead_letter_rate", "transactions", "8.0%", "5.0%",
                          "12 of 150 records in the last 15m: missing_field 8, bad_json 4"]]
    assert "Latest check: 2026-12-05T11:05:00+00:00, 2 breaches of 5 measures." in page.texts["p"]


def test_the_report_of_an_empty_history_says_there_is_no_recorded_check():
    page = PageOutline(render_report([], at("10:00:00"), at("11:00:00")))
    assert page.plots == [] and page.rows == []
    assert "There are no recorded checks in this window." in page.texts["p"]
