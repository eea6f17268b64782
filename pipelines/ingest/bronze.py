"""Pure DataFrame transforms of the bronze layer: Kafka records -> validated -> bronze / dead letter.

Every function here takes and returns DataFrames and does no I/O, so the same code runs on a
static DataFrame (tests, Kafka replays) and on the streaming DataFrame of the ingest job.

Column conventions: Kafka's own columns are renamed with a ``kafka_`` prefix
(:mod:`pipelines.ingest.records`) so that they can never collide with a contract's field names;
contracts may not declare names in :data:`pipelines.core.contract_spec.RESERVED_COLUMNS` or
starting with ``kafka_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StructType

from pipelines.contracts.avro import WriterSchema
from pipelines.contracts.spark_schema import spark_type
from pipelines.contracts.validation import ValidationRules
from pipelines.core.contract_spec import Contract
from pipelines.core.times import spark_interval
from pipelines.ingest.avro_records import decode_avro_records
from pipelines.ingest.json_records import validate_records
from pipelines.ingest.records import HEADERS_TYPE, KAFKA_RECORD_SCHEMA

BRONZE_METADATA = ("kafka_topic", "kafka_partition", "kafka_offset", "kafka_timestamp", "kafka_headers")


def check_records(
    records: DataFrame,
    contract: Contract,
    rules: ValidationRules,
    writers: Sequence[WriterSchema] | None = None,
    batch_time: Column | None = None,
) -> DataFrame:
    """Validate JSON records (:func:`~pipelines.ingest.json_records.validate_records`) or decode
    Avro ones (:func:`~pipelines.ingest.avro_records.decode_avro_records`, with ``writers``: the
    versions of the topic's subject), as the contract's ``format`` says. Both give the same
    columns: the ``kafka_*`` ones, ``validated_at``, every contract field (null for invalid
    records), ``error_class`` and ``error_reason``."""
    if contract.format == "avro":
        return decode_avro_records(records, contract, rules, writers or (), batch_time)
    return validate_records(records, contract, rules, batch_time)


def dedupe_delay(rules: ValidationRules) -> timedelta:
    """Watermark delay of the duplicate filter: longer than any valid event can lag the stream.

    Watermark <= (latest batch time + future_tolerance) - delay, and a valid event is at most
    ``max_event_age`` behind its batch time; with delay > max_event_age + future_tolerance no
    valid event is ever behind the watermark, so the duplicate filter never drops one as late.
    """
    return rules.max_event_age + rules.future_tolerance + timedelta(minutes=1)


def drop_duplicate_events(validated: DataFrame, contract: Contract, rules: ValidationRules) -> DataFrame:
    """Drop repeated deliveries of the same event id (first delivery wins); keep every invalid record.

    Valid records are keyed by the contract's ``id_field``; invalid records by their Kafka
    partition and offset, so they are never merged. The event-time watermark is on the event
    time for valid records and on the batch time for invalid ones: a record quarantined for a
    future event time therefore never moves the watermark. On a static DataFrame this is a
    deduplication on the same key in which the earliest Kafka delivery wins.
    """
    valid = F.col("error_class").isNull()
    keyed = validated.withColumn(
        "_watermark_time", F.when(valid, F.col(contract.event_time_field)).otherwise(F.col("validated_at"))
    ).withColumn(
        "_dedupe_key",
        F.when(valid, F.concat(F.lit("id:"), F.col(contract.id_field).cast("string"))).otherwise(
            F.concat(F.lit("at:"), F.col("kafka_partition").cast("string"), F.lit(":"),
                     F.col("kafka_offset").cast("string"))
        ),
    )
    if not validated.isStreaming:
        # Batch: the earliest delivery wins, decided by Kafka order, so a replay is deterministic.
        first = Window.partitionBy("_dedupe_key").orderBy("kafka_timestamp", "kafka_partition", "kafka_offset")
        return (
            keyed.withColumn("_delivery", F.row_number().over(first))
            .filter(F.col("_delivery") == 1)
            .drop("_delivery", "_watermark_time", "_dedupe_key")
        )
    return (
        keyed.withWatermark("_watermark_time", spark_interval(dedupe_delay(rules)))
        .dropDuplicatesWithinWatermark(["_dedupe_key"])
        .drop("_watermark_time", "_dedupe_key")
    )


def bronze_rows(validated: DataFrame, contract: Contract) -> DataFrame:
    """Valid records as bronze rows: the contract fields, ``writer_schema_id`` and
    ``writer_schema_version`` (Avro topics), Kafka metadata, ``ingested_at`` and ``event_date``
    (the UTC date of the event time, the partition column)."""
    return validated.filter(F.col("error_class").isNull()).select(
        *[F.col(f.name).cast(spark_type(f)) for f in contract.fields],
        # Which registered schema wrote each Avro record (a training set can tell).
        *(("writer_schema_id", "writer_schema_version") if contract.format == "avro" else ()),
        *BRONZE_METADATA,
        F.col("validated_at").alias("ingested_at"),
        F.to_date(F.col(contract.event_time_field)).alias("event_date"),
    )


def dead_letter_rows(validated: DataFrame, contract: Contract) -> DataFrame:
    """Invalid records as dead-letter rows: original key/value bytes and headers, Kafka
    coordinates, ``error_class``, ``error_reason``, ``schema_id`` (the Avro writer schema id
    in the record's header; null for JSON and headerless records), the contract, ``failed_at`` (batch time)
    and ``failed_date`` (its UTC date, the partition column)."""
    return validated.filter(F.col("error_class").isNotNull()).select(
        "kafka_topic",
        "kafka_partition",
        "kafka_offset",
        "kafka_timestamp",
        "kafka_key",
        "kafka_value",
        "kafka_headers",
        "error_class",
        "error_reason",
        (F.col("writer_schema_id") if "writer_schema_id" in validated.columns
         else F.lit(None).cast(LongType())).alias("schema_id"),
        F.lit(contract.name).alias("contract_name"),
        F.lit(contract.version).alias("contract_version"),
        F.col("validated_at").alias("failed_at"),
        F.to_date("validated_at").alias("failed_date"),
    )


def dead_letter_messages(dead_letters: DataFrame) -> DataFrame:
    """Dead-letter rows as Kafka messages for the ``<topic>.dlq`` topic: original key, value and
    headers, plus ``dlq.*`` headers naming the error and the source coordinates, which
    consumers use to drop the rare re-publication after a crash."""

    def header(name: str, value: Column) -> Column:
        return F.struct(F.lit(name).alias("key"), value.cast("string").cast("binary").alias("value"))

    added = F.array(
        header("dlq.error_class", F.col("error_class")),
        header("dlq.error_reason", F.col("error_reason")),
        header("dlq.source_topic", F.col("kafka_topic")),
        header("dlq.source_partition", F.col("kafka_partition")),
        header("dlq.source_offset", F.col("kafka_offset")),
        header("dlq.failed_at", F.date_format("failed_at", "yyyy-MM-dd'T'HH:mm:ss.SSSXXX")),
    )
    return dead_letters.select(
        F.col("kafka_key").alias("key"),
        F.col("kafka_value").alias("value"),
        F.concat(F.coalesce(F.col("kafka_headers"), F.array().cast(HEADERS_TYPE)), added).alias("headers"),
    )


def table_schemas(spark: SparkSession, contract: Contract, rules: ValidationRules) -> tuple[StructType, StructType]:
    """The (bronze, dead-letter) table schemas for ``contract``, as the transforms produce them."""
    validated = check_records(spark.createDataFrame([], KAFKA_RECORD_SCHEMA), contract, rules)
    return bronze_rows(validated, contract).schema, dead_letter_rows(validated, contract).schema
