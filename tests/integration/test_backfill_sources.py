"""The backfill job's file and Kafka sources: a column mapping, the README's files example run as
written (JSON lines, every view kind), fail-fast messages naming the column, and Kafka offsets
lost to retention (exit code 4, or a logged gap with --allow-gap)."""

from __future__ import annotations

import json
import logging
import re
import shlex
from datetime import datetime, timedelta, timezone

from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from jobs import backfill as backfill_job
from pipelines.core.settings import PROJECT_ROOT
from tests.support import encode, transaction

FILE_SCHEMA = "acct string, ts timestamp, amt double, merchant_id string, balance_usd double"


def t(hhmm: str) -> datetime:
    return datetime.fromisoformat(f"2026-11-20T{hhmm}:00+00:00")


def run_job(conf_dir, *args: str) -> int:
    return backfill_job.main(["--env", "local", "--conf-dir", str(conf_dir), "--views", "account_velocity", *args])


def file_args(path, *extra: str) -> list[str]:
    return ["--from", "2026-11-20", "--to", "2026-11-21", "--source", "files", "--path", str(path),
            "--map", "account_id=acct", "--map", "event_time=ts", "--map", "amount_usd=amt", *extra]


def test_parquet_history_with_other_column_names_backfills_through_a_mapping(spark, isolated, tmp_path):
    settings = isolated()
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    rows = [("a", t("10:00"), 10.0, "m1", 90.0), ("a", t("10:30"), 20.0, "m2", 70.0), ("a", t("12:00"), 5.0, "m1", 65.0),
            ("b", t("23:59"), 1.0, "m1", 1.0)]
    spark.createDataFrame(rows, FILE_SCHEMA).write.parquet(str(tmp_path / "history"))

    assert run_job(conf_dir, *file_args(tmp_path / "history")) == 0

    table = spark.read.format("delta").load(settings.storage.feature_path("account_velocity"))
    got = sorted((r.account_id, r.event_time.strftime("%H:%M"), r.count_1h, r.sum_amount_usd_1h, r.count_1d,
                  r.approx_count_distinct_merchant_id_1d, r.last_balance_usd_1d, str(r.event_date)) for r in table.collect())
    assert got == [("a", "10:00", 1, 10.0, 1, 1, 90.0, "2026-11-20"), ("a", "10:30", 2, 30.0, 2, 2, 70.0, "2026-11-20"),
                   ("a", "12:00", 1, 5.0, 3, 2, 65.0, "2026-11-20"), ("b", "23:59", 1, 1.0, 1, 1, 1.0, "2026-11-20")]


