"""End to end on the real platform: generator -> ingest -> every shipped view -> Delta + Redis;
for every entity, the online value equals the latest row of its Delta feature table."""

from __future__ import annotations

from datetime import timedelta

from pipelines.core.times import utc_assuming_local
from pipelines.core.view_spec import event_time_column, feature_names
from pipelines.features.sinks import latest_per_entity
from pipelines.features.stream import run_features
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from pipelines.online.store import read_online, redis_client
from tests.support import topic_names


def test_online_values_equal_the_latest_feature_rows(spark, isolated):
    settings = isolated()
    spec = GeneratorSpec(count=1500, accounts=40, merchants=15, seed=9, span=timedelta(hours=6), bad_rate=0.02,
                         label_rate=0.4, label_delay=(timedelta(minutes=5), timedelta(hours=2)))
    produce(generate(spec), settings.kafka.client_properties(), topic_names=topic_names(settings))
    run_ingest(spark, settings, available_now=True)
    views = list(settings.computed_views.values())
    assert run_features(spark, settings, views, available_now=True) == 0

    client = redis_client(settings.redis)
    for view in views:
        table = spark.read.format("delta").load(settings.storage.feature_path(view.name))
        assert table.count() > 0, view.name
        names = feature_names(view)
        latest = {r[view.entity]: r for r in latest_per_entity(table, view).collect()}
        online = read_online(client, settings.redis.namespace, view.name, names, sorted(latest))
        for value in online:
            expected = latest[value["entity"]]
            assert value["event_time"] == utc_assuming_local(expected[event_time_column(view)]), (view.name, value)
            for name in names:
                want, got = expected[name], value[name]
                assert (got == want) or (isinstance(want, float) and abs(got - want) < 1e-9), (view.name, name, got, want)

    metrics = spark.read.format("delta").load(settings.storage.feature_metrics_path).collect()
    assert {m.view for m in metrics} == {v.name for v in views}
    for view in views:
        # Every entity reached Redis at least once (a later batch may update it again).
        written = sum(m.online_written or 0 for m in metrics if m.view == view.name)
        assert written >= len({r[view.entity] for r in spark.read.format("delta").load(
            settings.storage.feature_path(view.name)).select(view.entity).collect()}), view.name
    assert all(m.freshness_seconds is None or m.freshness_seconds > 0 for m in metrics)
