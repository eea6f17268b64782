"""Avro records into bronze on hand-built bytes: decoding with the writer's schema and the
contract as reader, and every failure class with its reason, original bytes and schema id."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from datetime import datetime, timedelta, timezone

import fastavro
import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from pipelines.contracts.avro import (
    CORRUPT_PAYLOAD,
    SUBJECT_MISMATCH,
    UNKNOWN_SCHEMA_ID,
    WriterSchema,
    avro_schema,
    encode_wire,
)
from pipelines.contracts.registry import IdLookup, RegistryUnavailable, SchemaRegistry
from pipelines.contracts.validation import ValidationRules
from pipelines.core.settings import PROJECT_ROOT, SchemaRegistrySettings, StorageSettings, load_settings
from pipelines.ingest.avro_records import (
    UNRESOLVED,
    NewWriterSchema,
    decode_avro_records,
    resolve_unknown_ids,
    unresolved_ids,
)
from pipelines.ingest.bronze import bronze_rows, dead_letter_rows
from pipelines.ingest.sinks import IngestBatchWriter
from tests.support import BATCH_TIME, KAFKA_SCHEMA, kafka_row

CONTRACT = dataclasses.replace(load_settings("local", PROJECT_ROOT / "conf").contracts["transactions"], format="avro")
RULES = ValidationRules()
CURRENT = avro_schema(CONTRACT)
# Version 1 of the subject: before device_fingerprint was added (optional, default null).
OLDER = copy.deepcopy(CURRENT)
OLDER["fields"] = [f for f in OLDER["fields"] if f["name"] != "device_fingerprint"]
WRITERS = [WriterSchema(11, 1, json.dumps(OLDER)), WriterSchema(12, 2, json.dumps(CURRENT))]
SUBJECT = "transactions-value"


def event(**changes) -> dict:
    values = {
        "transaction_id": "tx-1", "account_id": "acct-1", "merchant_id": "merch-1", "amount_usd": 12.5,
        "merchant_category_code": "5411", "balance_usd": 100.0, "device_fingerprint": "abc123",
        "event_time": datetime(2026, 11, 23, 11, 59, tzinfo=timezone.utc),
    }
    values.update(changes)
    return values


def framed(schema_id: int, values: dict, schema: dict = CURRENT) -> bytes:
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(copy.deepcopy(schema)), values)
    return encode_wire(schema_id, body.getvalue())


def decode(spark, values: list[bytes | None]):
    rows = [kafka_row(v, offset=i) for i, v in enumerate(values)]
    records = spark.createDataFrame(rows, KAFKA_SCHEMA)
    return decode_avro_records(records, CONTRACT, RULES, WRITERS, batch_time=F.lit(BATCH_TIME))


def verdicts(df) -> list[tuple]:
    return [(r["kafka_offset"], r["error_class"], r["error_reason"], r["writer_schema_id"])
            for r in df.orderBy("kafka_offset").collect()]


def test_records_of_both_versions_decode_with_the_contract_as_reader(spark):
    older = {k: v for k, v in event(transaction_id="tx-old").items() if k != "device_fingerprint"}
    decoded = decode(spark, [framed(11, older, OLDER), framed(12, event(transaction_id="tx-new"))])
    expected = spark.createDataFrame(
        [("tx-old", None, 11, 1), ("tx-new", "abc123", 12, 2)],
        "transaction_id string, device_fingerprint string, writer_schema_id long, writer_schema_version int",
    )
    bronze = bronze_rows(decoded, CONTRACT)
    assert_df_equality(bronze.select(expected.columns), expected, ignore_row_order=True, ignore_nullable=True)
    row = bronze.filter("transaction_id = 'tx-new'").first()
    assert (row["amount_usd"], row["balance_usd"], row["event_time"]) == (12.5, 100.0, datetime(2026, 11, 23, 11, 59))


def test_header_failures_keep_their_class_and_reason(spark):
    assert verdicts(decode(spark, [b"\x00\x00\x01", b"\x01\x00\x00\x00\x0c" + b"abc", None])) == [
        (0, "avro_truncated_header", "3 bytes: shorter than the 5-byte header (magic byte + schema id)", None),
        (1, "avro_wrong_magic_byte", "magic byte 1, expected 0", None),
        (2, "avro_truncated_header", "0 bytes: shorter than the 5-byte header (magic byte + schema id)", None),
    ]


def test_a_body_that_does_not_decode_is_a_corrupt_payload(spark):
    good = framed(12, event())
    assert verdicts(decode(spark, [good[:-4], good[:5]])) == [
        (0, CORRUPT_PAYLOAD, f"the {len(good) - 9}-byte Avro body does not decode with schema id 12 (version 2): "
                             "truncated or corrupt", 12),
        (1, CORRUPT_PAYLOAD, "the 0-byte Avro body does not decode with schema id 12 (version 2): "
                             "truncated or corrupt", 12),
    ]


def test_contract_rules_still_apply_to_decoded_records(spark):
    checked = decode(spark, [
        framed(12, event(amount_usd=-3.0)),
        framed(12, event(balance_usd=float("nan"))),
        framed(12, event(event_time=datetime(2026, 11, 23, 12, 30, tzinfo=timezone.utc))),
        framed(12, event(event_time=datetime(2026, 11, 1, tzinfo=timezone.utc))),
    ])
    assert verdicts(checked) == [
        (0, "negative_value", "field 'amount_usd' must not be negative, got -3.0", 12),
        (1, "wrong_type", "field 'balance_usd' must be a finite number, got NaN", 12),
        (2, "future_event_time", "event_time 2026-11-23T12:30:00.000000Z is more than 5m ahead of the batch "
                                 "time 2026-11-23T12:00:00.000000Z", 12),
        (3, "stale_event_time", "event_time 2026-11-01T00:00:00.000000Z is more than 7d behind the batch "
                                "time 2026-11-23T12:00:00.000000Z", 12),
    ]


def test_dead_letters_keep_the_original_bytes_and_the_schema_id(spark):
    bad = framed(12, event(amount_usd=-3.0))
    letters = dead_letter_rows(decode(spark, [bad, b"\x07"]), CONTRACT)
    assert [(r["kafka_value"], r["schema_id"], r["error_class"]) for r in letters.orderBy("kafka_offset").collect()] == [
        (bytearray(bad), 12, "negative_value"), (bytearray(b"\x07"), None, "avro_truncated_header")]
    assert letters.filter(F.col("contract_name") != "transactions").count() == 0


def test_ids_unknown_to_the_query_are_resolved_by_the_registry(spark):
    checked = decode(spark, [framed(40, event()), framed(41, event()), framed(12, event())])
    assert unresolved_ids(checked) == [40, 41]
    lookups = {40: IdLookup(40, None), 41: IdLookup(41, json.dumps(CURRENT), (("labels-value", 3),))}
    resolved = resolve_unknown_ids(checked, lookups, SUBJECT)
    assert verdicts(resolved) == [
        (0, UNKNOWN_SCHEMA_ID, "schema id 40 is not in the schema registry", 40),
        (1, SUBJECT_MISMATCH, "schema id 41 is registered under labels-value v3, not transactions-value", 41),
        (2, None, None, 12),
    ]
    assert resolved.filter(F.col("error_class") == UNRESOLVED).count() == 0


def test_an_id_registered_under_the_subject_after_start_asks_for_a_restart(spark):
    checked = decode(spark, [framed(13, event())])
    with pytest.raises(NewWriterSchema, match="schema id.s. 13 were registered under transactions-value"):
        resolve_unknown_ids(checked, {13: IdLookup(13, json.dumps(CURRENT), ((SUBJECT, 3),))}, SUBJECT)


def test_an_unreachable_registry_fails_the_batch_and_writes_nothing(spark, tmp_path):
    settings = load_settings("local", PROJECT_ROOT / "conf")
    storage = StorageSettings(str(tmp_path / "lake"))
    down = SchemaRegistry(SchemaRegistrySettings(url="http://127.0.0.1:9/apis/ccompat/v7",
                                                 timeout=timedelta(seconds=2)))
    writer = IngestBatchWriter("transactions", CONTRACT, settings.kafka, storage, publish_dead_letters=False,
                               registry=down)
    # A good record of a known version, and one whose id the query does not know.
    batch = decode(spark, [framed(12, event()), framed(40, event(transaction_id="tx-2"))])
    with pytest.raises(RegistryUnavailable, match="schema registry http://127.0.0.1:9/apis/ccompat/v7 unreachable"):
        writer.write_batch(batch, 0, "ingest:test")
    assert not (tmp_path / "lake").exists()
