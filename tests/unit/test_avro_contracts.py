"""Contracts as Avro schemas, and the Confluent wire format on hand-built bytes (Spark and Python
agree on every class)."""

from __future__ import annotations

import json

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F
from pyspark.sql.avro.functions import from_avro

from pipelines.contracts.avro import (
    TRUNCATED_HEADER,
    WRONG_MAGIC_BYTE,
    WireFormatError,
    avro_schema,
    decode_wire,
    encode_wire,
)
from pipelines.contracts.spark_schema import contract_schema
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.ingest.avro_records import wire_header

CONTRACTS = load_settings("local", PROJECT_ROOT / "conf").contracts


def test_a_contract_becomes_an_avro_record_with_optional_fields_defaulting_to_null():
    schema = avro_schema(CONTRACTS["transactions"])
    fields = {f["name"]: f for f in schema["fields"]}
    assert (schema["type"], schema["name"], schema["namespace"]) == ("record", "transactions", "feature_platform.contracts")
    assert [f["name"] for f in schema["fields"]] == list(CONTRACTS["transactions"].field_names)
    assert fields["amount_usd"]["type"] == "double"
    assert fields["device_fingerprint"]["type"] == ["null", "string"] and fields["device_fingerprint"]["default"] is None
    assert fields["event_time"]["type"] == {"type": "long", "logicalType": "timestamp-micros"}


@pytest.mark.parametrize("name", ["transactions", "labels"])
def test_spark_decodes_the_derived_schema_into_the_contracts_spark_schema(spark, name):
    contract = CONTRACTS[name]
    empty = spark.createDataFrame([], "value binary")
    decoded = empty.select(from_avro("value", json.dumps(avro_schema(contract))).alias("e")).select("e.*")
    assert [(f.name, f.dataType) for f in decoded.schema.fields] == \
        [(f.name, f.dataType) for f in contract_schema(contract).fields]


HAND_BUILT = [
    ("ok", bytes([0, 0, 0, 1, 2]) + b"\x02ab", 258, b"\x02ab", None),
    ("header-only", bytes([0, 255, 255, 255, 255]), 4_294_967_295, b"", None),
    ("wrong-magic", bytes([1, 0, 0, 0, 7]) + b"xyz", None, None, WRONG_MAGIC_BYTE),
    ("short", bytes([0, 0, 1]), None, None, TRUNCATED_HEADER),
    ("empty", b"", None, None, TRUNCATED_HEADER),
    ("null", None, None, None, TRUNCATED_HEADER),
]


@pytest.mark.parametrize("label, value, schema_id, body, error", HAND_BUILT, ids=[h[0] for h in HAND_BUILT])
def test_python_splits_the_wire_format_or_names_the_error_class(label, value, schema_id, body, error):
    if error is None:
        framed = decode_wire(value)
        assert (framed.schema_id, framed.body) == (schema_id, body)
        assert encode_wire(schema_id, body) == value
    else:
        with pytest.raises(WireFormatError) as caught:
            decode_wire(value)
        assert caught.value.error_class == error


def test_spark_splits_the_wire_format_like_python(spark):
    rows = spark.createDataFrame([(label, value) for label, value, *_ in HAND_BUILT], "label string, value binary")
    got = rows.select("label", wire_header(F.col("value")).alias("w")).select(
        "label", "w.schema_id", "w.body", "w.error_class", "w.error_reason")
    expected = spark.createDataFrame([
        ("ok", 258, bytearray(b"\x02ab"), None, None),
        ("header-only", 4_294_967_295, bytearray(b""), None, None),
        ("wrong-magic", None, None, WRONG_MAGIC_BYTE, "magic byte 1, expected 0"),
        ("short", None, None, TRUNCATED_HEADER, "3 bytes: shorter than the 5-byte header (magic byte + schema id)"),
        ("empty", None, None, TRUNCATED_HEADER, "0 bytes: shorter than the 5-byte header (magic byte + schema id)"),
        ("null", None, None, TRUNCATED_HEADER, "0 bytes: shorter than the 5-byte header (magic byte + schema id)"),
    ], "label string, schema_id long, body binary, error_class string, error_reason string")
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)


def test_encode_refuses_a_schema_id_beyond_four_bytes():
    with pytest.raises(ValueError, match="does not fit"):
        encode_wire(2**32, b"")
