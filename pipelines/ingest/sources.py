"""The ingest's reader: the Kafka topic as a stream. Transforms never read; the job calls this at the edge."""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession

from pipelines.core.settings import IngestSettings, KafkaSettings


def read_kafka_stream(spark: SparkSession, kafka: KafkaSettings, topic: str, ingest: IngestSettings) -> DataFrame:
    """A streaming DataFrame of ``topic``'s records (key, value, topic, partition, offset,
    timestamp, timestampType, headers).

    ``startingOffsets`` applies only to a query with a new checkpoint; a restarted query resumes
    from its checkpoint. ``failOnDataLoss`` stops the query when offsets it has not read were
    deleted (retention) instead of skipping them.
    """
    reader = (
        spark.readStream.format("kafka")
        .option("subscribe", topic)
        .option("startingOffsets", ingest.starting_offsets)
        .option("maxOffsetsPerTrigger", str(ingest.max_offsets_per_trigger))
        .option("failOnDataLoss", str(ingest.fail_on_data_loss).lower())
        .option("includeHeaders", "true")
    )
    for key, value in kafka.spark_options().items():
        reader = reader.option(key, value)
    return reader.load()
