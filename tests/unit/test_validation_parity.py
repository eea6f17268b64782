"""The JVM validation and the benchmark's Python baseline give every record the same verdict.

The ingest used to validate JSON in Python (an Arrow UDF over ``bench/python_validation.py``'s
``RecordValidator``); it now does so in Spark SQL. On every fault the generator makes, at a high
bad-record rate, both put each record in the same error class with the same typed values, and
the same reason, except for JSON syntax errors: Python names the parser's position, Spark's
parser gives none. This also keeps the ingest benchmark honest: its Python consumer does the
same work as the ingest it is compared with."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
from pyspark.sql import functions as F

from bench.python_validation import RecordValidator
from pipelines.contracts.validation import ERROR_CLASSES, ValidationRules
from pipelines.core.contract_spec import load_contracts
from pipelines.core.settings import PROJECT_ROOT
from pipelines.ingest.json_records import validate_records
from pipelines.local.generator import GeneratorSpec, generate
from tests.support import KAFKA_SCHEMA, kafka_row, utc

CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")
END = utc("2026-11-23 12:00:00")
SPEC = GeneratorSpec(count=6000, seed=23, end=END, bad_rate=0.4, duplicate_rate=0.02, label_rate=0.5)
RULES = ValidationRules(max_value_bytes=SPEC.max_value_bytes, future_tolerance=SPEC.future_tolerance,
                        max_event_age=SPEC.max_event_age)
BATCH_TIME = END + timedelta(seconds=30)


def comparable(reason: str | None, error_class: str | None) -> str | None:
    """The reason, or a placeholder for a syntax error's (the one text that differs)."""
    if error_class == "not_json" and reason and reason.startswith("value is not JSON:"):
        return "value is not JSON: <parser message>"
    return reason


@pytest.mark.parametrize("topic", ["transactions", "labels"])
def test_jvm_and_python_validation_agree_on_every_generated_fault(spark, topic):
    contract = CONTRACTS[topic]
    records = [r for r in generate(SPEC) if r.topic == topic]
    python = RecordValidator(contract, RULES)
    expected = []
    for offset, record in enumerate(records):
        verdict = python.validate(record.value, BATCH_TIME)
        values = ({k: (v.replace(tzinfo=None) if k == contract.event_time_field else v)
                   for k, v in verdict.values.items()} if verdict.values else None)
        expected.append((offset, verdict.error_class, comparable(verdict.reason, verdict.error_class), values))

    frame = spark.createDataFrame([kafka_row(r.value, i, topic=topic) for i, r in enumerate(records)], KAFKA_SCHEMA)
    rows = validate_records(frame, contract, RULES, batch_time=F.lit(BATCH_TIME)).collect()
    actual = sorted(
        (row.kafka_offset, row.error_class, comparable(row.error_reason, row.error_class),
         {n: row[n] for n in contract.field_names} if row.error_class is None else None)
        for row in rows
    )
    assert len(actual) == len(expected)
    mismatched = [(e, a) for e, a in zip(expected, actual) if e != a]
    assert mismatched == []
    # The comparison covered every class the generator makes for this topic.
    classes = Counter(e[1] for e in expected)
    assert None in classes
    if topic == "transactions":
        assert set(ERROR_CLASSES) <= set(classes)
