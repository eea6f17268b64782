"""Kafka records as the bronze layer sees them: the source's columns renamed ``kafka_*`` (so they
never collide with a contract's fields; contracts may not declare such names), with the batch
time every check of the batch compares against."""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

KAFKA_COLUMNS = {
    "key": "kafka_key",
    "value": "kafka_value",
    "topic": "kafka_topic",
    "partition": "kafka_partition",
    "offset": "kafka_offset",
    "timestamp": "kafka_timestamp",
    "headers": "kafka_headers",
}
HEADERS_TYPE = ArrayType(StructType([StructField("key", StringType()), StructField("value", BinaryType())]))
#: The records of Spark's Kafka source with ``includeHeaders`` (timestampType left out).
KAFKA_RECORD_SCHEMA = StructType(
    [
        StructField("key", BinaryType()),
        StructField("value", BinaryType()),
        StructField("topic", StringType()),
        StructField("partition", IntegerType()),
        StructField("offset", LongType()),
        StructField("timestamp", TimestampType()),
        StructField("headers", HEADERS_TYPE),
    ]
)


def kafka_records(records: DataFrame, batch_time: Column | None = None) -> DataFrame:
    """Kafka-shaped rows (``key, value, topic, partition, offset, timestamp`` and optionally
    ``headers``) -> the ``kafka_*`` columns plus ``validated_at``: the batch time,
    ``current_timestamp()`` unless ``batch_time`` is given (a replay passes each record's Kafka
    timestamp)."""
    if "headers" not in records.columns:
        records = records.withColumn("headers", F.lit(None).cast(HEADERS_TYPE))
    renamed = records.select(*[F.col(src).alias(dst) for src, dst in KAFKA_COLUMNS.items()])
    return renamed.withColumn(
        "validated_at", F.current_timestamp() if batch_time is None else batch_time.cast(TimestampType())
    )
