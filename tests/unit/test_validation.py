"""The record validator, rule by rule (pure Python: no Spark needed to pin the semantics)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pipelines.contracts.validation import RecordValidator, ValidationRules, parse_timestamp
from pipelines.core.contract_spec import load_contracts
from pipelines.core.settings import PROJECT_ROOT
from tests.support import BATCH_TIME, encode, transaction, utc

CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")
RULES = ValidationRules(max_value_bytes=1024, future_tolerance=timedelta(minutes=5), max_event_age=timedelta(days=7))


def check(value: bytes | None, contract: str = "transactions"):
    return RecordValidator(CONTRACTS[contract], RULES).validate(value, BATCH_TIME)


def test_valid_transaction_is_typed():
    verdict = check(encode(transaction(balance_usd=100)))
    assert verdict.is_valid
    assert verdict.values == {
        "transaction_id": "tx-1", "account_id": "acct-1", "merchant_id": "merch-1", "amount_usd": 12.5,
        "merchant_category_code": "5411", "balance_usd": 100.0, "device_fingerprint": "abc123",
        "event_time": utc("2026-11-23 11:59:00"),
    }
    assert isinstance(verdict.values["balance_usd"], float)


def test_optional_field_may_be_absent_or_null():
    assert check(encode(transaction(_drop=["device_fingerprint"]))).values["device_fingerprint"] is None
    assert check(encode(transaction(device_fingerprint=None))).values["device_fingerprint"] is None


def test_oversize_value_is_rejected_before_parsing():
    verdict = check(b"{" + b" " * 1100 + b"}")
    assert (verdict.error_class, verdict.reason) == ("oversize", "value is 1102 bytes, over the limit of 1024 bytes")


def test_value_at_exactly_the_size_limit_is_parsed():
    value = encode(transaction())
    padded = value[:-1] + b" " * (1024 - len(value)) + b"}"
    assert len(padded) == 1024
    assert check(padded).is_valid


def test_invalid_utf8_is_rejected_with_the_byte_position():
    verdict = check(b'{"a":"\xff"}')
    assert (verdict.error_class, verdict.reason) == ("not_utf8", "value is not UTF-8: invalid byte at position 6")


@pytest.mark.parametrize(
    "value, reason",
    [
        (b'{"transaction_id": "tx-1", ', "value is not JSON: Expecting property name enclosed in double quotes at line 1 column 28"),
        # The second object starts right after the first one's last byte.
        (encode(transaction()) + encode(transaction()),
         f"value is not JSON: Extra data at line 1 column {len(encode(transaction())) + 1}"),
        (b"[1, 2]", "value is a JSON array, expected an object"),
        (b'"tx-1"', "value is a JSON string, expected an object"),
        (b"", "value is empty, expected a JSON object"),
        (None, "value is null (a tombstone), expected a JSON object"),
        (b'{"amount_usd": NaN}', "value is not JSON: NaN is not a JSON number"),
        (b'{"account_id": "a", "account_id": "b"}', "value has the key 'account_id' twice"),
    ],
    ids=["truncated", "two-objects-glued", "array", "string", "empty", "tombstone", "nan", "duplicate-key"],
)
def test_not_json(value, reason):
    verdict = check(value)
    assert (verdict.error_class, verdict.reason) == ("not_json", reason)


def test_renamed_field_is_rejected_not_read_as_null_or_zero():
    event = transaction()
    event["account_balance"] = event.pop("balance_usd")
    verdict = check(encode(event))
    assert verdict.values is None
    assert (verdict.error_class, verdict.reason) == (
        "renamed_field",
        "required field 'balance_usd' is missing; undeclared field 'account_balance' is present (renamed upstream?)",
    )


def test_missing_required_field():
    verdict = check(encode(transaction(_drop=["merchant_id"])))
    assert (verdict.error_class, verdict.reason) == ("missing_field", "required field 'merchant_id' is missing")


def test_many_missing_fields_and_one_stray_key_is_missing_not_renamed():
    verdict = check(b'{"note": "hello"}')
    assert verdict.error_class == "missing_field"
    assert verdict.reason.endswith("required field 'event_time' is missing; undeclared field 'note' is present")


def test_unknown_field_in_strict_contract():
    verdict = check(encode(transaction(promo_code="X")))
    assert (verdict.error_class, verdict.reason) == (
        "unknown_field", "undeclared field 'promo_code' (contract 'transactions' v1 is strict)"
    )


def test_null_in_required_field():
    verdict = check(encode(transaction(amount_usd=None)))
    assert (verdict.error_class, verdict.reason) == ("null_field", "required field 'amount_usd' is null")


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"amount_usd": "12.50"}, "field 'amount_usd' must be a finite number, got string \"12.50\""),
        ({"amount_usd": True}, "field 'amount_usd' must be a finite number, got boolean true"),
        ({"account_id": 42}, "field 'account_id' must be a string, got number 42"),
        ({"event_time": 1795435140}, "field 'event_time' must be an ISO-8601 timestamp string with a UTC offset, got number 1795435140"),
        ({"event_time": "2026-11-23T11:59:00"}, "field 'event_time' must be an ISO-8601 timestamp string with a UTC offset, got string \"2026-11-23T11:59:00\""),
        ({"event_time": "yesterday"}, "field 'event_time' must be an ISO-8601 timestamp string with a UTC offset, got string \"yesterday\""),
        ({"amount_usd": 10**400}, "field 'amount_usd' must be a finite number, got number 1" + "0" * 36 + "..."),
    ],
    ids=["quoted-number", "boolean-as-number", "number-as-string", "epoch-timestamp", "naive-timestamp", "free-text-time", "beyond-double"],
)
def test_wrong_type_is_never_coerced(changes, reason):
    verdict = check(encode(transaction(**changes)))
    assert (verdict.error_class, verdict.reason) == ("wrong_type", reason)


def test_wrong_type_in_labels_boolean():
    label = {"transaction_id": "tx-1", "account_id": "acct-1", "is_fraud": "false", "label_time": "2026-11-23T11:00:00Z"}
    verdict = check(encode(label), "labels")
    assert (verdict.error_class, verdict.reason) == ("wrong_type", "field 'is_fraud' must be true or false, got string \"false\"")


def test_negative_amount_is_rejected():
    verdict = check(encode(transaction(amount_usd=-3.5)))
    assert (verdict.error_class, verdict.reason) == ("negative_value", "field 'amount_usd' must not be negative, got -3.5")


def test_zero_amount_is_valid():
    assert check(encode(transaction(amount_usd=0, balance_usd=0))).is_valid


def test_event_beyond_future_tolerance_is_quarantined():
    verdict = check(encode(transaction(event_time="2026-11-23T12:05:01Z")))
    assert (verdict.error_class, verdict.reason) == (
        "future_event_time",
        "event_time 2026-11-23T12:05:01+00:00 is 5m 1s ahead of the batch time 2026-11-23T12:00:00+00:00, "
        "beyond the tolerance of 5m",
    )


def test_reasons_give_a_fractional_gap_in_whole_seconds():
    verdict = check(encode(transaction(event_time="2026-11-23T12:07:02.703Z")))
    assert verdict.reason == (
        "event_time 2026-11-23T12:07:02.703000+00:00 is 7m 2s ahead of the batch time 2026-11-23T12:00:00+00:00, "
        "beyond the tolerance of 5m"
    )


def test_event_exactly_at_future_tolerance_is_valid():
    assert check(encode(transaction(event_time="2026-11-23T12:05:00Z"))).is_valid


def test_event_older_than_horizon_is_stale():
    verdict = check(encode(transaction(event_time="2026-11-16T11:59:59Z")))
    assert (verdict.error_class, verdict.reason) == (
        "stale_event_time",
        "event_time 2026-11-16T11:59:59+00:00 is 7d 1s behind the batch time 2026-11-23T12:00:00+00:00, "
        "beyond the horizon of 7d",
    )


def test_event_exactly_at_horizon_is_valid():
    assert check(encode(transaction(event_time="2026-11-16T12:00:00Z"))).is_valid


def test_timestamp_offsets_are_normalised_to_utc():
    assert parse_timestamp("2026-11-23T13:59:00+02:00") == utc("2026-11-23 11:59:00")
    assert parse_timestamp("2026-11-23T11:59:00.123Z") == utc("2026-11-23 11:59:00.123")
    assert parse_timestamp("2026-11-23") is None
