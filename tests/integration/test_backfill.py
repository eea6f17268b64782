"""Backfills on the real platform: re-running gives the same table content; narrower ranges touch
only their days; a bronze timestamp reads the bronze of that time; a Kafka replay dead-letters
each invalid record once. (A Kafka replay and a bronze backfill equal the stream under the
generator's default disorder: tests/integration/test_disorder.py.)"""

from __future__ import annotations

import hashlib
from datetime import datetime, time, timedelta, timezone

import pytest
from pyspark.sql import functions as F

from jobs import backfill as backfill_job
from pipelines.batch.backfill import DayRange, backfill
from pipelines.batch.sources import BronzeSnapshot, KafkaReplay
from pipelines.core.errors import SourceError
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from tests.support import topic_names


def crossing_midnight_spec(**changes) -> GeneratorSpec:
    """In-order events (none late or out of order) over 6 hours across yesterday's midnight."""
    midnight = datetime.combine(datetime.now(timezone.utc).date(), time(0), timezone.utc) - timedelta(days=1)
    base = dict(count=1200, accounts=30, merchants=12, seed=5, end=midnight + timedelta(hours=3),
                span=timedelta(hours=6), late_rate=0.0, out_of_order_rate=0.0, duplicate_rate=0.02,
                bad_rate=0.03, label_rate=0.4, label_delay=(timedelta(minutes=5), timedelta(hours=2)))
    return GeneratorSpec(**{**base, **changes})


def both_days(spec: GeneratorSpec) -> DayRange:
    return DayRange((spec.end - spec.span).date(), spec.end.date() + timedelta(days=1))


def latest_version(spark, path) -> int:
    return spark.sql(f"DESCRIBE HISTORY delta.`{path}` LIMIT 1").collect()[0]["version"]


def content_hash(spark, path, where: str = "true") -> str:
    """SHA-256 of the table's rows (``computed_at`` aside) in sorted order."""
    table = spark.read.format("delta").load(path).filter(where).drop("computed_at")
    columns = sorted(table.columns)
    rows = sorted(repr(tuple(r)) for r in table.select(*columns).collect())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def test_the_same_bronze_backfill_twice_leaves_identical_tables_and_a_narrower_one_only_its_days(spark, isolated):
    settings = isolated()
    spec = crossing_midnight_spec(count=600)
    produce(generate(spec), settings.kafka.client_properties(), topic_names=topic_names(settings))
    run_ingest(spark, settings, available_now=True)
    views = [settings.views["account_velocity"], settings.views["account_sessions"]]
    days = both_days(spec)
    first_day, second_day = (str(d) for d in days.days())

    backfill(spark, settings, views, [days], BronzeSnapshot())
    hashes = {v.name: content_hash(spark, settings.storage.feature_path(v.name)) for v in views}
    backfill(spark, settings, views, [days], BronzeSnapshot())
    assert {v.name: content_hash(spark, settings.storage.feature_path(v.name)) for v in views} == hashes

    velocity = settings.storage.feature_path("account_velocity")
    untouched = spark.read.format("delta").load(velocity).filter(f"event_date = '{first_day}'").collect()
    rewritten = content_hash(spark, velocity, f"event_date = '{second_day}'")
    [outcome] = backfill(spark, settings, views[:1], [DayRange.parse(second_day, str(days.end))], BronzeSnapshot())
    assert outcome.days == [days.end - timedelta(days=1)]
    # The first day is not rewritten at all (same computed_at); the second day is, to the same rows.
    assert sorted(spark.read.format("delta").load(velocity).filter(f"event_date = '{first_day}'").collect()) == \
        sorted(untouched)
    assert content_hash(spark, velocity, f"event_date = '{second_day}'") == rewritten
    assert len(untouched) > 0

    # Bronze as it was before the ingest (empty): replacing the days would only delete rows.
    before = latest_version(spark, velocity)
    with pytest.raises(SourceError, match=r"account_velocity: \d+ rows of the table .* replacing those days would "
                                          "delete them"):
        backfill(spark, settings, views[:1], [days], BronzeSnapshot(version=0))
    assert latest_version(spark, velocity) == before


def test_a_bronze_timestamp_backfills_the_bronze_of_that_time(spark, isolated, tmp_path, capsys):
    """``fp-backfill --bronze-timestamp``: more events reach bronze after a first ingest; a
    backfill as of the first ingest's last commit gives that bronze's rows, a later one all."""
    settings = isolated()
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    spec = crossing_midnight_spec(count=300)
    produce(generate(spec), settings.kafka.client_properties(), topic_names=topic_names(settings))
    run_ingest(spark, settings, available_now=True)
    bronze = settings.storage.bronze_path(settings.ingest.topics[0])
    first = spark.sql(f"DESCRIBE HISTORY delta.`{bronze}` LIMIT 1").first()
    first_rows = spark.read.format("delta").option("versionAsOf", first.version).load(bronze).count()
    produce(generate(crossing_midnight_spec(count=100, seed=6)), settings.kafka.client_properties(),
            topic_names=topic_names(settings))
    run_ingest(spark, settings, available_now=True)
    assert spark.read.format("delta").load(bronze).count() > first_rows
    days = both_days(spec)
    velocity = settings.storage.feature_path("account_velocity")

    def run_at(moment: datetime) -> int:
        return backfill_job.main(["--env", "local", "--conf-dir", str(conf_dir), "--views", "account_velocity",
                                  "--from", str(days.start), "--to", str(days.end),
                                  "--bronze-timestamp", moment.isoformat()])

    # Just after the first ingest's last commit: its version.
    at_first = first.timestamp.replace(tzinfo=timezone.utc)
    assert run_at(at_first + timedelta(milliseconds=1)) == 0
    assert spark.read.format("delta").load(velocity).count() == first_rows
    assert run_at(datetime.now(timezone.utc)) == 0
    assert spark.read.format("delta").load(velocity).count() == spark.read.format("delta").load(bronze).count()
    # Before the table existed, or not a time: exit 3 or 2, one line naming why.
    assert run_at(at_first - timedelta(days=1)) == 3
    assert "no version at or before" in capsys.readouterr().err.splitlines()[-1]
    assert backfill_job.main(["--env", "local", "--conf-dir", str(conf_dir), "--from", str(days.start), "--to",
                              str(days.end), "--bronze-timestamp", "yesterday"]) == 2
    assert "--bronze-timestamp: 'yesterday' is not an ISO-8601 time" in capsys.readouterr().err.splitlines()[-1]


def test_a_kafka_replay_dead_letters_each_invalid_record_once_however_often_it_runs(spark, isolated):
    settings = isolated()
    spec = crossing_midnight_spec(count=500, bad_rate=0.06)
    sent = produce(generate(spec), settings.kafka.client_properties(), topic_names=topic_names(settings))
    views = [settings.views["merchant_hourly"]]
    dead_letter_path = settings.storage.dead_letter_path

    backfill(spark, settings, views, [both_days(spec)], KafkaReplay())
    first = content_hash(spark, settings.storage.feature_path("merchant_hourly"))
    backfill(spark, settings, views, [both_days(spec)], KafkaReplay())

    tx = settings.ingest.topics[0]
    letters = spark.read.format("delta").load(dead_letter_path).filter(F.col("kafka_topic") == tx)
    assert letters.count() == sum(sent.expected_dead_letters(tx).values()) > 0
    assert letters.select("kafka_partition", "kafka_offset").distinct().count() == letters.count()
    assert content_hash(spark, settings.storage.feature_path("merchant_hourly")) == first
