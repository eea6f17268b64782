"""JSON record validation (Spark SQL, :func:`pipelines.ingest.json_records.validate_records`),
rule by rule, one record at a time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from pyspark.sql import functions as F

from pipelines.contracts.validation import ValidationRules
from pipelines.core.contract_spec import load_contracts
from pipelines.core.settings import PROJECT_ROOT
from pipelines.ingest.json_records import parse_timestamp, validate_records
from tests.support import BATCH_TIME, KAFKA_SCHEMA, encode, kafka_row, naive, transaction

CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")
RULES = ValidationRules(max_value_bytes=1024, future_tolerance=timedelta(minutes=5), max_event_age=timedelta(days=7))


@dataclass(frozen=True)
class Verdict:
    values: dict[str, Any] | None
    error_class: str | None
    reason: str | None

    @property
    def is_valid(self) -> bool:
        return self.error_class is None


def verdicts(spark, values: list[bytes | None], contract: str = "transactions") -> list[Verdict]:
    """The verdict on each value, in one Spark job (planning the checks takes about a second)."""
    records = spark.createDataFrame([kafka_row(v, i, topic=contract) for i, v in enumerate(values)], KAFKA_SCHEMA)
    rows = validate_records(records, CONTRACTS[contract], RULES, batch_time=F.lit(BATCH_TIME)).collect()
    names = CONTRACTS[contract].field_names
    return [Verdict({n: row[n] for n in names} if row.error_class is None else None, row.error_class, row.error_reason)
            for row in sorted(rows, key=lambda r: r.kafka_offset)]


@pytest.fixture(scope="module")
def check(spark):
    def verdict(value: bytes | None, contract: str = "transactions") -> Verdict:
        return verdicts(spark, [value], contract)[0]

    return verdict


def test_valid_transaction_is_typed(check):
    verdict = check(encode(transaction(balance_usd=100)))
    assert verdict.is_valid
    assert verdict.values == {
        "transaction_id": "tx-1", "account_id": "acct-1", "merchant_id": "merch-1", "amount_usd": 12.5,
        "merchant_category_code": "5411", "balance_usd": 100.0, "device_fingerprint": "abc123",
        "event_time": naive("2026-11-23 11:59:00"),
    }
    assert isinstance(verdict.values["balance_usd"], float)


def test_optional_field_may_be_absent_or_null(check):
    assert check(encode(transaction(_drop=["device_fingerprint"]))).values["device_fingerprint"] is None
    assert check(encode(transaction(device_fingerprint=None))).values["device_fingerprint"] is None


def test_oversize_value_is_rejected_before_parsing(check):
    verdict = check(b"{" + b" " * 1100 + b"}")
    assert (verdict.error_class, verdict.reason) == ("oversize", "value is 1102 bytes, over the limit of 1024 bytes")


def test_value_at_exactly_the_size_limit_is_parsed(check):
    value = encode(transaction())
    padded = value[:-1] + b" " * (1024 - len(value)) + b"}"
    assert len(padded) == 1024
    assert check(padded).is_valid


def test_invalid_utf8_is_rejected_with_the_byte_position(check):
    verdict = check(b'{"a":"\xff"}')
    assert (verdict.error_class, verdict.reason) == ("not_utf8", "value is not UTF-8: invalid byte at position 6")


SYNTAX = "value is not JSON: invalid syntax (or NaN, Infinity, a comment, a control character)"
EXTRA = "value is not JSON: extra data after the first JSON value"


NOT_JSON = [
    (b'{"transaction_id": "tx-1", ', SYNTAX),
    (encode(transaction()) + encode(transaction()), EXTRA),
    (encode(transaction()) + b" x", EXTRA),
    # A text that closes the wrapping array itself, then appends garbage.
    (encode(transaction()) + b",1]garbage", EXTRA),
    (encode(transaction()) + b',"~"]garbage', EXTRA),  # ... with the wrapping's own sentinel
    (encode(transaction()) + b"]", EXTRA),
    (encode(transaction()) + b"\n", None),
    (b"[1, 2]", "value is a JSON array, expected an object"),
    (b'"tx-1"', "value is a JSON string, expected an object"),
    (b" 42", "value is a JSON number, expected an object"),
    (b"", "value is empty, expected a JSON object"),
    (b" \n", "value is empty, expected a JSON object"),
    (None, "value is null (a tombstone), expected a JSON object"),
    (b'{"amount_usd": NaN}', SYNTAX),
    (b'{"amount_usd": Infinity}', SYNTAX),
    (b"{'account_id': 'a'}", SYNTAX),
    (b'{"account_id": "a" /* c */}', SYNTAX),
    (b'{"account_id": "a\x01"}', SYNTAX),
    (b'{"account_id": "a", "account_id": "b"}', "value has the key 'account_id' twice"),
    (b'{"b": 1, "a": 2, "a": 3, "b": 4}', "value has the key 'a' twice"),
]
NOT_JSON_IDS = ["truncated", "two-objects-glued", "trailing-text", "forged-array-close", "forged-sentinel",
                "trailing-bracket",
                "trailing-newline-is-fine", "array", "string", "number", "empty", "whitespace", "tombstone", "nan",
                "infinity", "single-quotes", "comment", "control-character", "duplicate-key", "first-repeated-key"]


@pytest.fixture(scope="module")
def not_json_verdicts(spark):
    return verdicts(spark, [value for value, _ in NOT_JSON])


@pytest.mark.parametrize("case", range(len(NOT_JSON)), ids=NOT_JSON_IDS)
def test_not_json(not_json_verdicts, case):
    verdict, reason = not_json_verdicts[case], NOT_JSON[case][1]
    if reason is None:  # whitespace after the object is JSON
        assert verdict.is_valid
    else:
        assert (verdict.error_class, verdict.reason) == ("not_json", reason)


def test_renamed_field_is_rejected_not_read_as_null_or_zero(check):
    event = transaction()
    event["account_balance"] = event.pop("balance_usd")
    verdict = check(encode(event))
    assert verdict.values is None
    assert (verdict.error_class, verdict.reason) == (
        "renamed_field",
        "required field 'balance_usd' is missing; undeclared field 'account_balance' is present (renamed upstream?)",
    )


def test_missing_required_field(check):
    verdict = check(encode(transaction(_drop=["merchant_id"])))
    assert (verdict.error_class, verdict.reason) == ("missing_field", "required field 'merchant_id' is missing")


def test_many_missing_fields_and_one_stray_key_is_missing_not_renamed(check):
    verdict = check(b'{"note": "hello"}')
    assert verdict.error_class == "missing_field"
    assert verdict.reason.endswith("required field 'event_time' is missing; undeclared field 'note' is present")


def test_unknown_field_in_strict_contract(check):
    verdict = check(encode(transaction(promo_code="X")))
    assert (verdict.error_class, verdict.reason) == (
        "unknown_field", "undeclared field 'promo_code' (contract 'transactions' v1 is strict)"
    )


def test_null_in_required_field(check):
    verdict = check(encode(transaction(amount_usd=None)))
    assert (verdict.error_class, verdict.reason) == ("null_field", "required field 'amount_usd' is null")


WRONG_TYPES = [
    ({"amount_usd": "12.50"}, "field 'amount_usd' must be a finite number, got string \"12.50\""),
    ({"amount_usd": True}, "field 'amount_usd' must be a finite number, got boolean true"),
    ({"account_id": 42}, "field 'account_id' must be a string, got number 42"),
    ({"event_time": 1795435140}, "field 'event_time' must be an ISO-8601 timestamp string with a UTC offset, got number 1795435140"),
    ({"event_time": "2026-11-23T11:59:00"}, "field 'event_time' must be an ISO-8601 timestamp string with a UTC offset, got string \"2026-11-23T11:59:00\""),
    ({"event_time": "yesterday"}, "field 'event_time' must be an ISO-8601 timestamp string with a UTC offset, got string \"yesterday\""),
    ({"amount_usd": 10**400}, "field 'amount_usd' must be a finite number, got number 1" + "0" * 36 + "..."),
]
WRONG_TYPE_IDS = ["quoted-number", "boolean-as-number", "number-as-string", "epoch-timestamp", "naive-timestamp", "free-text-time", "beyond-double"]


@pytest.fixture(scope="module")
def wrong_type_verdicts(spark):
    return verdicts(spark, [encode(transaction(**changes)) for changes, _ in WRONG_TYPES])


@pytest.mark.parametrize("case", range(len(WRONG_TYPES)), ids=WRONG_TYPE_IDS)
def test_wrong_type_is_never_coerced(wrong_type_verdicts, case):
    verdict, reason = wrong_type_verdicts[case], WRONG_TYPES[case][1]
    assert (verdict.error_class, verdict.reason) == ("wrong_type", reason)


def test_wrong_type_in_labels_boolean(check):
    label = {"transaction_id": "tx-1", "account_id": "acct-1", "is_fraud": "false", "label_time": "2026-11-23T11:00:00Z"}
    verdict = check(encode(label), "labels")
    assert (verdict.error_class, verdict.reason) == ("wrong_type", "field 'is_fraud' must be true or false, got string \"false\"")


def test_negative_amount_is_rejected(check):
    verdict = check(encode(transaction(amount_usd=-3.5)))
    assert (verdict.error_class, verdict.reason) == ("negative_value", "field 'amount_usd' must not be negative, got -3.5")


def test_zero_amount_is_valid(check):
    assert check(encode(transaction(amount_usd=0, balance_usd=0))).is_valid


def test_event_beyond_future_tolerance_is_quarantined(check):
    verdict = check(encode(transaction(event_time="2026-11-23T12:05:01Z")))
    assert (verdict.error_class, verdict.reason) == (
        "future_event_time",
        "event_time 2026-11-23T12:05:01+00:00 is 5m 1s ahead of the batch time 2026-11-23T12:00:00+00:00, "
        "beyond the tolerance of 5m",
    )


def test_reasons_give_a_fractional_gap_in_whole_seconds(check):
    verdict = check(encode(transaction(event_time="2026-11-23T12:07:02.703Z")))
    assert verdict.reason == (
        "event_time 2026-11-23T12:07:02.703000+00:00 is 7m 2s ahead of the batch time 2026-11-23T12:00:00+00:00, "
        "beyond the tolerance of 5m"
    )


def test_event_exactly_at_future_tolerance_is_valid(check):
    assert check(encode(transaction(event_time="2026-11-23T12:05:00Z"))).is_valid


def test_event_older_than_horizon_is_stale(check):
    verdict = check(encode(transaction(event_time="2026-11-16T11:59:59Z")))
    assert (verdict.error_class, verdict.reason) == (
        "stale_event_time",
        "event_time 2026-11-16T11:59:59+00:00 is 7d 1s behind the batch time 2026-11-23T12:00:00+00:00, "
        "beyond the horizon of 7d",
    )


def test_event_exactly_at_horizon_is_valid(check):
    assert check(encode(transaction(event_time="2026-11-16T12:00:00Z"))).is_valid


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("2026-11-23T13:59:00+02:00", "2026-11-23 11:59:00"),
        ("2026-11-23T13:59:00+0200", "2026-11-23 11:59:00"),
        ("2026-11-23T09:59-02", "2026-11-23 11:59:00"),
        ("2026-11-23T11:59:00.123Z", "2026-11-23 11:59:00.123"),
        ("2026-11-23T11:59:00.1234567Z", "2026-11-23 11:59:00.123456"),
        ("2026-11-23T11:59Z", "2026-11-23 11:59:00"),
        ("2026-11-23T11:59:00,5Z", None),
        ("2026-11-23", None),
        ("2026-11-23T11:59:00", None),
        ("2026-11-23 11:59:00Z", None),
        ("2026-02-30T11:59:00Z", None),
        ("2026-11-23T24:00:00Z", None),
        ("2026-11-23T11:59:60Z", None),
        ("2026-11-23T11:59:00UTC", None),
    ],
)
def test_timestamp_text_and_its_utc_instant(spark, text, parsed):
    row = spark.range(1).select(parse_timestamp(F.lit(text)).alias("t")).collect()[0]
    assert row.t == (naive(parsed) if parsed else None)
