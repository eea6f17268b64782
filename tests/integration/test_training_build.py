"""Training-set builds end to end on hand-made bronze and feature tables: the labeled spine and
its cutoff, the written table, what the MLflow run records, the leakage guard failing a build,
and a rebuild from the run id reproducing the content after the feature tables changed."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import mlflow
import pytest
from chispa import assert_df_equality

from jobs.build_training_set import main as build_job
from pipelines.batch.backfill import DayRange, backfill
from pipelines.batch.sources import FileSource
from pipelines.core.errors import ConfigError, SourceError
from pipelines.core.times import parse_instant
from pipelines.training import build as training_build
from pipelines.training.build import TrainingSetRequest, build_training_set, plain, rebuild_from_run
from pipelines.training.join import LeakageError, content_hash, view_request
from pipelines.training.reader import read_training_set
from pipelines.training.spines import SpineSpec, labeled_transactions

TRANSACTIONS = ("transaction_id string, account_id string, merchant_id string, amount_usd double, "
                "merchant_category_code string, balance_usd double, device_fingerprint string, event_time timestamp")
LABELS = "transaction_id string, account_id string, is_fraud boolean, label_time timestamp"
CUTOFF = "2026-11-22T00:00:00Z"


def t(text: str) -> datetime:
    return datetime.fromisoformat(text if " " in text else f"2026-11-20 {text}")


def tx(tid: str, account: str, merchant: str, when: str, amount: float) -> tuple:
    return (tid, account, merchant, amount, "5411", 100.0, "fp", t(when))


TX_ROWS = [tx("tx1", "a", "m1", "10:00", 10.0), tx("tx2", "a", "m1", "10:30", 20.0), tx("tx3", "b", "m2", "11:00", 5.0),
           tx("tx4", "a", "m2", "12:00", 7.0), tx("tx5", "c", "m1", "11:20", 8.0)]
LABEL_ROWS = [
    ("tx1", "a", True, t("2026-11-21 09:00")),
    ("tx2", "a", False, t("2026-11-23 09:00")),   # known only after the cutoff: tx2 is no example
    ("tx3", "b", False, t("2026-11-21 10:00")),
    ("tx3", "b", True, t("2026-11-23 10:00")),    # a later verdict, also after the cutoff: ignored
    ("tx5", "c", True, t("2026-11-21 12:00")),
]                                                  # tx4: never labeled


def bronze(spark, rows, schema, time_column):
    frame = spark.createDataFrame(rows, schema)
    return frame.selectExpr("*", "0 AS kafka_partition", "CAST(monotonically_increasing_id() AS BIGINT) AS kafka_offset",
                            f"to_date({time_column}) AS event_date")


@pytest.fixture
def tracked(isolated, tmp_path):
    """Isolated settings with the test's own MLflow store."""
    return isolated(mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow/mlflow.db",
                            "artifact_location": str(tmp_path / "mlflow" / "artifacts")})


@pytest.fixture
def lake(spark, tracked, tmp_path):
    """Settings with bronze tables for both topics and backfilled velocity / hourly tables."""
    settings = tracked
    tx_topic, label_topic = settings.ingest.topics
    bronze(spark, TX_ROWS, TRANSACTIONS, "event_time").write.format("delta").partitionBy("event_date").save(
        settings.storage.bronze_path(tx_topic))
    bronze(spark, LABEL_ROWS, LABELS, "label_time").write.format("delta").partitionBy("event_date").save(
        settings.storage.bronze_path(label_topic))
    spark.createDataFrame(TX_ROWS, TRANSACTIONS).write.parquet(str(tmp_path / "history"))
    backfill(spark, settings, [settings.views["account_velocity"], settings.views["merchant_hourly"]],
             [DayRange.parse("2026-11-20", "2026-11-21")], FileSource(str(tmp_path / "history")))
    return settings


def request(settings, **changes) -> TrainingSetRequest:
    views = (view_request(settings.views["account_velocity"], ["count_1h", "sum_amount_usd_1h"]),
             view_request(settings.views["merchant_hourly"], ["count"]))
    base = TrainingSetRequest(name="fraud", spine=SpineSpec("labeled-transactions", label_cutoff=CUTOFF), views=views)
    return TrainingSetRequest(**{**base.__dict__, **changes})


EXPECTED_SCHEMA = ("transaction_id string, account_id string, merchant_id string, event_time timestamp, "
                   "is_fraud boolean, label_time timestamp, account_velocity__count_1h long, "
                   "account_velocity__sum_amount_usd_1h double, merchant_hourly__event_time timestamp, "
                   "merchant_hourly__count long")
