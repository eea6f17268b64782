"""End to end on the real broker: generator -> ingest stream -> bronze / dead letter."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from datetime import datetime, timedelta, timezone

from delta.tables import DeltaTable
from pyspark.sql import functions as F

from pipelines.ingest.reconcile import reconcile
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, Record, generate, produce
from tests.support import encode, topic_names, transaction


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_generated_events_reconcile_exactly_across_many_batches(spark, isolated):
    settings = isolated(ingest={"max_offsets_per_trigger": 1500})
    spec = GeneratorSpec(count=4000, seed=3, span=timedelta(hours=12), bad_rate=0.03, duplicate_rate=0.03,
                         label_rate=0.5, label_delay=(timedelta(minutes=5), timedelta(hours=6)))
    records = list(generate(spec))
    sent = produce(records, settings.kafka.client_properties(), topic_names=topic_names(settings))

    run_ingest(spark, settings, available_now=True)

    results = reconcile(spark, settings, sent=sent)
    assert [(r.topic, r.unaccounted, r.mismatches) for r in results] == [(t, 0, ()) for t in settings.ingest.topics]
    assert [r.duplicates_dropped for r in results] == [sent.duplicates(t) for t in settings.ingest.topics]
    tx_topic = settings.ingest.topics[0]

    bronze = spark.read.format("delta").load(settings.storage.bronze_path(tx_topic))
    assert bronze.count() == bronze.select("transaction_id").distinct().count() == sent.expected_bronze(tx_topic)
    # Each dead letter holds the exact bytes that were sent.
    dead_letters = spark.read.format("delta").load(settings.storage.dead_letter_path).filter(F.col("kafka_topic") == tx_topic)
    stored = Counter(bytes(r.kafka_value) for r in dead_letters.select("kafka_value").collect())
    injected = Counter(r.value for r in records if r.topic == "transactions" and r.kind not in ("valid", "late", "out_of_order", "duplicate"))
    assert stored == injected

    # The accounting can fail: a bronze row lost, and then one written twice, are each named.
    path = settings.storage.bronze_path(tx_topic)
    redelivered = {json.loads(r.value)["transaction_id"] for r in records
                   if r.topic == "transactions" and r.kind == "duplicate"}
    victim = (spark.read.format("delta").load(path).filter(~F.col("transaction_id").isin(*redelivered))
              .orderBy("kafka_partition", "kafka_offset").first())  # an event sent once: only it goes missing
    DeltaTable.forPath(spark, path).delete(
        (F.col("kafka_partition") == victim.kafka_partition) & (F.col("kafka_offset") == victim.kafka_offset))
    (lost,) = reconcile(spark, settings, topics=[tx_topic])
    assert (lost.ok, lost.lost, lost.unaccounted) == (False, 1, 1)
    assert lost.mismatches == (f"{tx_topic}: 1 records are in no table and repeat no bronze event "
                               f"(e.g. partition {victim.kafka_partition} offset {victim.kafka_offset})",)
    schema = spark.read.format("delta").load(path).schema
    spark.createDataFrame([victim, victim], schema).write.format("delta").mode("append").save(path)
    (doubled,) = reconcile(spark, settings, topics=[tx_topic])
    assert (doubled.ok, doubled.lost, doubled.doubled, doubled.unaccounted) == (False, 0, 1, -1)


def test_future_event_does_not_make_later_valid_events_late(spark, isolated):
    settings = isolated()
    tx_topic = settings.ingest.topics[0]
    props, names = settings.kafka.client_properties(), topic_names(settings)
    now = datetime.now(timezone.utc)
    # Far enough ahead that, had it reached the watermark, the watermark would pass every later event.
    far_future = encode(transaction(transaction_id="tx-future", event_time=iso(now + timedelta(days=60))))
    first = [Record("transactions", b"acct-1", far_future, "future_event_time"),
             Record("transactions", b"acct-1", encode(transaction(transaction_id="tx-0", event_time=iso(now))), "valid")]
    produce(first, props, topic_names=names)
    run_ingest(spark, settings, topics=[tx_topic], available_now=True)

    later = [Record("transactions", b"acct-2", encode(transaction(transaction_id=f"tx-{i}", account_id="acct-2",
                                                                   event_time=iso(now - timedelta(hours=i)))), "valid")
             for i in range(1, 4)]
    produce(later, props, topic_names=names)
    run_ingest(spark, settings, topics=[tx_topic], available_now=True)

    bronze_ids = {r.transaction_id for r in spark.read.format("delta").load(settings.storage.bronze_path(tx_topic)).collect()}
    assert bronze_ids == {"tx-0", "tx-1", "tx-2", "tx-3"}
    dead = spark.read.format("delta").load(settings.storage.dead_letter_path).select("error_class").collect()
    assert [r.error_class for r in dead] == ["future_event_time"]
    metrics = spark.read.format("delta").load(settings.storage.stream_metrics_path).collect()
    assert {m.dropped_by_watermark for m in metrics} == {0}
    assert max(m.watermark for m in metrics if m.watermark) < now.replace(tzinfo=None)


def test_redelivery_in_a_later_batch_is_dropped_and_counted(spark, isolated):
    settings = isolated()
    tx_topic = settings.ingest.topics[0]
    props, names = settings.kafka.client_properties(), topic_names(settings)
    value = encode(transaction(transaction_id="tx-once", event_time=iso(datetime.now(timezone.utc))))
    produce([Record("transactions", b"acct-1", value, "valid")], props, topic_names=names)
    run_ingest(spark, settings, topics=[tx_topic], available_now=True)
    produce([Record("transactions", b"acct-1", value, "duplicate")], props, topic_names=names)
    run_ingest(spark, settings, topics=[tx_topic], available_now=True)

    bronze = spark.read.format("delta").load(settings.storage.bronze_path(tx_topic))
    assert [(r.transaction_id, r.kafka_offset) for r in bronze.collect()] == [("tx-once", 0)]
    metrics = spark.read.format("delta").load(settings.storage.stream_metrics_path)
    assert metrics.agg(F.sum("duplicates_dropped")).first()[0] == 1


def test_continuous_ingest_stops_gracefully_at_its_timeout(spark, isolated):
    """The processing-time trigger (the production mode) runs until asked to stop, then stops
    between batches with everything sent so far in bronze and no query left running."""
    settings = isolated(ingest={"trigger_interval": "1s"})
    tx_topic = settings.ingest.topics[0]
    now = datetime.now(timezone.utc)
    records = [Record("transactions", b"acct-1", encode(transaction(transaction_id=f"tx-{i}", event_time=iso(now))), "valid")
               for i in range(50)]
    produce(records, settings.kafka.client_properties(), topic_names=topic_names(settings))

    assert run_ingest(spark, settings, topics=[tx_topic], timeout=30) == 0

    assert spark.streams.active == []
    assert spark.read.format("delta").load(settings.storage.bronze_path(tx_topic)).count() == 50


def test_a_deleted_checkpoint_is_a_new_query_whose_writes_are_not_skipped(spark, isolated):
    """txnAppId comes from the query id kept in the checkpoint: a fresh checkpoint re-reads from
    the earliest offsets under a new id, and Delta must not skip its batches as replays."""
    settings = isolated()
    tx_topic = settings.ingest.topics[0]
    value = encode(transaction(transaction_id="tx-1", event_time=iso(datetime.now(timezone.utc))))
    produce([Record("transactions", b"acct-1", value, "valid")], settings.kafka.client_properties(),
            topic_names=topic_names(settings))
    run_ingest(spark, settings, topics=[tx_topic], available_now=True)
    shutil.rmtree(settings.storage.checkpoint_path("ingest", tx_topic))
    run_ingest(spark, settings, topics=[tx_topic], available_now=True)

    bronze = spark.read.format("delta").load(settings.storage.bronze_path(tx_topic))
    assert [r.transaction_id for r in bronze.collect()] == ["tx-1", "tx-1"]
