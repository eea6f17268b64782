"""A sliding view streamed from a bronze table into its Delta feature table and Redis."""

from __future__ import annotations

from datetime import datetime, timezone

from pipelines.core.config import build
from pipelines.core.view_spec import FeatureView, check_view
from pipelines.features.sinks import FeatureBatchWriter, latest_per_entity
from pipelines.features.stream import bronze_source, feature_stream
from pipelines.features.transforms import sliding_features
from pipelines.ingest.stream import create_tables
from pipelines.online.store import entity_key, read_online, redis_client


def ts(hhmm: str) -> datetime:
    return datetime.fromisoformat(f"2026-11-23T{hhmm}")


def hourly_view(settings) -> FeatureView:
    view = build(FeatureView, {
        "name": "merchant_hourly_test", "source": {"contract": "transactions"}, "entity": "merchant_id",
        "event_time": "event_time", "kind": "sliding", "window": "1h", "allowed_lateness": "10m",
        "aggregations": [{"column": "*", "functions": ["count"]}, {"column": "amount_usd", "functions": ["sum"]}],
        "online": {"ttl": "2h"},
    }, "test")
    check_view(view, settings.contracts, "test")
    return view


def add_bronze(spark, settings, rows) -> None:
    tx_topic = settings.ingest.topics[0]
    schema = spark.read.format("delta").load(settings.storage.bronze_path(tx_topic)).schema
    full = [("tx-" + str(i), "acct-1", merchant, amount, "5411", 10.0, None, ts(at), tx_topic, 0, i, ts(at), None, ts(at), ts(at).date())
            for i, (merchant, at, amount) in enumerate(rows)]
    spark.createDataFrame(full, schema).write.format("delta").mode("append").save(settings.storage.bronze_path(tx_topic))


def test_closed_windows_reach_the_feature_table_and_the_latest_reaches_redis(spark, isolated, tmp_path):
    settings = isolated()
    create_tables(spark, settings, settings.ingest.topics)
    view = hourly_view(settings)
    add_bronze(spark, settings, [("m1", "10:05", 1.0), ("m1", "10:20", 2.0), ("m2", "10:30", 4.0),
                                 ("m1", "11:05", 8.0), ("m1", "12:30", 16.0)])
    query = (sliding_features(bronze_source(spark, settings, view), view).writeStream
             .foreachBatch(FeatureBatchWriter(view, settings))
             .option("checkpointLocation", str(tmp_path / "checkpoint")).trigger(availableNow=True).start())
    query.awaitTermination()

    table = spark.read.format("delta").load(settings.storage.feature_path(view.name))
    # Watermark 12:30 - 10m = 12:20: [10:00, 11:00) and [11:00, 12:00) are closed, [12:00, 13:00) is not.
    assert sorted((r.merchant_id, r.window_start, r["count"], r.sum_amount_usd) for r in table.collect()) == [
        ("m1", ts("10:00"), 2, 3.0), ("m1", ts("11:00"), 1, 8.0), ("m2", ts("10:00"), 1, 4.0)]
    online = read_online(redis_client(settings.redis), settings.redis.namespace, view.name, ["count", "sum_amount_usd"],
                         ["m1", "m2", "m3"])
    assert [(r["entity"], r["count"], r["sum_amount_usd"], r["event_time"]) for r in online] == [
        ("m1", 1, 8.0, datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)),
        ("m2", 1, 4.0, datetime(2026, 11, 23, 11, 0, tzinfo=timezone.utc)),
        ("m3", None, None, None),
    ]


def test_writing_a_feature_batch_twice_changes_nothing(spark, isolated):
    settings = isolated()
    view = hourly_view(settings)
    # As the stream hands it over: stamped with the micro-batch's time, the same on a replay.
    batch = spark.createDataFrame([("m9", ts("10:00"), ts("11:00"), 3, 6.0, ts("11:05"))],
                                  "merchant_id string, window_start timestamp, window_end timestamp, count long, "
                                  "sum_amount_usd double, computed_at timestamp")
    writer = FeatureBatchWriter(view, settings)
    writer.write_batch(batch, 0, "features:test:app")
    client = redis_client(settings.redis)
    key = entity_key(settings.redis.namespace, view.name, "m9")
    before_table, before_key = spark.read.format("delta").load(settings.storage.feature_path(view.name)).collect(), client.hgetall(key)
    assert before_key[b"_event_time"]  # the first write's row is there (so the second could change it)
    writer.write_batch(batch, 0, "features:test:app")
    assert spark.read.format("delta").load(settings.storage.feature_path(view.name)).collect() == before_table
    assert client.hgetall(key) == before_key


def test_redis_shows_an_earlier_event_as_soon_as_the_stream_has_it(spark, isolated, tmp_path):
    settings = isolated()
    create_tables(spark, settings, settings.ingest.topics)
    view = settings.views["account_velocity"]
    checkpoint = str(tmp_path / "checkpoint")

    def run_stream() -> None:
        query = (feature_stream(spark, settings, view).writeStream.foreachBatch(FeatureBatchWriter(view, settings))
                 .option("checkpointLocation", checkpoint).trigger(availableNow=True).start())
        query.awaitTermination()

    def online() -> tuple:
        (row,) = read_online(redis_client(settings.redis), settings.redis.namespace, view.name,
                             ["count_1h", "sum_amount_usd_1h"], ["acct-1"])
        return row["event_time"], row["count_1h"], row["sum_amount_usd_1h"]

    add_bronze(spark, settings, [("m1", "10:02", 5.0)])
    run_stream()
    assert online() == (datetime(2026, 11, 23, 10, 2, tzinfo=timezone.utc), 1, 5.0)
    add_bronze(spark, settings, [("m2", "10:01", 2.0)])  # earlier, next micro-batch, ahead of the watermark
    run_stream()
    assert online() == (datetime(2026, 11, 23, 10, 2, tzinfo=timezone.utc), 2, 7.0)
    table = spark.read.format("delta").load(settings.storage.feature_path(view.name))
    # 10:02's first row, its correction (a later computed_at), and 10:01's row.
    assert sorted((r.event_time, r.count_1h) for r in table.collect()) == [(ts("10:01"), 1), (ts("10:02"), 1),
                                                                          (ts("10:02"), 2)]
    corrected = latest_per_entity(table, view).collect()
    assert [(r.event_time, r.count_1h) for r in corrected] == [(ts("10:02"), 2)]
