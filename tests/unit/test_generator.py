"""The event generator: deterministic, and every injected kind is what it claims to be."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from datetime import timedelta

import pytest
from pyspark.sql import functions as F

from pipelines.contracts.validation import ERROR_CLASSES, ValidationRules
from pipelines.core.contract_spec import load_contracts
from pipelines.core.settings import PROJECT_ROOT
from pipelines.ingest.json_records import validate_records
from pipelines.ingest.reconcile import SentSummary
from pipelines.local.generator import ACCOUNTS, GeneratorSpec, GeneratorSummary, generate, produce
from tests.support import KAFKA_SCHEMA, kafka_row, utc

END = utc("2026-11-23 12:00:00")
SPEC = GeneratorSpec(count=3000, seed=11, end=END, bad_rate=0.05, duplicate_rate=0.02, label_rate=0.3)
CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")


def test_same_seed_same_records():
    assert list(generate(SPEC)) == list(generate(SPEC))


def test_another_seed_other_records():
    other = GeneratorSpec(count=3000, seed=12, end=END)
    assert [r.value for r in generate(SPEC)][:10] != [r.value for r in generate(other)][:10]


def test_bad_records_are_spread_evenly_over_the_classes():
    counts = Counter(r.kind for r in generate(SPEC) if r.topic == "transactions" and r.kind in ERROR_CLASSES)
    assert set(counts) == set(ERROR_CLASSES)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_every_record_is_classified_as_its_kind_says(spark):
    """An independent check: the ingest's validation, at a batch time just after the
    generator's end, puts every generated record in the class the generator says it injected."""
    rules = ValidationRules(max_value_bytes=SPEC.max_value_bytes, future_tolerance=SPEC.future_tolerance,
                            max_event_age=SPEC.max_event_age)
    batch_time = END + timedelta(seconds=30)
    records = list(generate(SPEC))
    mismatched = []
    for topic, contract in CONTRACTS.items():
        sent = [r for r in records if r.topic == topic]
        frame = spark.createDataFrame([kafka_row(r.value, i, topic=topic) for i, r in enumerate(sent)], KAFKA_SCHEMA)
        rows = validate_records(frame, contract, rules, batch_time=F.lit(batch_time)).collect()
        for row in rows:
            record = sent[row.kafka_offset]
            expected = None if record.kind in ("valid", "late", "out_of_order", "duplicate") else record.kind
            if row.error_class != expected:
                mismatched.append((record.kind, row.error_class, row.error_reason))
        assert len(rows) == len(sent)
    assert mismatched == []


def test_duplicates_repeat_the_exact_bytes_of_an_earlier_valid_record():
    seen: dict[str, bytes] = {}
    duplicates = 0
    for record in generate(SPEC):
        if record.kind == "duplicate":
            duplicates += 1
            assert seen[record.event_id] == record.value
        elif record.event_id and record.topic == "transactions":
            seen[record.event_id] = record.value
    assert duplicates > 0


def test_late_events_lag_the_stream_by_the_configured_amount():
    previous_valid = None
    lags = []
    for record in generate(SPEC):
        if record.topic != "transactions" or record.kind not in ("valid", "late"):
            continue
        event_time = json.loads(record.value)["event_time"]
        if record.kind == "late" and previous_valid:
            lags.append((utc(previous_valid[:-1].replace("T", " ")) - utc(event_time[:-1].replace("T", " "))))
        else:
            previous_valid = event_time
    assert lags and all(timedelta(minutes=29) < lag < timedelta(hours=6, minutes=1) for lag in lags)


def test_labels_are_sent_once_the_stream_clock_passes_their_label_time():
    """A label goes out before the first transaction whose (on-time) event time is at or after
    its label time, and none is later than the generator's end."""
    waiting: list[str] = []
    labels = 0
    for record in generate(SPEC):
        if record.topic == "labels" and record.kind == "valid":
            waiting.append(json.loads(record.value)["label_time"])
            labels += 1
        elif record.topic == "transactions" and record.kind == "valid":
            event_time = json.loads(record.value)["event_time"]
            assert all(label_time <= event_time for label_time in waiting)
            waiting.clear()
    assert labels > 0
    assert all(label_time <= "2026-11-23T12:00:00.000Z" for label_time in waiting)


def test_rates_outside_zero_to_one_are_rejected():
    with pytest.raises(ValueError, match="late_rate: 1.5 is not a fraction"):
        GeneratorSpec(late_rate=1.5)


def test_unknown_bad_class_is_rejected():
    with pytest.raises(ValueError, match="unknown error classes"):
        GeneratorSpec(bad_classes=("typo",))


def test_a_summary_file_reads_back_as_the_counts_the_generator_kept(tmp_path):
    summary = GeneratorSummary()
    for record in generate(SPEC):
        summary.add(record.topic, record.kind)
    path = tmp_path / "sent.json"
    path.write_text(json.dumps(summary.to_dict()))
    read = SentSummary.read(path)
    for topic in ("transactions", "labels", "never-sent"):
        assert (read.sent(topic), read.expected_bronze(topic), read.duplicates(topic),
                dict(read.expected_dead_letters(topic))) == \
            (summary.sent(topic), summary.expected_bronze(topic), summary.duplicates(topic),
             summary.expected_dead_letters(topic))
    assert read.sent("transactions") > 0 and read.duplicates("transactions") > 0


def test_a_summary_file_without_its_counts_is_refused_naming_the_topic(tmp_path):
    path = tmp_path / "sent.json"
    path.write_text(json.dumps({"transactions": {"sent": 3, "by_kind": {"valid": 3}}}))
    with pytest.raises(ValueError, match="transactions: missing expected_bronze, duplicates, expected_dead_letters"):
        SentSummary.read(path)


ACCOUNT_SPEC = dataclasses.replace(SPEC, account_change_rate=0.2, accounts=40)


def test_without_an_account_change_rate_nothing_is_written_to_the_accounts_table():
    assert not any(r.topic == ACCOUNTS for r in generate(SPEC))


def test_an_account_row_is_inserted_before_its_first_transaction_and_after_its_deletion():
    live: set[str] = set()
    for record in generate(ACCOUNT_SPEC):
        account = record.key.decode()
        if record.topic == ACCOUNTS:
            if record.kind == "insert":
                assert account not in live
                live.add(account)
            else:
                assert account in live, f"{record.kind} of {account}, which has no row"
                if record.kind == "delete":
                    live.remove(account)
        elif record.topic == "transactions" and record.kind in ("valid", "late", "out_of_order"):
            assert account in live, f"a transaction of {account} before its row"


def test_account_changes_interleave_with_transactions_and_are_of_every_kind():
    records = list(generate(ACCOUNT_SPEC))
    kinds = Counter(r.kind for r in records if r.topic == ACCOUNTS)
    assert set(kinds) == {"insert", "update", "delete"}
    transactions = sum(1 for r in records if r.topic == "transactions")
    assert 0.1 < kinds["update"] / transactions < 0.3
    positions = [i for i, r in enumerate(records) if r.topic == ACCOUNTS and r.kind == "update"]
    assert positions[0] < len(records) / 10 and positions[-1] > len(records) * 9 / 10  # spread, not bunched


def test_account_changes_without_a_table_to_write_them_are_refused():
    with pytest.raises(ValueError, match="account changes .* and no accounts table"):
        produce(generate(dataclasses.replace(ACCOUNT_SPEC, count=5)), {"bootstrap.servers": "127.0.0.1:1"})
