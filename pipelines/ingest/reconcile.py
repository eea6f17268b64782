"""Reconciliation: every record in a topic is accounted for, exactly, from the data itself.

For each topic, over the offsets Kafka holds now (earliest to latest, per partition), every
record is exactly one of:

* a bronze row: a bronze row carries its Kafka partition and offset;
* a dead letter: so does its dead-letter row;
* a duplicate: it is in neither table, and its event id (read from its bytes with the topic's
  contract) is the id of a bronze row: a repeated delivery the stream dropped;
* unaccounted: none of these (lost), or a second row for the same offset (doubled).

So records in Kafka = bronze rows + dead-letter rows + duplicates, exactly, after any number of
crashes: every count comes from data the ingest committed atomically (its Delta commits) or
from Kafka, never from a best-effort metrics row. Rows whose offsets retention has since
deleted from Kafka are left out of the counts. Given the generator's summary of what it sent,
each count is also checked against what was sent: bronze against the valid events, the dead
letters class by class against the injected bad records, and the duplicates against the
re-deliveries.

Reading the topic's records makes this a scan of what retention keeps: run it hourly or after a
drain, not per batch.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.contracts.registry import SchemaRegistry, writer_schemas
from pipelines.contracts.validation import ValidationRules
from pipelines.core.kafka_admin import topic_offsets
from pipelines.core.settings import Settings
from pipelines.ingest.bronze import check_records
from pipelines.ingest.sources import read_kafka_offsets


class SentCounts(Protocol):
    """What a producer says it sent to each topic, to reconcile against: a :class:`SentSummary`
    file, or the local generator's own summary object."""

    def sent(self, topic: str) -> int: ...

    def expected_bronze(self, topic: str) -> int: ...

    def duplicates(self, topic: str) -> int: ...

    def expected_dead_letters(self, topic: str) -> Mapping[str, int]: ...


_SUMMARY_KEYS = ("sent", "expected_bronze", "duplicates", "expected_dead_letters")


