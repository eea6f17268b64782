"""Redis lost its data -> the rehydrate job rebuilds it from the feature tables: the latest row
per entity, with what is left of each key's TTL, and expired entities left out."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from pipelines.batch.backfill import DayRange, backfill
from pipelines.batch.rehydrate import rehydrate
from pipelines.batch.sources import FileSource
from pipelines.core.times import utc_assuming_local
from pipelines.core.view_spec import event_time_column, feature_names
from pipelines.features.sinks import latest_per_entity
from pipelines.online.store import entity_key, read_online, redis_client

SCHEMA = "account_id string, event_time timestamp, amount_usd double, merchant_id string, balance_usd double"


def t(hhmm: str) -> datetime:
    return datetime.fromisoformat(f"2026-11-20T{hhmm}:00+00:00")


def test_rehydrate_restores_the_latest_rows_with_their_remaining_ttl_and_is_idempotent(spark, isolated, tmp_path):
    settings = isolated()
    rows = [("a", t("10:00"), 10.0, "m1", 90.0), ("a", t("10:30"), 20.0, "m2", 70.0), ("b", t("11:00"), 5.0, "m1", 1.0),
            ("c", t("12:00"), 7.0, "m2", 3.0)]
    spark.createDataFrame(rows, SCHEMA).write.parquet(str(tmp_path / "history"))
    views = [settings.views["account_velocity"], settings.views["merchant_hourly"]]
    backfill(spark, settings, views, [DayRange.parse("2026-11-20", "2026-11-21")], FileSource(str(tmp_path / "history")))
    velocity = settings.storage.feature_path("account_velocity")
    # b's row was written to Redis 8 days ago: with a 7-day TTL its key would be gone by now.
    spark.sql(f"UPDATE delta.`{velocity}` SET computed_at = computed_at - INTERVAL 8 DAYS WHERE account_id = 'b'")
    client = redis_client(settings.redis)
    assert not list(client.scan_iter(f"{settings.redis.namespace}:*"))  # Redis starts empty (lost its data)

    first = {o.view: o for o in rehydrate(spark, settings, views)}
    again = {o.view: o for o in rehydrate(spark, settings, views)}

    assert (first["account_velocity"].entities, first["account_velocity"].expired, first["account_velocity"].written) == \
        (3, 1, 2)
    assert first["merchant_hourly"].written == first["merchant_hourly"].entities == 2
    assert {v: (o.written, o.unchanged) for v, o in again.items()} == {"account_velocity": (0, 2), "merchant_hourly": (0, 2)}
    for view in views:
        table = spark.read.format("delta").load(settings.storage.feature_path(view.name))
        latest = {r[view.entity]: r for r in latest_per_entity(table, view).collect()}
        restored = {e for e in latest if not (view.name == "account_velocity" and e == "b")}
        online = read_online(client, settings.redis.namespace, view.name, feature_names(view), sorted(latest))
        for value in online:
            if value["entity"] not in restored:
                assert value["event_time"] is None, value  # expired: not restored
                continue
            expected = latest[value["entity"]]
            assert value["event_time"] == utc_assuming_local(expected[event_time_column(view)])
            assert all(value[n] == expected[n] for n in feature_names(view)), (value, expected)
            ttl_ms = view.online.ttl.total_seconds() * 1000
            left = ttl_ms - (datetime.now(timezone.utc) - utc_assuming_local(expected.computed_at)).total_seconds() * 1000
            pttl = client.pttl(entity_key(settings.redis.namespace, view.name, value["entity"]))
            # The remaining TTL is computed when the job starts and applied when it writes: a few
            # seconds later, which is how long the key may outlive its original expiry.
            assert left - 60_000 < pttl <= left + 60_000, (view.name, pttl, left)
    assert online  # both views checked
    assert timedelta(0) < timedelta(milliseconds=client.pttl(entity_key(settings.redis.namespace, "account_velocity", "a")))