COLUMNS = [f.split()[0] for f in EXPECTED_SCHEMA.split(", ")]


def test_the_label_cutoff_is_utc_whatever_the_hosts_time_zone(spark, settings, monkeypatch):
    # pyspark turns a naive datetime into a timestamp with the host's zone: in Tokyo a naive
    # 09:00 cutoff would be 00:00 UTC and drop tx1's label, known at 09:00 UTC.
    transactions, labels = spark.createDataFrame(TX_ROWS, TRANSACTIONS), spark.createDataFrame(LABEL_ROWS, LABELS)
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # after the rows above were made (naive = UTC here)
    time.tzset()
    try:
        got = labeled_transactions(transactions, labels, settings.contracts["transactions"],
                                   settings.contracts["labels"], parse_instant("2026-11-21T09:00:00Z", "--label-cutoff"))
        assert [r.transaction_id for r in got.collect()] == ["tx1"]
    finally:
        monkeypatch.undo()
        time.tzset()


def test_labeled_transactions_keep_labels_known_at_the_cutoff_once_per_transaction(spark, settings):
    transactions = spark.createDataFrame(TX_ROWS + TX_ROWS[:1], TRANSACTIONS)  # tx1 delivered twice
    labels = spark.createDataFrame(LABEL_ROWS, LABELS)
    got = labeled_transactions(transactions, labels, settings.contracts["transactions"], settings.contracts["labels"],
                               t("2026-11-22 00:00"))
    expected = spark.createDataFrame(
        [(*TX_ROWS[0], True, t("2026-11-21 09:00")), (*TX_ROWS[2], False, t("2026-11-21 10:00")),
         (*TX_ROWS[4], True, t("2026-11-21 12:00"))], f"{TRANSACTIONS}, is_fraud boolean, label_time timestamp")
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)


def test_a_build_writes_the_point_in_time_rows_and_records_a_complete_mlflow_run(spark, lake):
    result = build_training_set(spark, lake, request(lake))

    table = spark.read.format("delta").load(result.path)
    # Hand-computed: account rows count themselves (1h trailing); merchant m1 at 11:20 takes the
    # [10:15, 11:15) window (only the 10:30 event); m1 at 10:00 and m2 at 11:00 have no closed window yet.
    expected = spark.createDataFrame([
        ("tx1", "a", "m1", t("10:00"), True, t("2026-11-21 09:00"), 1, 10.0, None, None),
        ("tx3", "b", "m2", t("11:00"), False, t("2026-11-21 10:00"), 1, 5.0, None, None),
        ("tx5", "c", "m1", t("11:20"), True, t("2026-11-21 12:00"), 1, 8.0, t("11:15"), 1),
    ], EXPECTED_SCHEMA)
    assert_df_equality(table.select(COLUMNS), expected, ignore_row_order=True, ignore_nullable=True)
    assert result.rows == 3 and result.content_hash == content_hash(table)

    run = mlflow.MlflowClient(lake.mlflow.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["mode"] == "as_corrected" and run.data.params["label_cutoff"] == CUTOFF
    assert run.data.params["max_age.merchant_hourly"] == "2h" and run.data.params["features.merchant_hourly"] == "count"
    assert run.data.tags["content_hash"] == result.content_hash
    assert run.data.tags["output_version"] == str(result.version)
    assert run.data.metrics["rows"] == 3 and run.data.metrics["merchant_hourly.match_rate"] == pytest.approx(1 / 3)
    inputs = {(i.dataset.name, i.tags[0].value): json.loads(i.dataset.source) for i in run.inputs.dataset_inputs}
    tx_topic, label_topic = lake.ingest.topics
    assert set(inputs) == {(tx_topic, "bronze"), (label_topic, "bronze"), ("account_velocity", "feature_table"),
                           ("merchant_hourly", "feature_table")}
    assert inputs[("account_velocity", "feature_table")]["delta_table_version"] == 0  # written once by the backfill
    artifacts = {a.path for a in mlflow.MlflowClient(lake.mlflow.tracking_uri).list_artifacts(result.run_id)}
    assert {"request.json", "resolved_config.json", "report.json", "inputs.json",
            "feature_distributions.png"} <= artifacts
    recorded = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/inputs.json")
    # Bronze rows behind the spine: all five transactions (offsets 0..4 as written), three known labels.
    assert recorded["kafka_offsets"][tx_topic]["0"]["rows"] == 5
    assert recorded["kafka_offsets"][label_topic]["0"]["rows"] == 3

    pandas_rows = read_training_set(result.path)
    assert sorted(pandas_rows["transaction_id"]) == ["tx1", "tx3", "tx5"]
    assert pandas_rows.set_index("transaction_id").loc["tx5", "merchant_hourly__count"] == 1
    assert str(pandas_rows["event_time"].dt.tz) == "UTC"


def test_the_leakage_guard_fails_the_build_before_anything_is_written(spark, lake, monkeypatch):
    def latest_whatever_its_time(spine, tables, requests, timestamp, mode):
        # A deliberately leaking join: each example takes its entity's newest row, even from later.
        (velocity,) = requests
        newest = tables["account_velocity"].groupBy("account_id").agg(
            __import__("pyspark.sql.functions", fromlist=["max"]).max("event_time").alias(velocity.event_time_output))
        return (spine.join(newest, "account_id", "left")
                .selectExpr("*", f"{velocity.event_time_output} AS {velocity.computed_at_output}", "1L AS account_velocity__count_1h"))

    monkeypatch.setattr(training_build, "point_in_time_join", latest_whatever_its_time)
    leaking = request(lake, views=(view_request(lake.views["account_velocity"], ["count_1h"]),))
    with pytest.raises(LeakageError, match="account_velocity: 1 rows joined a feature row from after their timestamp"):
        build_training_set(spark, lake, leaking)
    assert not Path(lake.storage.training_path("fraud")).exists()
    client = mlflow.MlflowClient(lake.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(lake.mlflow.experiment).experiment_id])
    assert run.info.status == "FAILED" and "content_hash" not in run.data.tags
    with pytest.raises(SourceError, match=f"run {run.info.run_id} is not a finished training-set build"):
        rebuild_from_run(spark, lake, run.info.run_id)


