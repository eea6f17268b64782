"""Reconciliation: every record in a topic is accounted for, exactly.

For each topic: records in Kafka (latest - earliest offset, over partitions) must equal
bronze rows + dead-letter rows + duplicates dropped (from the metrics table). Given the
generator's summary of what it sent, it also checks each count against what was sent: bronze
against the valid events, the dead letters class by class against the injected bad records,
and the duplicates against the re-deliveries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core.kafka_admin import topic_offsets
from pipelines.core.settings import Settings


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
    #: Differences from the generator's summary, one sentence each (empty: all as sent).
    mismatches: tuple[str, ...] = field(default=())

    @property
    def unaccounted(self) -> int:
        return self.kafka_records - self.bronze_rows - self.dead_letter_rows - self.duplicates_dropped

    @property
    def ok(self) -> bool:
        return self.unaccounted == 0 and not self.mismatches


def _count_by_topic(spark: SparkSession, path: str, topic: str) -> int:
    if not DeltaTable.isDeltaTable(spark, path):
        return 0
    return spark.read.format("delta").load(path).filter(F.col("kafka_topic") == topic).count()


def reconcile(
    spark: SparkSession,
    settings: Settings,
    topics: Sequence[str] | None = None,
    sent: SentCounts | None = None,
) -> list[TopicReconciliation]:
    """Reconcile ``topics`` (default: the ingest topics); see the module docstring."""
    storage = settings.storage
    dead_letter_counts: dict[tuple[str, str], int] = {}
    if DeltaTable.isDeltaTable(spark, storage.dead_letter_path):
        for row in spark.read.format("delta").load(storage.dead_letter_path).groupBy(
            "kafka_topic", "error_class"
        ).count().collect():
            dead_letter_counts[(row["kafka_topic"], row["error_class"])] = row["count"]
    duplicates: dict[str, int] = {}
    if DeltaTable.isDeltaTable(spark, storage.stream_metrics_path):
        metrics = (
            spark.read.format("delta").load(storage.stream_metrics_path)
            .dropDuplicates(["query_id", "batch_id"])
            .groupBy("topic").agg(F.sum(F.coalesce("duplicates_dropped", F.lit(0))).alias("dropped"))
        )
        duplicates = {row["topic"]: int(row["dropped"]) for row in metrics.collect()}

    results = []
    for topic in topics or settings.ingest.topics:
        offsets = topic_offsets(settings.kafka.client_properties(), topic)
        kafka_records = sum(high - low for low, high in offsets.values())
        by_class = {cls: n for (t, cls), n in sorted(dead_letter_counts.items()) if t == topic}
        result = TopicReconciliation(
            topic=topic,
            kafka_records=kafka_records,
            bronze_rows=_count_by_topic(spark, storage.bronze_path(topic), topic),
            dead_letter_rows=sum(by_class.values()),
            duplicates_dropped=duplicates.get(topic, 0),
            dead_letters_by_class=by_class,
        )
        if sent is not None:
            result = TopicReconciliation(**{**result.__dict__, "mismatches": _compare(result, sent)})
        results.append(result)
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