@dataclass(frozen=True)
class SentSummary:
    """A summary file, as ``fp-generate --summary-file`` writes it: per topic ``sent``,
    ``expected_bronze``, ``duplicates`` and ``expected_dead_letters`` (class -> count). A topic
    the file does not name was sent nothing."""

    topics: Mapping[str, Mapping[str, Any]]

    @classmethod
    def read(cls, path: Path) -> SentSummary:
        """The summary in ``path``; a ValueError naming the topic and key if it is not one."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of topic -> counts")
        for topic, entry in data.items():
            missing = [key for key in _SUMMARY_KEYS if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise ValueError(f"{path}: {topic}: missing {', '.join(missing)}")
        return cls(data)

    def _count(self, topic: str, key: str) -> Any:
        return self.topics.get(topic, {}).get(key, 0)

    def sent(self, topic: str) -> int:
        return int(self._count(topic, "sent"))

    def expected_bronze(self, topic: str) -> int:
        return int(self._count(topic, "expected_bronze"))

    def duplicates(self, topic: str) -> int:
        return int(self._count(topic, "duplicates"))

    def expected_dead_letters(self, topic: str) -> Mapping[str, int]:
        return {cls: int(n) for cls, n in (self._count(topic, "expected_dead_letters") or {}).items()}


@dataclass(frozen=True)
class TopicReconciliation:
    topic: str
    kafka_records: int
    bronze_rows: int
    dead_letter_rows: int
    duplicates_dropped: int
    dead_letters_by_class: dict[str, int]
    #: Records in no table that repeat no bronze event (lost), and the first few of them.
    lost: int = 0
    lost_examples: tuple[tuple[int, int], ...] = ()
    #: Table rows beyond the first for one Kafka offset (written twice).
    doubled: int = 0
    #: Differences from the generator's summary, one sentence each (empty: all as sent).
    mismatches: tuple[str, ...] = field(default=())

    @property
    def unaccounted(self) -> int:
        return self.kafka_records - self.bronze_rows - self.dead_letter_rows - self.duplicates_dropped

    @property
    def ok(self) -> bool:
        return self.unaccounted == 0 and not self.lost and not self.doubled and not self.mismatches


#: Enough to read an event id from any record the ingest could have kept: the time checks of
#: the stream (against its batch time) are not repeated, only the record's shape.
_ANY_TIME = timedelta(days=365_000)


def _in_offsets(offsets: Mapping[int, tuple[int, int]]) -> Column:
    """Rows whose ``kafka_partition``/``kafka_offset`` lie in ``offsets`` (partition -> [start, end))."""
    return functools.reduce(operator.or_, [
        (F.col("kafka_partition") == partition) & (F.col("kafka_offset") >= start) & (F.col("kafka_offset") < end)
        for partition, (start, end) in offsets.items()], F.lit(False))


def _table(spark: SparkSession, path: str, topic: str) -> DataFrame | None:
    if not DeltaTable.isDeltaTable(spark, path):
        return None
    return spark.read.format("delta").load(path).filter(F.col("kafka_topic") == topic)


def reconcile_topic(spark: SparkSession, settings: Settings, topic: str) -> TopicReconciliation:
    """Account for every record of ``topic`` Kafka holds now (see the module docstring)."""
    storage, contract = settings.storage, settings.contract_for(topic)
    offsets = topic_offsets(settings.kafka.client_properties(), topic)
    records = read_kafka_offsets(spark, settings.kafka, topic, offsets).persist()
    try:
        kafka_records = records.count()
        in_range = _in_offsets(offsets)
        bronze = _table(spark, storage.bronze_path(topic), topic)
        dead = _table(spark, storage.dead_letter_path, topic)
        landed = []
        bronze_rows = dead_letter_rows = doubled = 0
        by_class: dict[str, int] = {}
        if bronze is not None:
            kept = bronze.filter(in_range).select("kafka_partition", "kafka_offset")
            counts = kept.agg(F.count(F.lit(1)).alias("rows"), F.count_distinct("kafka_partition", "kafka_offset")
                              .alias("offsets")).first()
            bronze_rows, doubled = counts["rows"], counts["rows"] - counts["offsets"]
            landed.append(kept)
        if dead is not None:
            kept = dead.filter(in_range)
            by_class = {r["error_class"]: r["count"] for r in kept.groupBy("error_class").count().collect()}
            dead_letter_rows = sum(by_class.values())
            offsets_kept = kept.select("kafka_partition", "kafka_offset")
            doubled += dead_letter_rows - offsets_kept.distinct().count()
            landed.append(offsets_kept)
        rest = records
        for table in landed:
            rest = rest.join(table.withColumnRenamed("kafka_partition", "partition")
                             .withColumnRenamed("kafka_offset", "offset"), ["partition", "offset"], "left_anti")
        # What the stream dropped as a repeated delivery was a valid record whose id bronze holds.
        rules = replace(ValidationRules.of(settings.ingest), future_tolerance=_ANY_TIME, max_event_age=_ANY_TIME)
        writers = (writer_schemas(SchemaRegistry(settings.schema_registry), topic, contract)
                   if contract.format == "avro" else ())
        checked = check_records(rest, contract, rules, writers).select(
            "kafka_partition", "kafka_offset", F.col(contract.id_field).cast("string").alias("_id"))
        if bronze is not None:
            known = bronze.select(F.col(contract.id_field).cast("string").alias("_id")).distinct()
            repeats = checked.join(known, "_id", "left_semi")
        else:
            repeats = checked.limit(0)
        duplicates = repeats.count()
        lost_rows = checked.join(repeats, ["kafka_partition", "kafka_offset"], "left_anti")
        lost = lost_rows.count()
        examples = tuple((r.kafka_partition, r.kafka_offset) for r in
                         lost_rows.orderBy("kafka_partition", "kafka_offset").limit(5).collect())
    finally:
        records.unpersist()
    return TopicReconciliation(topic=topic, kafka_records=kafka_records, bronze_rows=bronze_rows,
                               dead_letter_rows=dead_letter_rows, duplicates_dropped=duplicates,
                               dead_letters_by_class=dict(sorted(by_class.items())), lost=lost,
                               lost_examples=examples, doubled=doubled)


def reconcile(
    spark: SparkSession,
    settings: Settings,
    topics: Sequence[str] | None = None,
    sent: SentCounts | None = None,
) -> list[TopicReconciliation]:
    """Reconcile ``topics`` (default: the ingest topics), and compare with ``sent`` if given."""
    results = []
    for topic in topics or settings.ingest.topics:
        result = reconcile_topic(spark, settings, topic)
        problems = []
        if result.lost:
            where = ", ".join(f"partition {p} offset {o}" for p, o in result.lost_examples)
            problems.append(f"{topic}: {result.lost:,} records are in no table and repeat no bronze event "
                            f"(e.g. {where})")
        if result.doubled:
            problems.append(f"{topic}: {result.doubled:,} table rows repeat the Kafka offset of another row")
        if sent is not None:
            problems += _compare(result, sent)
        results.append(replace(result, mismatches=tuple(problems)))
    return results


def _compare(result: TopicReconciliation, sent: SentCounts) -> tuple[str, ...]:
    topic = result.topic
    problems = []
    checks = [
        ("records in Kafka", result.kafka_records, sent.sent(topic)),
        ("bronze rows", result.bronze_rows, sent.expected_bronze(topic)),
        ("duplicates dropped", result.duplicates_dropped, sent.duplicates(topic)),
    ]
    expected_classes = sent.expected_dead_letters(topic)
    for cls in sorted(set(expected_classes) | set(result.dead_letters_by_class)):
        checks.append((f"dead letters '{cls}'", result.dead_letters_by_class.get(cls, 0), expected_classes.get(cls, 0)))
    for what, got, expected in checks:
        if got != expected:
            problems.append(f"{topic}: {what}: {got:,}, the generator sent {expected:,}")
    return tuple(problems)


def format_report(results: Sequence[TopicReconciliation]) -> str:
    """A table of the reconciliation, one column per topic, and any mismatch below it."""
    rows = [
        ("records in Kafka", lambda r: r.kafka_records),
        ("bronze rows", lambda r: r.bronze_rows),
        ("dead-letter rows", lambda r: r.dead_letter_rows),
        ("duplicates dropped", lambda r: r.duplicates_dropped),
        ("unaccounted", lambda r: r.unaccounted),
    ]
    lines = [f"{'':<22}" + "".join(f"{r.topic:>16}" for r in results)]
    for label, read in rows:
        lines.append(f"{label:<22}" + "".join(f"{read(r):>16,}" for r in results))
    classes = sorted({c for r in results for c in r.dead_letters_by_class})
    for cls in classes:
        lines.append(f"{'  dlq ' + cls:<22}" + "".join(f"{r.dead_letters_by_class.get(cls, 0):>16,}" for r in results))
    lines.append(f"{'status':<22}" + "".join(f"{'OK' if r.ok else 'MISMATCH':>16}" for r in results))
    for r in results:
        lines.extend(f"  {m}" for m in r.mismatches)
    return "\n".join(lines)
