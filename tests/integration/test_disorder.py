"""Exact under real arrival order, end to end on the real platform: the generator's default
disorder (out-of-order, late and duplicate events, bad records) -> ingest -> every feature view
streamed a few bronze files at a time (ingest commits split across feature micro-batches) ->
the late recompute. Then every view's table, taking the latest ``computed_at`` row per entity
and time, equals a backfill of the same bronze into a separate table, row for row, and a
backfill replaying the Kafka topics into a third; and Redis holds each entity's latest such
row."""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from datetime import datetime, time, timedelta, timezone

from pipelines.batch.backfill import DayRange, backfill
from pipelines.batch.late import recompute_late
from pipelines.batch.sources import BronzeSnapshot, KafkaReplay
from pipelines.core.times import utc_assuming_local
from pipelines.core.view_spec import event_time_column, feature_names
from pipelines.features.sinks import latest_per_entity
from pipelines.features.stream import run_features
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from pipelines.online.store import read_online, redis_client
from tests.support import clock_records, latest_rows, rounded_rows, topic_names, unmatched_rows


def test_stream_and_late_recompute_equal_a_backfill_of_the_same_bronze(spark, isolated, tmp_path):
    settings = isolated(ingest={"max_offsets_per_trigger": 400},
                        features={"max_files_per_trigger": 2, "trigger_interval": "500ms"})
    views = list(settings.computed_views.values())
    assert {v.kind for v in views} == {"trailing", "sliding", "session"}
    start = datetime.combine(datetime.now(timezone.utc).date(), time(0), timezone.utc) - timedelta(days=3)
    # The generator's own rates: 5% out of order, 2% late (30 minutes to 6 hours), 1% duplicates, 2% bad.
    spec = GeneratorSpec(count=2500, accounts=40, merchants=12, seed=31, end=start + timedelta(hours=15),
                         span=timedelta(hours=12))
    assert (spec.out_of_order_rate, spec.late_rate, spec.duplicate_rate) == (0.05, 0.02, 0.01)
    names = topic_names(settings)
    produce(generate(spec), settings.kafka.client_properties(), topic_names=names)
    run_ingest(spark, settings, available_now=True)
    # Bronze commits hold more files than a feature micro-batch reads: commits are split.
    bronze = settings.storage.bronze_path(names["transactions"])
    files = [int(r.files) for r in spark.sql(f"DESCRIBE HISTORY delta.`{bronze}`")
             .filter("operation = 'WRITE'").selectExpr("operationMetrics['numFiles'] AS files").collect()]
    assert max(files) > settings.features.max_files_per_trigger, files
    run_features(spark, settings, views, available_now=True)
    # The clock moves on, twice: every watermark passes the history, and the second batch runs
    # under it (it closes and emits the last windows and sessions).
    now = datetime.now(timezone.utc)
    for n, at in enumerate((now - timedelta(minutes=5), now)):
        produce(clock_records(at, n), settings.kafka.client_properties(), topic_names=names)
        run_ingest(spark, settings, available_now=True)
        run_features(spark, settings, views, available_now=True)
    outcomes = recompute_late(spark, settings, views)
    assert all(o.late_events > 0 and o.days for o in outcomes), outcomes

    # The reference: a backfill of every day from a copy of the same bronze, into its own tables.
    reference = dataclasses.replace(
        settings, storage=dataclasses.replace(settings.storage, root=str(tmp_path / "reference")),
        redis=dataclasses.replace(settings.redis, namespace=f"reference-{uuid.uuid4().hex[:8]}"))
    shutil.copytree(f"{settings.storage.root}/bronze", f"{reference.storage.root}/bronze")
    # Late events reach up to 6 hours before the history's start: the day before it too.
    days = DayRange((spec.end - spec.span - spec.late_by[1]).date(), now.date() + timedelta(days=1))
    backfill(spark, reference, views, [days], BronzeSnapshot())
    # And a replay of the Kafka topics (the ingest's validation and duplicate filter), into a third.
    replay = dataclasses.replace(
        settings, storage=dataclasses.replace(settings.storage, root=str(tmp_path / "replay")),
        redis=dataclasses.replace(settings.redis, namespace=f"replay-{uuid.uuid4().hex[:8]}"))
    backfill(spark, replay, views, [days], KafkaReplay())
    # It dead-letters exactly the records the stream did.
    dead = [spark.read.format("delta").load(s.storage.dead_letter_path).select("kafka_topic", "kafka_partition",
                                                                               "kafka_offset", "error_class")
            for s in (settings, replay)]
    assert sorted(dead[0].collect()) == sorted(dead[1].collect())

    client = redis_client(settings.redis)
    for view in views:
        streamed, columns = latest_rows(spark, settings.storage.feature_path(view.name), view)
        expected = rounded_rows(spark.read.format("delta").load(reference.storage.feature_path(view.name)).collect(),
                                columns)
        assert sum(expected.values()) > 20, view.name
        # Floats to 1e-8 relative: the stream and the backfill sum in different orders.
        assert unmatched_rows(streamed, expected) == ([], []), view.name
        replayed = rounded_rows(spark.read.format("delta").load(replay.storage.feature_path(view.name)).collect(),
                                columns)
        assert unmatched_rows(replayed, expected) == ([], []), view.name
        table = spark.read.format("delta").load(settings.storage.feature_path(view.name))
        latest = {r[view.entity]: r for r in latest_per_entity(table, view).collect()}
        for value in read_online(client, settings.redis.namespace, view.name, feature_names(view), sorted(latest)):
            row = latest[value["entity"]]
            assert value["event_time"] == utc_assuming_local(row[event_time_column(view)]), (view.name, value)
            assert all(value[n] == row[n] or abs(value[n] - row[n]) < 1e-9 for n in feature_names(view)), \
                (view.name, value, row)
