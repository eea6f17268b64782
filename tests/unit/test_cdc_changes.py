"""Debezium change events -> change rows (:func:`pipelines.cdc.changes.change_rows`).

The envelopes are shaped as Debezium 3.6.1's PostgreSQL connector wrote them on the local
platform (docs/design/cdc-prototype/FINDINGS.md, section 6), cut to the fields read here."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from chispa import assert_df_equality
from pyspark.sql import Row
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BooleanType,
    DoubleType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from pipelines.cdc.changes import change_rows
from pipelines.contracts.validation import ValidationRules
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.ingest.records import KAFKA_RECORD_SCHEMA

TOPIC = "cdc.public.accounts"
T0 = datetime(2026, 12, 4, 13, 40, 48, 849165, tzinfo=timezone.utc)
T0_US = 1796391648849165  # T0 in µs since the epoch
ROW = {"account_id": "acct-1", "status": "active", "credit_limit": 1000.0, "home_country": "DE",
       "updated_at": "2026-12-04T13:38:59.071382Z"}


@pytest.fixture(scope="module")
def contract():
    return load_settings("local", PROJECT_ROOT / "conf").contracts["accounts"]


@pytest.fixture(scope="module")
def rules():
    settings = load_settings("local", PROJECT_ROOT / "conf")
    return ValidationRules.of(settings.ingest)


def envelope(op, after=None, before=None, lsn=26640960, tx=743, ts_us=T0_US, snapshot="false", **extra):
    return json.dumps({"before": before, "after": after, "op": op,
                       "source": {"version": "3.6.1.Final", "connector": "postgresql", "name": "cdc",
                                  "ts_ms": ts_us // 1000, "snapshot": snapshot, "db": "app",
                                  "ts_us": ts_us, "schema": "public", "table": "accounts", "txId": tx, "lsn": lsn},
                       "transaction": None, "ts_ms": ts_us // 1000 + 300, **extra})


def record(offset, value, key="acct-1"):
    key_bytes = None if key is None else json.dumps({"account_id": key}).encode()
    value_bytes = None if value is None else (value if isinstance(value, bytes) else value.encode())
    return (key_bytes, value_bytes, TOPIC, 0, offset, T0, None)


def changes(spark, contract, rules, records, columns):
    frame = spark.createDataFrame(records, KAFKA_RECORD_SCHEMA)
    return change_rows(frame, contract, rules, batch_time=F.lit(T0)).select(*columns)


def test_inserts_updates_snapshot_reads_and_deletes_become_typed_change_rows(spark, contract, rules):
    records = [
        record(0, envelope("r", ROW, lsn=100, tx=740, snapshot="first")),
        record(1, envelope("u", {**ROW, "status": "frozen", "credit_limit": 1500.5}, lsn=200, tx=743)),
        # With the default replica identity, a delete's before holds the key and type defaults.
        record(2, envelope("d", before={"account_id": "acct-1", "status": "", "credit_limit": 0.0,
                                        "home_country": "", "updated_at": "1970-01-01T00:00:00.000000Z"}, lsn=300, tx=744)),
        record(3, None),  # the delete's tombstone
        record(4, envelope("c", {**ROW, "account_id": "acct-2", "credit_limit": 7}, lsn=400, tx=745), key="acct-2"),
    ]
    columns = ["kafka_offset", "account_id", "status", "credit_limit", "home_country", "updated_at", "cdc_op", "cdc_lsn",
               "cdc_tx_id", "cdc_commit_time", "cdc_snapshot", "cdc_deleted", "cdc_tombstone", "error_class"]
    schema = StructType([
        StructField("kafka_offset", LongType()), StructField("account_id", StringType()),
        StructField("status", StringType()), StructField("credit_limit", DoubleType()),
        StructField("home_country", StringType()), StructField("updated_at", TimestampType()),
        StructField("cdc_op", StringType()), StructField("cdc_lsn", LongType()), StructField("cdc_tx_id", LongType()),
        StructField("cdc_commit_time", TimestampType()), StructField("cdc_snapshot", BooleanType()),
        StructField("cdc_deleted", BooleanType()), StructField("cdc_tombstone", BooleanType()),
        StructField("error_class", StringType()),
    ])
    updated = datetime(2026, 12, 4, 13, 38, 59, 71382, tzinfo=timezone.utc)
    expected = spark.createDataFrame([
        (0, "acct-1", "active", 1000.0, "DE", updated, "r", 100, 740, T0, True, False, False, None),
        (1, "acct-1", "frozen", 1500.5, "DE", updated, "u", 200, 743, T0, False, False, False, None),
        (2, "acct-1", None, None, None, None, "d", 300, 744, T0, False, True, False, None),
        (3, None, None, None, None, None, None, None, None, None, None, None, True, None),
        (4, "acct-2", "active", 7.0, "DE", updated, "c", 400, 745, T0, False, False, False, None),
    ], schema)
    assert_df_equality(changes(spark, contract, rules, records, columns), expected, ignore_row_order=True,
                       ignore_nullable=True)


@pytest.mark.parametrize("value, error_class, reason", [
    ("not json", "not_json", "value is not a JSON object (a Debezium change event)"),
    ('["c"]', "not_json", "value is not a JSON object (a Debezium change event)"),
    (envelope("x", ROW), "bad_envelope", "the change event's op x is not one of c, u, d, r"),
    (envelope("u", None), "bad_envelope", "the change event's op is u and it has no 'after'"),
    (envelope("c", ROW, lsn=None), "bad_envelope", "the change event's source has no 'lsn' or no 'ts_us' (commit time)"),
    (envelope("u", {k: v for k, v in ROW.items() if k != "home_country"}), "missing_field",
     "'after': required field 'home_country' is missing"),
    (envelope("u", {**ROW, "credit_limit": "1000.00"}), "wrong_type",
     "'after': field 'credit_limit' must be a finite number, got string \"1000.00\""),
    # A column renamed in the table: one declared column gone, one undeclared there.
    (envelope("u", {**{k: v for k, v in ROW.items() if k != "status"}, "state": "active"}), "renamed_field",
     "'after': required field 'status' is missing; undeclared field 'state' is present (renamed upstream?)"),
    (envelope("c", {**ROW, "account_id": "acct-9"}), "key_mismatch", "'after' has account_id acct-9, the message key acct-1"),
    (envelope("c", ROW)[:-1], "not_json", "value is not a JSON object (a Debezium change event)"),  # cut short
])
def test_a_bad_change_event_gets_its_class_and_reason_and_keeps_its_bytes(spark, contract, rules, value, error_class, reason):
    [row] = changes(spark, contract, rules, [record(7, value)],
                    ["error_class", "error_reason", "kafka_value", "cdc_op", "account_id"]).collect()
    assert (row.error_class, row.error_reason) == (error_class, reason)
    assert bytes(row.kafka_value) == value.encode()
    assert (row.cdc_op, row.account_id) == (None, None)


def test_a_key_that_is_not_the_tables_is_refused(spark, contract, rules):
    frame = spark.createDataFrame([(b'{"id": 1}', envelope("c", ROW).encode(), TOPIC, 0, 0, T0, None)],
                                  KAFKA_RECORD_SCHEMA)
    [row] = change_rows(frame, contract, rules, batch_time=F.lit(T0)).select("error_class", "error_reason").collect()
    assert row == Row(error_class="bad_key", error_reason="the message key has no 'account_id': not a key of this table")


def test_a_column_the_table_gained_is_kept_beside_the_declared_ones(spark, contract, rules):
    [row] = changes(spark, contract, rules, [record(0, envelope("u", {**ROW, "tier": "gold", "score": 3.5}))],
                    ["error_class", "status", "cdc_extra"]).collect()
    assert (row.error_class, row.status, row.cdc_extra) == (None, "active", {"tier": "gold", "score": "3.5"})


def test_valid_changes_keep_no_copy_of_their_bytes(spark, contract, rules):
    [row] = changes(spark, contract, rules, [record(0, envelope("c", ROW))], ["kafka_value", "error_class"]).collect()
    assert row == Row(kafka_value=None, error_class=None)