def test_a_build_refuses_to_overwrite_a_table_it_did_not_write(spark, lake):
    feature_table = lake.storage.feature_path("account_velocity")
    with pytest.raises(ConfigError, match=f"{feature_table} is a Delta table no training-set build wrote"):
        build_training_set(spark, lake, request(lake, output_path=feature_table))
    assert spark.sql(f"DESCRIBE HISTORY delta.`{feature_table}`").count() == 1


def test_a_rebuild_from_the_run_id_reproduces_the_content_after_new_feature_rows(spark, lake, isolated, tmp_path):
    first = build_training_set(spark, lake, request(lake))
    # New data after the build: a late correction of a's 10:00 row, and a new transaction row.
    velocity = lake.storage.feature_path("account_velocity")
    spark.sql(f"INSERT INTO delta.`{velocity}` (account_id, event_time, count_1h, sum_amount_usd_1h, computed_at, "
              f"event_date) VALUES ('a', TIMESTAMP'2026-11-20 10:00:00', 2, 30.0, current_timestamp(), DATE'2026-11-20'),"
              f" ('c', TIMESTAMP'2026-11-20 11:10:00', 1, 1.0, current_timestamp(), DATE'2026-11-20')")
    fresh = build_training_set(spark, lake, request(lake, name="fraud_fresh"))
    fresh_rows = spark.read.format("delta").load(fresh.path)
    assert fresh_rows.where("transaction_id = 'tx1'").first()["account_velocity__count_1h"] == 2
    assert fresh.content_hash != first.content_hash

    conf_dir = isolated.conf_dir(lake, tmp_path / "conf")
    code = build_job(["--env", "local", "--conf-dir", str(conf_dir), "--from-run", first.run_id])
    assert code == 0
    # Written beside the original, which keeps its one version.
    rebuilt = spark.read.format("delta").load(f"{first.path}_rebuilt_{first.run_id[:8]}")
    assert spark.sql(f"DESCRIBE HISTORY delta.`{first.path}`").count() == 1
    assert content_hash(rebuilt) == first.content_hash
    assert rebuilt.where("transaction_id = 'tx1'").first()["account_velocity__count_1h"] == 1
    client = mlflow.MlflowClient(lake.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(lake.mlflow.experiment).experiment_id],
                                f"tags.rebuilt_from = '{first.run_id}'")
    assert run.data.tags["content_hash"] == first.content_hash


