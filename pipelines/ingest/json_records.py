"""JSON topics into the bronze layer: each record's raw bytes checked against its contract by
:class:`pipelines.contracts.validation.RecordValidator`, in an Arrow UDF, giving the typed fields
or an error class and reason. The Avro counterpart is :mod:`pipelines.ingest.avro_records`; both
return the same columns, so everything downstream is shared (:mod:`pipelines.ingest.bronze`).
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from pipelines.contracts.spark_schema import spark_type
from pipelines.contracts.validation import RecordValidator, ValidationRules
from pipelines.core.contract_spec import Contract
from pipelines.ingest.records import kafka_records

_ARROW_TYPES = {
    "string": pa.string(),
    "double": pa.float64(),
    "long": pa.int64(),
    "boolean": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


def verdict_type(contract: Contract) -> StructType:
    """The struct the validation UDF returns: every contract field (nullable) + the error."""
    return StructType(
        [StructField(f.name, spark_type(f), True) for f in contract.fields]
        + [StructField("error_class", StringType(), True), StructField("error_reason", StringType(), True)]
    )


def _validation_udf(contract: Contract, rules: ValidationRules):
    validator = RecordValidator(contract, rules)
    names = contract.field_names
    arrow_types = [_ARROW_TYPES[f.type] for f in contract.fields]

    def check(values: pa.Array, batch_times: pa.Array) -> pa.Array:
        columns: list[list] = [[] for _ in names]
        error_classes: list[str | None] = []
        reasons: list[str | None] = []
        for value, batch_time in zip(values.to_pylist(), batch_times.to_pylist()):
            verdict = validator.validate(value, batch_time)
            error_classes.append(verdict.error_class)
            reasons.append(verdict.reason)
            parsed = verdict.values or {}
            for column, name in zip(columns, names):
                column.append(parsed.get(name))
        arrays = [pa.array(col, type=t) for col, t in zip(columns, arrow_types)]
        arrays += [pa.array(error_classes, type=pa.string()), pa.array(reasons, type=pa.string())]
        return pa.StructArray.from_arrays(arrays, names=[*names, "error_class", "error_reason"])

    return F.arrow_udf(check, verdict_type(contract))


def validate_records(
    records: DataFrame,
    contract: Contract,
    rules: ValidationRules,
    batch_time: Column | None = None,
) -> DataFrame:
    """Kafka-shaped rows -> one row per record with the contract's typed fields and its verdict.

    Input columns: ``key, value, topic, partition, offset, timestamp`` and optionally
    ``headers`` (as the Kafka source gives them). Output: those columns renamed ``kafka_*``,
    ``validated_at`` (the batch time, ``current_timestamp()`` unless ``batch_time`` is given),
    every contract field (null for invalid records), ``error_class`` and ``error_reason``
    (both null exactly when the record is valid). ``kafka_value`` is kept for invalid records
    only (valid ones are fully represented by their fields). No record is dropped.
    """
    with_time = kafka_records(records, batch_time)
    check = _validation_udf(contract, rules)
    verdict = check(F.col("kafka_value"), F.col("validated_at"))
    checked = with_time.withColumn("_verdict", verdict)
    return checked.select(
        *[F.col(c) for c in with_time.columns if c != "kafka_value"],
        # Only dead letters need the original bytes; dropping them from valid rows halves what
        # the duplicate filter shuffles and keeps in memory.
        F.when(F.col("_verdict.error_class").isNotNull(), F.col("kafka_value")).alias("kafka_value"),
        *[F.col(f"_verdict.{n}").alias(n) for n in (*contract.field_names, "error_class", "error_reason")],
    )
