"""Contracts as Spark types: the typed fields a decoded event has in a DataFrame."""

from __future__ import annotations

from collections.abc import Mapping

from pyspark.sql.types import (
    BooleanType,
    DataType,
    DoubleType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from pipelines.core.contract_spec import Contract, ContractField

#: The Spark type of each contract field type.
SPARK_TYPES: Mapping[str, DataType] = {
    "string": StringType(),
    "double": DoubleType(),
    "long": LongType(),
    "boolean": BooleanType(),
    "timestamp": TimestampType(),
}


def spark_type(field: ContractField) -> DataType:
    """The Spark type of a contract field (``long`` -> ``LongType``, ``timestamp`` -> UTC timestamp)."""
    return SPARK_TYPES[field.type]


def contract_schema(contract: Contract) -> StructType:
    """The parsed event's Spark schema, in declaration order; required fields are declared
    non-nullable."""
    return StructType([StructField(f.name, spark_type(f), not f.required) for f in contract.fields])