def test_a_file_spine_keeps_rows_labeled_by_the_cutoff_and_its_rebuild_fails_once_the_files_changed(
        spark, lake, isolated, tmp_path, capsys):
    spine_path = str(tmp_path / "spine")
    spine_schema = "account_id string, ts timestamp, churned boolean, known_at timestamp"
    spark.createDataFrame([("a", t("10:15"), True, t("2026-11-21 00:00")), ("b", t("11:30"), False, t("2026-11-21 00:00")),
                           ("c", t("11:30"), True, t("2026-11-23 00:00"))], spine_schema).write.parquet(spine_path)
    conf_dir = isolated.conf_dir(lake, tmp_path / "conf")
    job = ["--env", "local", "--conf-dir", str(conf_dir)]
    assert build_job([*job, "--output", "churn", "--spine", "files", "--spine-path", spine_path, "--timestamp-column", "ts",
                      "--label-time-column", "known_at", "--label-cutoff", CUTOFF, "--views", "account_velocity",
                      "--features", "account_velocity.count_1h"]) == 0
    built = spark.read.format("delta").load(lake.storage.training_path("churn"))
    # c's label was known only after the cutoff; a at 10:15 sees its 10:00 row (count 1), b its 11:00 row.
    expected = spark.createDataFrame([("a", t("10:15"), True, t("2026-11-21 00:00"), 1),
                                      ("b", t("11:30"), False, t("2026-11-21 00:00"), 1)],
                                     f"{spine_schema}, account_velocity__count_1h long")
    assert_df_equality(built.drop("account_velocity__event_time", "account_velocity__computed_at"), expected,
                       ignore_row_order=True, ignore_nullable=True)
    client = mlflow.MlflowClient(lake.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(lake.mlflow.experiment).experiment_id])
    capsys.readouterr()

    spark.createDataFrame([("a", t("10:20"), True, t("2026-11-21 00:00"))], spine_schema).write.mode("overwrite").parquet(spine_path)
    assert build_job([*job, "--from-run", run.info.run_id, "--output-path", str(tmp_path / "again")]) == 1
    assert f"the spine files at {spine_path} changed since the run" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("arguments, code, message", [
    (["--output", "x"], 2, "--label-cutoff: required for the labeled-transactions spine"),
    (["--output", "x", "--label-cutoff", "yesterday"], 2, "--label-cutoff: 'yesterday' is not an ISO-8601 time"),
    (["--output", "x", "--label-cutoff", CUTOFF, "--features", "account_velocity.nope"], 2,
     "account_velocity has no feature nope"),
    (["--output", "x", "--label-cutoff", CUTOFF, "--views", "merchant_hourly", "--max-age", "account_velocity=1d"], 2,
     "--max-age: 'account_velocity' is not one of the requested views"),
    (["--from-run", "0123456789abcdef0123456789abcdef"], 3, "--from-run: no run 0123456789abcdef0123456789abcdef"),
    (["--from-run", "0123456789abcdef0123456789abcdef", "--views", "merchant_hourly", "--mode", "as_served"], 2,
     "--from-run: rebuilds exactly what the run built; do not also give --views, --mode"),
])
def test_the_job_fails_naming_the_flag(spark, tracked, isolated, tmp_path, capsys, arguments, code, message):
    conf_dir = isolated.conf_dir(tracked, tmp_path / "conf")
    assert build_job(["--env", "local", "--conf-dir", str(conf_dir), *arguments]) == code
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_build_without_its_feature_table_fails_naming_it(spark, tracked, isolated, tmp_path, capsys):
    conf_dir = isolated.conf_dir(tracked, tmp_path / "conf")
    code = build_job(["--env", "local", "--conf-dir", str(conf_dir), "--output", "x", "--label-cutoff", CUTOFF,
                      "--views", "account_sessions"])
    assert code == 3
    assert "feature table of account_sessions: no Delta table at" in capsys.readouterr().err.splitlines()[-1]



def test_secrets_are_masked_in_the_logged_configuration():
    logged = plain({"mlflow": {"tracking_uri": "https://user:s3cret@mlflow.example.com"},
                    "kafka": {"client": {"sasl.password": "hunter2", "sasl.username": "svc"},
                              "secret_env": {"sasl.password": "KAFKA_SASL_PASSWORD"}},
                    "redis": {"password_env": "REDIS_PASSWORD"}})
    assert logged["mlflow"]["tracking_uri"] == "https://***@mlflow.example.com"
    assert logged["kafka"]["client"] == {"sasl.password": "***", "sasl.username": "svc"}
    assert logged["redis"]["password_env"] == "REDIS_PASSWORD"
    assert "hunter2" not in json.dumps(logged) and "s3cret" not in json.dumps(logged)
