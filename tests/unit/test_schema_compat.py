"""Field-level compatibility rules (pure, no registry): hand-written schemas, expected verdicts
from the Avro specification's resolution rules."""

from __future__ import annotations

from pipelines.contracts.compat import can_read, compatibility_problems, field_changes, problems_against

TS = {"type": "long", "logicalType": "timestamp-micros"}


def record(*fields: dict) -> dict:
    return {"type": "record", "name": "transactions", "namespace": "t", "fields": list(fields)}


V1 = record({"name": "transaction_id", "type": "string"}, {"name": "account_balance", "type": "double"},
            {"name": "event_time", "type": TS})


def test_a_renamed_field_breaks_full_naming_both_fields():
    renamed = record({"name": "transaction_id", "type": "string"}, {"name": "balance_usd", "type": "double"},
                     {"name": "event_time", "type": TS})
    problems = compatibility_problems(V1, renamed, "FULL", "version 1")
    assert {p.direction for p in problems} >= {"BACKWARD", "FORWARD"}
    text = "\n".join(map(str, problems))
    assert "'balance_usd' (double) is added without a default" in text
    assert "'account_balance' (double, no default in version 1) is removed" in text
    assert "'account_balance' -> 'balance_usd' looks like a rename" in text


def test_an_optional_field_with_a_default_passes_full():
    added = record(*V1["fields"], {"name": "channel", "type": ["null", "string"], "default": None})
    assert compatibility_problems(V1, added, "FULL") == []
    assert field_changes(V1, added) == ["+ channel: optional string (default null)"]


def test_a_required_field_without_default_breaks_backward_only():
    added = record(*V1["fields"], {"name": "channel", "type": "string"})
    assert [p.direction for p in compatibility_problems(V1, added, "FULL")] == ["BACKWARD"]
    assert compatibility_problems(V1, added, "FORWARD") == []


def test_making_an_optional_field_required_breaks_backward():
    old = record({"name": "device", "type": ["null", "string"], "default": None})
    new = record({"name": "device", "type": "string"})
    problems = compatibility_problems(old, new, "FULL")
    assert [p.direction for p in problems] == ["BACKWARD"]
    assert "changed from optional string to string" in problems[0].message


def test_promotions_are_one_way():
    assert can_read("long", "int") and not can_read("int", "long")
    old = record({"name": "n", "type": "int"})
    new = record({"name": "n", "type": "long"})
    assert compatibility_problems(old, new, "BACKWARD") == []
    assert [p.direction for p in compatibility_problems(old, new, "FULL")] == ["FORWARD"]


def test_timestamp_precision_is_not_interchangeable():
    assert can_read(TS, TS)
    assert not can_read(TS, {"type": "long", "logicalType": "timestamp-millis"})
    assert not can_read(TS, "long")


def test_none_accepts_anything():
    assert compatibility_problems(V1, record({"name": "x", "type": "int"}), "NONE") == []


def test_transitive_checks_every_version_not_only_the_latest():
    v2 = record(*V1["fields"], {"name": "channel", "type": ["null", "string"], "default": None})
    # v3 drops the optional field again (fine against v2: it had a default) and adds a required one.
    v3 = record(*V1["fields"][:2], {"name": "event_time", "type": TS})
    history = [(1, V1), (2, v2)]
    assert problems_against(history, v3, "FULL") == []
    v3_required = record(*V1["fields"], {"name": "region", "type": "string", "default": "eu"})
    assert problems_against(history, v3_required, "FULL_TRANSITIVE") == []
    breaking = record(*V1["fields"][:1], {"name": "event_time", "type": TS})
    assert problems_against([(1, V1), (2, record(*V1["fields"]))], breaking, "FULL")
    assert len(problems_against([(1, V1), (2, V1)], breaking, "FULL_TRANSITIVE")) == 2
