"""The foreachBatch writer: idempotent per (app id, batch id), against Delta and the real broker."""

from __future__ import annotations

from datetime import timedelta

import pytest
from chispa import assert_df_equality
from delta.tables import DeltaTable
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from pipelines.contracts.validation import ValidationRules
from pipelines.core.delta import ensure_delta_table
from pipelines.core.kafka_admin import topic_offsets
from pipelines.ingest.bronze import drop_duplicate_events
from pipelines.ingest.json_records import validate_records
from pipelines.ingest.sinks import IngestBatchWriter
from tests.support import BATCH_TIME, KAFKA_SCHEMA, encode, kafka_row, transaction

RULES = ValidationRules(max_value_bytes=1000, future_tolerance=timedelta(minutes=5), max_event_age=timedelta(days=7))


def batch_of(spark, settings, topic):
    contract = settings.contract_for(topic)
    rows = [
        kafka_row(encode(transaction(transaction_id="tx-1")), 0, topic=topic),
        kafka_row(encode(transaction(transaction_id="tx-2")), 1, topic=topic),
        kafka_row(b"not json", 2, topic=topic),
    ]
    records = spark.createDataFrame(rows, KAFKA_SCHEMA)
    return drop_duplicate_events(validate_records(records, contract, RULES, F.lit(BATCH_TIME)), contract, RULES)


def table_state(spark, path):
    return DeltaTable.forPath(spark, path).history(1).select("version").first()[0], spark.read.format("delta").load(path)


def dlq_messages(settings, topic):
    return sum(high - low for low, high in topic_offsets(settings.kafka.client_properties(), settings.kafka.dlq_topic_for(topic)).values())


def test_writing_the_same_batch_twice_changes_nothing_the_second_time(spark, isolated):
    settings = isolated()
    topic = settings.ingest.topics[0]
    writer = IngestBatchWriter(topic, settings.contract_for(topic), settings.kafka, settings.storage)
    batch = batch_of(spark, settings, topic)

    first = writer.write_batch(batch, 0, "ingest:test:app-1")
    bronze_version, bronze = table_state(spark, settings.storage.bronze_path(topic))
    dlq_version, dlq = table_state(spark, settings.storage.dead_letter_path)
    bronze_rows, dlq_rows = bronze.collect(), dlq.collect()

    again = writer.write_batch(batch, 0, "ingest:test:app-1")

    assert (first.bronze_rows, first.dead_letter_rows, first.dead_letters_published) == (2, 1, True)
    assert again.dead_letters_published is False
    assert table_state(spark, settings.storage.bronze_path(topic))[0] == bronze_version
    assert table_state(spark, settings.storage.dead_letter_path)[0] == dlq_version
    assert_df_equality(spark.read.format("delta").load(settings.storage.bronze_path(topic)),
                       spark.createDataFrame(bronze_rows, bronze.schema), ignore_row_order=True)
    assert_df_equality(spark.read.format("delta").load(settings.storage.dead_letter_path),
                       spark.createDataFrame(dlq_rows, dlq.schema), ignore_row_order=True)
    assert dlq_messages(settings, topic) == 1


def test_a_new_app_id_is_a_new_writer_not_a_replay(spark, isolated):
    """Deleting a checkpoint gives the query a new id: its batch 0 must be written, not skipped."""
    settings = isolated()
    topic = settings.ingest.topics[0]
    writer = IngestBatchWriter(topic, settings.contract_for(topic), settings.kafka, settings.storage,
                               publish_dead_letters=False)
    batch = batch_of(spark, settings, topic)
    writer.write_batch(batch, 0, "ingest:test:old-checkpoint")
    writer.write_batch(batch, 0, "ingest:test:new-checkpoint")
    assert spark.read.format("delta").load(settings.storage.bronze_path(topic)).count() == 4


def test_an_existing_table_gains_new_columns_and_refuses_a_type_change(spark, tmp_path):
    path = str(tmp_path / "bronze")
    ensure_delta_table(spark, path, StructType([StructField("id", StringType()), StructField("n", LongType())]))
    spark.createDataFrame([("a", 1)], "id string, n long").write.format("delta").mode("append").save(path)
    ensure_delta_table(spark, path, StructType([StructField("id", StringType()), StructField("n", LongType()),
                                                StructField("channel", StringType())]))
    assert [tuple(r) for r in spark.read.format("delta").load(path).collect()] == [("a", 1, None)]
    with pytest.raises(ValueError, match=r"column types changed \(n: table has bigint, now string\)"):
        ensure_delta_table(spark, path, StructType([StructField("n", StringType())]))
