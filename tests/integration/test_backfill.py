"""Backfills on the real platform: a Kafka replay gives the stream's rows for every view kind;
re-running gives the same table content; narrower ranges touch only their days."""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import datetime, time, timedelta, timezone

import pytest
from pyspark.sql import functions as F

from pipelines.batch.backfill import DayRange, backfill
from pipelines.batch.sources import BronzeSnapshot, KafkaReplay
from pipelines.core.errors import SourceError
from pipelines.features.stream import run_features
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


def table_rows(spark, path, version=None) -> Counter:
    """The table's rows without ``computed_at``, floats to 9 significant digits, as a multiset."""
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    rows = reader.load(path).drop("computed_at")
    columns = sorted(rows.columns)
    return Counter(tuple(float(f"{r[c]:.9g}") if isinstance(r[c], float) else r[c] for c in columns)
                   for r in rows.select(*columns).collect())


def latest_version(spark, path) -> int:
    return spark.sql(f"DESCRIBE HISTORY delta.`{path}` LIMIT 1").collect()[0]["version"]


def content_hash(spark, path, where: str = "true") -> str:
    """SHA-256 of the table's rows (``computed_at`` aside) in sorted order."""
    table = spark.read.format("delta").load(path).filter(where).drop("computed_at")
    columns = sorted(table.columns)
    rows = sorted(repr(tuple(r)) for r in table.select(*columns).collect())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def stream_in_slices(spark, settings, spec: GeneratorSpec, slices: int) -> None:
    """Send the records in ``slices`` parts, running the ingest and every view after each: the
    stream sees the events in several micro-batches, in order (one ingest commit per part,
    read whole by the feature queries)."""
    records = list(generate(spec))
    size = -(-len(records) // slices)
    for start in range(0, len(records), size):
        produce(records[start:start + size], settings.kafka.client_properties(), topic_names=topic_names(settings))
        run_ingest(spark, settings, available_now=True)
        run_features(spark, settings, list(settings.views.values()), available_now=True)


def test_kafka_replay_backfill_gives_exactly_the_stream_rows_for_every_view_kind(spark, isolated):
    settings = isolated()
    spec = crossing_midnight_spec()
    views = list(settings.views.values())
    assert {v.kind for v in views} == {"trailing", "sliding", "session"}
    stream_in_slices(spark, settings, spec, slices=4)
    streamed = {v.name: table_rows(spark, settings.storage.feature_path(v.name)) for v in views}
    dead_letters = spark.read.format("delta").load(settings.storage.dead_letter_path).count()

    outcomes = backfill(spark, settings, views, [both_days(spec)], KafkaReplay())

    for view in views:
        assert sum(streamed[view.name].values()) > 20, view.name
        assert table_rows(spark, settings.storage.feature_path(view.name)) == streamed[view.name], view.name
    assert {o.view: o.rows for o in outcomes} == {name: sum(rows.values()) for name, rows in streamed.items()}
    # The stream dead-lettered every invalid record already: the replay adds none.
    assert spark.read.format("delta").load(settings.storage.dead_letter_path).count() == dead_letters > 0


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