def readme_files_example() -> list[str]:
    """The arguments of the README's ``fp-backfill ... --source files`` example, as written."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    (command,) = [c for c in re.findall(r"^fp-backfill .*?(?<!\\)$", readme, re.M | re.S) if "--source files" in c]
    return shlex.split(command.replace("\\\n", " "), comments=True)[1:]


def test_the_readmes_files_example_backfills_json_lines_into_every_view_kind(spark, isolated, tmp_path):
    settings = isolated()
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    args = readme_files_example()
    assert args[args.index("--format") + 1] == "json"
    history = tmp_path / "hist" / "tx"
    history.mkdir(parents=True)
    events = [("a", "2025-03-10T10:00:00Z", 10.0, "m1"), ("a", "2025-03-10T10:30:00Z", 20.0, "m1"),
              ("b", "2025-03-10T11:00:00Z", 5.0, "m1"), ("c", "2025-03-10T13:00:00Z", 1.0, "m2")]
    (history / "part-0.json").write_text("".join(
        json.dumps({"acct": acct, "ts": ts, "amount": amount, "merchant_id": merchant, "balance_usd": 100.0,
                    "merchant_category_code": "5411"}) + "\n" for acct, ts, amount, merchant in events))
    args[args.index("--path") + 1] = str(history)  # the one change: a local folder, not s3://hist/tx/

    assert backfill_job.main(["--env", "local", "--conf-dir", str(conf_dir), *args]) == 0

    def rows(view, *columns):
        table = spark.read.format("delta").load(settings.storage.feature_path(view))
        return sorted(tuple(str(v) if isinstance(v, datetime) else v for v in r) for r in table.select(*columns).collect())

    assert rows("account_velocity", "account_id", "event_time", "count_1h", "sum_amount_usd_1h") == [
        ("a", "2025-03-10 10:00:00", 1, 10.0), ("a", "2025-03-10 10:30:00", 2, 30.0),
        ("b", "2025-03-10 11:00:00", 1, 5.0), ("c", "2025-03-10 13:00:00", 1, 1.0)]
    # Closed windows only: the latest event (13:00) minus the 10-minute lateness closes those up to 12:50.
    hourly = rows("merchant_hourly", "merchant_id", "window_start", "count", "sum_amount_usd")
    assert ("m1", "2025-03-10 10:00:00", 2, 30.0) in hourly and ("m1", "2025-03-10 10:30:00", 2, 25.0) in hourly
    assert max(start for _, start, _, _ in hourly) == "2025-03-10 11:00:00"  # the last window holding b@11:00
    assert rows("account_sessions", "account_id", "session_start", "session_end", "sum_amount_usd") == [
        ("a", "2025-03-10 10:00:00", "2025-03-10 11:00:00", 30.0), ("b", "2025-03-10 11:00:00", "2025-03-10 11:30:00", 5.0)]


def test_a_missing_file_column_fails_fast_naming_it(spark, isolated, tmp_path, capsys):
    settings = isolated()
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    spark.createDataFrame([("a", t("10:00"), 10.0, "m1")], "acct string, ts timestamp, amt double, merchant_id string") \
        .write.parquet(str(tmp_path / "history"))
    assert run_job(conf_dir, *file_args(tmp_path / "history")) == 3
    assert "column balance_usd is missing from" in capsys.readouterr().err.splitlines()[-1]


def test_a_file_column_of_the_wrong_type_fails_fast_naming_it(spark, isolated, tmp_path, capsys):
    settings = isolated()
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    spark.createDataFrame([("a", t("10:00"), "10.0", "m1", 1.0)],
                          "acct string, ts timestamp, amt string, merchant_id string, balance_usd double") \
        .write.parquet(str(tmp_path / "history"))
    assert run_job(conf_dir, *file_args(tmp_path / "history")) == 3
    assert "column amount_usd (file column 'amt') is string, contract transactions needs double" in \
        capsys.readouterr().err.splitlines()[-1]


def test_csv_values_that_do_not_parse_fail_naming_the_column_and_an_example(spark, isolated, tmp_path, capsys):
    settings = isolated()
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "part.csv").write_text(
        "acct,ts,amt,merchant_id,balance_usd\na,2026-11-20T10:00:00Z,12.5,m1,1.0\na,2026-11-20T11:00:00Z,\"12,5\",m1,1.0\n")
    assert run_job(conf_dir, *file_args(tmp_path / "history", "--format", "csv")) == 3
    assert "1 rows with amount_usd (file column 'amt'): values that are not double (e.g. '12,5')" in \
        capsys.readouterr().err.splitlines()[-1]


def produce_transactions(settings, topic: str, count: int) -> None:
    producer = Producer(settings.kafka.client_properties())
    start = datetime.now(timezone.utc) - timedelta(hours=2)
    for i in range(count):
        event = transaction(transaction_id=f"tx-{i}", event_time=(start + timedelta(minutes=i)).isoformat())
        producer.produce(topic, value=encode(event), key=b"acct-1", partition=0)
    assert producer.flush(30) == 0


def test_offsets_deleted_by_retention_fail_clearly_unless_the_gap_is_allowed(spark, isolated, tmp_path, capsys, caplog):
    settings = isolated(partitions=1)
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    topic = settings.ingest.topics[0]
    produce_transactions(settings, topic, 20)
    # What retention does: the head of the partition is gone, offsets 0..9.
    admin = AdminClient(settings.kafka.client_properties())
    for future in admin.delete_records([TopicPartition(topic, 0, 10)]).values():
        future.result()
    today = datetime.now(timezone.utc).date()
    replay = ["--from", str(today - timedelta(days=1)), "--to", str(today + timedelta(days=1)), "--source", "kafka",
              "--starting-offsets", json.dumps({topic: {"0": 0}})]

    assert run_job(conf_dir, *replay) == 4
    reason = capsys.readouterr().err.splitlines()[-1]
    assert f"{topic} partition 0: offsets 0..9 are no longer in the topic" in reason and "--allow-gap" in reason

    # By time too: a start before every record resolves to the earliest offset left, 10, and
    # offsets 0..9 may have been at or after that time.
    by_time = [*replay[:-1], (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()]
    assert run_job(conf_dir, *by_time) == 4
    assert "partition 0: the requested start time resolves to the earliest offset 10" in capsys.readouterr().err

    with caplog.at_level(logging.WARNING):
        assert run_job(conf_dir, *replay, "--allow-gap") == 0
    assert f"{topic} partition 0" in caplog.text and "GAP of 10 records" in caplog.text
    assert spark.read.format("delta").load(settings.storage.feature_path("account_velocity")).count() == 10


def test_file_values_the_contract_forbids_fail_naming_the_column(spark, isolated, tmp_path, capsys):
    settings = isolated()
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    spark.createDataFrame([("a", t("10:00"), -5.0, "m1", 1.0)], FILE_SCHEMA).write.parquet(str(tmp_path / "history"))
    assert run_job(conf_dir, *file_args(tmp_path / "history")) == 3
    assert "1 rows with amount_usd (file column 'amt'): negative values (the contract forbids them) (e.g. '-5.0')" in \
        capsys.readouterr().err.splitlines()[-1]
