"""Kafka readers: a topic as a stream (the ingest), and a fixed range of its offsets as a batch
(reconciliation, Kafka replays). Transforms never read; jobs call these at the edge."""

from __future__ import annotations

import json
from collections.abc import Mapping

from pyspark.sql import DataFrame, SparkSession

from pipelines.core.settings import IngestSettings, KafkaSettings


def read_kafka_stream(spark: SparkSession, kafka: KafkaSettings, topic: str, ingest: IngestSettings,
                      bounded: bool = True, read_committed: bool = False) -> DataFrame:
    """A streaming DataFrame of ``topic``'s records (key, value, topic, partition, offset,
    timestamp, timestampType, headers); ``bounded``: at most ``max_offsets_per_trigger`` records
    a micro-batch (real-time mode refuses the bound).

    ``startingOffsets`` applies only to a query with a new checkpoint; a restarted query resumes
    from its checkpoint. ``failOnDataLoss`` stops the query when offsets it has not read were
    deleted (retention) instead of skipping them. ``read_committed``: only the records of
    committed Kafka transactions (a transactional producer's topic, e.g. Kafka Connect's with
    exactly-once delivery); Kafka's default also returns those of aborted ones.
    """
    reader = (
        spark.readStream.format("kafka")
        .option("subscribe", topic)
        .option("startingOffsets", ingest.starting_offsets)
        .option("failOnDataLoss", str(ingest.fail_on_data_loss).lower())
        .option("includeHeaders", "true")
    )
    if bounded:
        reader = reader.option("maxOffsetsPerTrigger", str(ingest.max_offsets_per_trigger))
    if read_committed:
        reader = reader.option("kafka.isolation.level", "read_committed")
    for key, value in kafka.spark_options().items():
        reader = reader.option(key, value)
    return reader.load()


def read_kafka_offsets(spark: SparkSession, kafka: KafkaSettings, topic: str, offsets: Mapping[int, tuple[int, int]],
                       fail_on_data_loss: bool = True) -> DataFrame:
    """The records of ``topic`` at ``offsets`` (partition -> ``[start, end)``), as a batch: the
    Kafka source's columns, with headers. ``fail_on_data_loss``: fail if offsets in the range
    were deleted (retention) between the caller's look at the topic and this read."""
    starting = {topic: {str(p): start for p, (start, _) in offsets.items()}}
    ending = {topic: {str(p): end for p, (_, end) in offsets.items()}}
    reader = (
        spark.read.format("kafka")
        .option("subscribe", topic)
        .option("startingOffsets", json.dumps(starting))
        .option("endingOffsets", json.dumps(ending))
        .option("includeHeaders", "true")
        .option("failOnDataLoss", str(fail_on_data_loss).lower())
    )
    for key, value in kafka.spark_options().items():
        reader = reader.option(key, value)
    return reader.load()
