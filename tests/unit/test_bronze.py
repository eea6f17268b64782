"""The bronze transforms on static DataFrames: parsing, the dead-letter projection, deduplication."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from pipelines.contracts.validation import ValidationRules
from pipelines.core.contract_spec import load_contracts, parse_contract
from pipelines.core.errors import ConfigError
from pipelines.core.settings import PROJECT_ROOT
from pipelines.ingest.bronze import bronze_rows, dead_letter_messages, dead_letter_rows, drop_duplicate_events
from pipelines.ingest.json_records import validate_records
from tests.support import BATCH_TIME, KAFKA_SCHEMA, encode, kafka_row, naive, transaction

CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")
TX = CONTRACTS["transactions"]
RULES = ValidationRules(max_value_bytes=400, future_tolerance=timedelta(minutes=5), max_event_age=timedelta(days=7))


def validated(spark, rows):
    records = spark.createDataFrame(rows, KAFKA_SCHEMA)
    return validate_records(records, TX, RULES, batch_time=F.lit(BATCH_TIME))


def renamed() -> bytes:
    event = transaction()
    event["account_balance"] = event.pop("balance_usd")
    return encode(event)


BAD_RECORDS = [
    # (offset, value, error_class, reason)
    (10, b"{" + b" " * 420 + b"}", "oversize", "value is 422 bytes, over the limit of 400 bytes"),
    (11, b'{"a":"\xff"}', "not_utf8", "value is not UTF-8: invalid byte at position 6"),
    (12, b"[1]", "not_json", "value is a JSON array, expected an object"),
    (13, renamed(), "renamed_field",
     "required field 'balance_usd' is missing; undeclared field 'account_balance' is present (renamed upstream?)"),
    (14, encode(transaction(_drop=["merchant_id"])), "missing_field", "required field 'merchant_id' is missing"),
    (15, encode(transaction(promo="X")), "unknown_field", "undeclared field 'promo' (contract 'transactions' v1 is strict)"),
    (16, encode(transaction(account_id=None)), "null_field", "required field 'account_id' is null"),
    (17, encode(transaction(amount_usd="1.00")), "wrong_type", "field 'amount_usd' must be a finite number, got string \"1.00\""),
    (18, encode(transaction(balance_usd=-1)), "negative_value", "field 'balance_usd' must not be negative, got -1"),
    (19, encode(transaction(event_time="2026-11-23T13:00:00Z")), "future_event_time",
     "event_time 2026-11-23T13:00:00+00:00 is 1h ahead of the batch time 2026-11-23T12:00:00+00:00, beyond the tolerance of 5m"),
    (20, encode(transaction(event_time="2026-11-01T00:00:00Z")), "stale_event_time",
     "event_time 2026-11-01T00:00:00+00:00 is 22d 12h behind the batch time 2026-11-23T12:00:00+00:00, beyond the horizon of 7d"),
]


def test_every_bad_record_class_reaches_the_dead_letter_rows_with_reason_and_original_bytes(spark):
    header = [("trace-id", b"abc")]
    rows = [kafka_row(value, offset, partition=1, headers=header) for offset, value, _, _ in BAD_RECORDS]
    rows.append(kafka_row(encode(transaction()), 21, partition=1))  # one valid record: not a dead letter
    out = dead_letter_rows(validated(spark, rows), TX)
    expected = spark.createDataFrame(
        [
            ("transactions", 1, offset, naive("2026-11-23 11:59:30"), b"acct-1", bytearray(value),
             [("trace-id", bytearray(b"abc"))], error_class, reason, None, "transactions", 1,
             naive("2026-11-23 12:00:00"), date(2026, 11, 23))
            for offset, value, error_class, reason in BAD_RECORDS
        ],
        out.schema,
    )
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True)


def test_valid_record_becomes_a_typed_bronze_row_partitioned_by_event_date(spark):
    rows = [kafka_row(encode(transaction(event_time="2026-11-22T23:30:00-01:00")), 5, partition=3,
                      headers=[("source", b"pos")])]
    out = bronze_rows(validated(spark, rows), TX)
    expected = spark.createDataFrame(
        [("tx-1", "acct-1", "merch-1", 12.5, "5411", 100.0, "abc123", naive("2026-11-23 00:30:00"),
          "transactions", 3, 5, naive("2026-11-23 11:59:30"), [("source", bytearray(b"pos"))],
          naive("2026-11-23 12:00:00"), date(2026, 11, 23))],
        out.schema,
    )
    assert_df_equality(out, expected, ignore_nullable=True)


def test_invalid_records_carry_no_parsed_fields(spark):
    out = validated(spark, [kafka_row(renamed(), 1)]).select("transaction_id", "balance_usd", "error_class")
    assert out.collect() == [(None, None, "renamed_field")]


def test_repeated_delivery_keeps_the_earliest_and_drops_the_rest(spark):
    first = encode(transaction(transaction_id="tx-9", amount_usd=1.0))
    again = encode(transaction(transaction_id="tx-9", amount_usd=2.0))
    rows = [
        kafka_row(again, 8, timestamp="2026-11-23 11:59:40"),
        kafka_row(first, 3, timestamp="2026-11-23 11:59:31"),
        kafka_row(encode(transaction(transaction_id="tx-10")), 4),
    ]
    out = bronze_rows(drop_duplicate_events(validated(spark, rows), TX, RULES), TX)
    assert_df_equality(
        out.select("transaction_id", "amount_usd", "kafka_offset"),
        spark.createDataFrame([("tx-9", 1.0, 3), ("tx-10", 12.5, 4)], "transaction_id string, amount_usd double, kafka_offset long"),
        ignore_row_order=True, ignore_nullable=True,
    )


def test_identical_invalid_records_are_all_kept(spark):
    rows = [kafka_row(b"oops", 1), kafka_row(b"oops", 2), kafka_row(b"oops", 1, partition=1)]
    out = dead_letter_rows(drop_duplicate_events(validated(spark, rows), TX, RULES), TX)
    assert sorted((r.kafka_partition, r.kafka_offset) for r in out.collect()) == [(0, 1), (0, 2), (1, 1)]


def test_dead_letter_messages_keep_the_original_and_name_the_error(spark):
    rows = [kafka_row(b"[1]", 7, partition=2, headers=[("trace-id", b"abc")])]
    message = dead_letter_messages(dead_letter_rows(validated(spark, rows), TX)).collect()[0]
    assert (bytes(message.key), bytes(message.value)) == (b"acct-1", b"[1]")
    assert [(h.key, bytes(h.value)) for h in message.headers] == [
        ("trace-id", b"abc"),
        ("dlq.error_class", b"not_json"),
        ("dlq.error_reason", b"value is a JSON array, expected an object"),
        ("dlq.source_topic", b"transactions"),
        ("dlq.source_partition", b"2"),
        ("dlq.source_offset", b"7"),
        ("dlq.failed_at", b"2026-11-23T12:00:00.000Z"),
    ]


@pytest.mark.parametrize("name", ["kafka_offset", "error_class", "event_date"])
def test_contract_fields_may_not_take_reserved_names(name):
    data = {"name": "x", "version": 1, "key_field": "k", "id_field": "k", "event_time_field": "t",
            "fields": [{"name": "k", "type": "string"}, {"name": "t", "type": "timestamp"},
                       {"name": name, "type": "string"}]}
    with pytest.raises(ConfigError, match=f"fields\\[2\\].name: '{name}' is reserved"):
        parse_contract(data, "x.yaml")
