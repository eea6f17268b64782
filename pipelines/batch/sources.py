"""Where a backfill's events come from: a Kafka replay, a bronze snapshot, or files.

Every source yields the same thing: the valid events of one contract as bronze-shaped rows
(the contract's typed fields and ``event_date``), so the feature transforms cannot tell them
apart. Failures that the caller should report as a one-line reason and an exit code are
:class:`~pipelines.core.errors.SourceError` subclasses.

Kafka replay: offsets are resolved here, per partition, before Spark reads anything, so a
request that reaches below the topic's earliest offset (deleted by retention) fails with a
message naming the partition and the missing offsets, instead of Spark's silent skip or its
stack trace. With ``allow_gap`` the replay starts at the earliest offset still there and the
gap is logged. Records go through the ingest's own validation (batch time: each record's Kafka
timestamp, as close as a replay gets to when the stream validated it) and duplicate filter
(earliest delivery wins); invalid records are merged into the dead-letter table on their
topic/partition/offset, so records the stream already dead-lettered are not added twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from confluent_kafka import KafkaException
from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BooleanType,
    DataType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    ShortType,
    StringType,
    TimestampNTZType,
    TimestampType,
)

from pipelines.contracts.registry import SchemaRegistry, writer_schemas
from pipelines.contracts.spark_schema import spark_type
from pipelines.contracts.validation import ValidationRules
from pipelines.core.contract_spec import Contract
from pipelines.core.delta import ensure_delta_table, read_delta_version
from pipelines.core.errors import BadSourceArguments, OffsetsOutOfRetention, SourceError
from pipelines.core.kafka_admin import offsets_for_times, topic_offsets
from pipelines.core.settings import Settings, TopicSettings
from pipelines.core.times import epoch_micros
from pipelines.core.view_spec import FILE_FORMATS
from pipelines.ingest.avro_records import NewWriterSchema, resolve_with_registry
from pipelines.ingest.bronze import check_records, dead_letter_rows, drop_duplicate_events, table_schemas
from pipelines.ingest.sources import read_kafka_offsets

log = logging.getLogger(__name__)

EARLIEST, LATEST = -2, -1


# --------------------------------------------------------------------------- Kafka replay


@dataclass(frozen=True)
class KafkaReplay:
    """Which offsets to replay. Each bound is ``"earliest"``/``"latest"``, Spark's per-partition
    JSON (``{"<topic>": {"0": 42, "1": -2}}``, -2 earliest, -1 latest; partitions not named
    default to earliest/latest; a value may also be an ISO timestamp string, as Spark's
    ``startingOffsetsByTimestamp``), or a UTC timestamp for every partition (the first offset at
    or after it, by Kafka record timestamp). The end is exclusive."""

    starting: str | datetime = "earliest"
    ending: str | datetime = "latest"
    #: Replay from the earliest offset still in the topic when the requested ones were deleted
    #: by retention (the gap is logged) instead of failing.
    allow_gap: bool = False


@dataclass(frozen=True)
class PartitionRange:
    partition: int
    start: int
    end: int
    #: Offsets ``[first, last)`` that were asked for but are no longer in the topic.
    gap: tuple[int, int] | None = None

    @property
    def records(self) -> int:
        return self.end - self.start


def _json_bound(text: str, topic: str, what: str) -> dict[int, int | datetime] | None:
    """Per-partition bounds of ``topic`` from Spark's JSON form (None: not JSON): an integer is
    an offset, a string an ISO timestamp with its UTC offset."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadSourceArguments(f"{what}: not valid JSON ({exc})") from exc
    if not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
        raise BadSourceArguments(f'{what}: expected {{"<topic>": {{"<partition>": offset or timestamp}}}}')
    bounds: dict[int, int | datetime] = {}
    for partition, value in parsed.get(topic, {}).items():
        try:
            if isinstance(value, str):
                moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
                if moment.tzinfo is None:
                    raise ValueError("no UTC offset")
                bounds[int(partition)] = moment
            elif isinstance(value, int) and not isinstance(value, bool):
                bounds[int(partition)] = value
            else:
                raise ValueError("not an integer")
        except ValueError as exc:
            raise BadSourceArguments(f"{what}: {topic} partition {partition!r}: {value!r} is not an offset or an "
                                     f"ISO timestamp with offset ({exc})") from exc
    return bounds


def _named(bound: str | datetime, topic: str, what: str, empty: str,
           partitions: Sequence[int]) -> dict[int, int | datetime]:
    """The explicit per-partition bounds of ``bound`` (JSON), {} for earliest/latest/a timestamp."""
    if isinstance(bound, datetime) or bound in ("earliest", "latest"):
        if bound == empty:
            raise BadSourceArguments(f"{what} offsets: {bound!r} makes an empty replay")
        return {}
    parsed = _json_bound(bound, topic, f"{what} offsets")
    if parsed is None:
        raise BadSourceArguments(f"{what} offsets: {bound!r} is not earliest, latest, JSON or a timestamp")
    unknown = sorted(set(parsed) - set(partitions))
    if unknown:
        raise BadSourceArguments(f"{what} offsets: {topic} has no partition {unknown[0]} "
                                 f"(partitions: {', '.join(map(str, sorted(partitions)))})")
    return parsed


def bound_times(bound: str | datetime, topic: str, partitions: Sequence[int]) -> dict[int, datetime]:
    """Partition -> the timestamp its bound asks for (a timestamp for all, or JSON timestamps)."""
    if isinstance(bound, datetime):
        return {p: bound for p in partitions}
    if bound in ("earliest", "latest"):
        return {}
    parsed = _json_bound(bound, topic, "offsets") or {}
    return {p: v for p, v in parsed.items() if isinstance(v, datetime)}


def resolve_offsets(topic: str, replay: KafkaReplay, watermarks: Mapping[int, tuple[int, int]],
                    starts_by_time: Mapping[int, int] | None = None,
                    ends_by_time: Mapping[int, int] | None = None) -> list[PartitionRange]:
    """The concrete ``[start, end)`` offsets per partition of ``topic`` for ``replay``.

    ``watermarks``: partition -> (earliest, latest) offsets now in the topic. ``starts_by_time``
    / ``ends_by_time``: partition -> first offset at or after the timestamp its bound asks for
    (-1: none), for the partitions bounded by a timestamp. Raises :class:`OffsetsOutOfRetention`
    when a start lies below the earliest offset (a timestamp start that resolves to the earliest
    offset of a partition whose head was deleted counts too: the deleted records may have been
    at or after it), unless ``replay.allow_gap``; raises :class:`BadSourceArguments` for offsets
    past the end, an end before its start, or a partition the topic does not have.
    """
    def pick(bound: str | datetime, explicit: Mapping[int, int | datetime], by_time: Mapping[int, int] | None,
             partition: int, default: int, low: int, high: int) -> tuple[int, bool]:
        """(offset, whether it came from a timestamp)."""
        value = bound if isinstance(bound, datetime) else explicit.get(partition, default)
        if isinstance(value, datetime):
            found = (by_time or {}).get(partition, -1)
            return (high if found < 0 else found), True
        return (low if value == EARLIEST else high if value == LATEST else value), False

    partitions = sorted(watermarks)
    starts = _named(replay.starting, topic, "starting", "latest", partitions)
    ends = _named(replay.ending, topic, "ending", "earliest", partitions)
    ranges = []
    for partition, (low, high) in sorted(watermarks.items()):
        start, start_by_time = pick(replay.starting, starts, starts_by_time, partition, EARLIEST, low, high)
        end, _ = pick(replay.ending, ends, ends_by_time, partition, LATEST, low, high)
        possible_gap = start_by_time and start == low and low > 0
        where = f"{topic} partition {partition}"
        if start > high or end > high:
            raise BadSourceArguments(f"{where}: offset {max(start, end)} is past the end of the topic (latest {high})")
        if end < start:
            raise BadSourceArguments(f"{where}: ending offset {end} is before starting offset {start}")
        gap = None
        if start < low or possible_gap:
            gap = (start, low) if start < low else (0, low)
            detail = (f"offsets {start}..{low - 1} are no longer in the topic" if start < low else
                      f"the requested start time resolves to the earliest offset {low}, and offsets 0..{low - 1}, "
                      "possibly at or after that time, are no longer in the topic")
            if not replay.allow_gap:
                raise OffsetsOutOfRetention(
                    f"{where}: {detail} (deleted by retention; earliest available {low}). "
                    "Pass --allow-gap to replay from the earliest available offset with the gap logged.")
            log.warning("%s: %s: replaying from %d, GAP of %d records", where, detail, low, low - gap[0])
            start = max(start, low)
            end = max(end, start)
        ranges.append(PartitionRange(partition, start, end, gap))
    return ranges


def plan_replay(settings: Settings, topic: str, replay: KafkaReplay) -> list[PartitionRange]:
    """Resolve ``replay`` against the topic as it is now (one metadata round trip per bound)."""
    properties = settings.kafka.client_properties()
    def by_time(bound: str | datetime) -> dict[int, int] | None:
        times = bound_times(bound, topic, sorted(watermarks))
        if not times:
            return None
        millis = {p: epoch_micros(t) // 1000 for p, t in times.items()}
        return offsets_for_times(properties, topic, millis)

    try:
        watermarks = topic_offsets(properties, topic)
        starts, ends = by_time(replay.starting), by_time(replay.ending)
    except (RuntimeError, KafkaException) as exc:
        raise SourceError(f"Kafka replay of {topic}: {exc}") from exc
    return resolve_offsets(topic, replay, watermarks, starts, ends)


def read_kafka_range(spark: SparkSession, settings: Settings, topic: str, ranges: list[PartitionRange],
                     allow_gap: bool) -> DataFrame:
    """The records of ``ranges`` (a batch read; the Kafka source's columns, with headers).
    Offsets deleted between the plan and the read fail the read unless a gap was accepted."""
    offsets = {r.partition: (r.start, r.end) for r in ranges}
    return read_kafka_offsets(spark, settings.kafka, topic, offsets, fail_on_data_loss=not allow_gap)


def replay_validated(records: DataFrame, contract: Contract, settings: Settings, topic: str) -> DataFrame:
    """Kafka records -> validated (JSON) or decoded (Avro) and deduplicated rows (valid and
    invalid), checked at each record's Kafka timestamp. Avro records are decoded with every
    version of the topic's subject; ids not among them are asked of the registry (a version
    registered during the replay is fetched and the records decoded again, once)."""
    rules = ValidationRules.of(settings.ingest)
    batch_time = F.col("kafka_timestamp")
    if contract.format != "avro":
        return drop_duplicate_events(check_records(records, contract, rules, batch_time=batch_time), contract, rules)

    registry = SchemaRegistry(settings.schema_registry)
    subject = TopicSettings.subject(topic)
    for attempt in (1, 2):
        checked = check_records(records, contract, rules, writer_schemas(registry, topic, contract), batch_time)
        try:
            checked = resolve_with_registry(checked, registry, subject)
            break
        except NewWriterSchema:
            if attempt == 2:
                raise
            log.info("%s: a version registered during the replay: decoding again with it", topic)
    return drop_duplicate_events(checked, contract, rules)


def merge_dead_letters(spark: SparkSession, settings: Settings, validated: DataFrame, contract: Contract) -> int:
    """Insert the invalid rows of ``validated`` that the dead-letter table does not hold yet
    (matched on topic, partition and offset); returns how many were inserted."""
    path = settings.storage.dead_letter_path
    _, schema = table_schemas(spark, contract, ValidationRules.of(settings.ingest))
    ensure_delta_table(spark, path, schema, ["failed_date"])
    letters = dead_letter_rows(validated, contract)
    (
        DeltaTable.forPath(spark, path).alias("stored")
        .merge(letters.alias("replayed"),
               "stored.kafka_topic = replayed.kafka_topic AND stored.kafka_partition = replayed.kafka_partition "
               "AND stored.kafka_offset = replayed.kafka_offset")
        .whenNotMatchedInsertAll()
        .execute()
    )
    metrics = DeltaTable.forPath(spark, path).history(1).collect()[0]["operationMetrics"] or {}
    return int(metrics.get("numTargetRowsInserted", 0))


# --------------------------------------------------------------------------- bronze


@dataclass(frozen=True)
class BronzeSnapshot:
    """The topic's bronze table, now or as of a Delta version or a time (aware; time travel)."""

    version: int | None = None
    timestamp: datetime | None = None


def version_at(spark: SparkSession, path: str, moment: datetime, what: str) -> int:
    """The Delta table's latest version committed at or before ``moment`` (Delta's
    ``timestampAsOf``), resolved here so a run reports the version it read."""
    at = moment.astimezone(timezone.utc).replace(tzinfo=None)  # the session's time zone is UTC
    history = spark.sql(f"DESCRIBE HISTORY delta.`{path}`").select("version", "timestamp").collect()
    versions = [r.version for r in history if r.timestamp <= at]
    if not versions:
        first = min(r.timestamp for r in history)
        raise SourceError(f"{what}: no version at or before {moment.isoformat()} (the first was committed at "
                          f"{first.isoformat()} UTC)")
    return max(versions)


def read_bronze(spark: SparkSession, settings: Settings, topic: str,
                snapshot: BronzeSnapshot) -> tuple[DataFrame, int]:
    """The topic's bronze table as of ``snapshot``, and the version read. Without a version or
    timestamp, the current version is pinned, so every read of one run sees the same rows."""
    path = settings.storage.bronze_path(topic)
    if not DeltaTable.isDeltaTable(spark, path):
        raise SourceError(f"bronze table of {topic} not found at {path}: run the ingest first")
    version = snapshot.version
    if snapshot.timestamp is not None and version is None:
        version = version_at(spark, path, snapshot.timestamp, f"bronze table of {topic}")
        log.info("bronze table of %s as of %s: version %d", topic, snapshot.timestamp.isoformat(), version)
    return read_delta_version(spark, path, version, f"bronze table of {topic}")


# --------------------------------------------------------------------------- files

#: File column types accepted for each contract type without parsing text.
_COMPATIBLE: dict[str, tuple[type[DataType], ...]] = {
    "string": (StringType,),
    "double": (DoubleType, FloatType, LongType, IntegerType, ShortType),
    "long": (LongType, IntegerType, ShortType),
    "boolean": (BooleanType,),
    "timestamp": (TimestampType, TimestampNTZType),
}


@dataclass(frozen=True)
class FileSource:
    """Historical events in files. ``mapping``: contract field -> file column, for the fields
    whose file name differs. CSV is read with a header and every value parsed from text; JSON
    lines take their JSON types (timestamps parsed from text); Parquet must already have types
    compatible with the contract (no text parsing)."""

    path: str
    format: str = "parquet"
    mapping: Mapping[str, str] = field(default_factory=dict)


def read_files(spark: SparkSession, source: FileSource, contract: Contract, needed: set[str]) -> DataFrame:
    """The files' rows as contract fields (``needed`` ones must be there, and non-null where
    the contract requires them; other contract fields are taken when present). Fails fast,
    naming the field and its file column, for a missing column, a column of an incompatible
    type, values that do not parse, or nulls in a needed required field. Rows are taken as
    they are: files have no repeated deliveries to drop."""
    if source.format not in FILE_FORMATS:
        raise BadSourceArguments(f"--format: {source.format!r} is not one of {', '.join(FILE_FORMATS)}")
    unknown = sorted(set(source.mapping) - set(contract.field_names))
    if unknown:
        raise BadSourceArguments(f"--map: {unknown[0]!r} is not a field of contract {contract.name} "
                                 f"({', '.join(contract.field_names)})")
    reader = spark.read
    if source.format == "csv":
        reader = reader.option("header", "true").option("inferSchema", "false")
    try:
        raw = reader.format(source.format).load(source.path)
    except Exception as exc:  # Spark's path-not-found / unreadable errors
        raise SourceError(f"file source {source.path}: {str(exc).splitlines()[0]}") from exc
    columns = {c.name: c.dataType for c in raw.schema.fields}
    selected: list[Column] = []
    checks: list[tuple[str, str, Column]] = []
    for spec in contract.fields:
        column = source.mapping.get(spec.name, spec.name)
        label = spec.name if column == spec.name else f"{spec.name} (file column {column!r})"
        if column not in columns:
            if spec.name in needed:
                raise SourceError(f"file source: column {label} is missing from {source.path} "
                                  f"(its columns: {', '.join(sorted(columns))})")
            continue
        found = columns[column]
        target = spark_type(spec)
        if isinstance(found, _COMPATIBLE[spec.type]):
            value = F.col(f"`{column}`").cast(target)
        elif isinstance(found, StringType) and source.format in ("csv", "json"):
            value = F.expr(f"try_cast(`{column}` AS {target.simpleString()})")
            checks.append((f"{label}: values that are not {spec.type}",
                           f"`{column}`", F.col(f"`{column}`").isNotNull() & value.isNull()))
        else:
            raise SourceError(f"file source: column {label} is {found.simpleString()}, "
                              f"contract {contract.name} needs {spec.type}")
        if spec.non_negative:
            checks.append((f"{label}: negative values (the contract forbids them)", f"`{column}`", value < 0))
        if spec.name in needed and spec.required:
            checks.append((f"{label}: null values (the contract requires it)", f"`{column}`", value.isNull()))
        selected.append(value.alias(spec.name))
    events = raw.select(*selected)
    if checks:
        probe = raw.select(*[F.sum(F.when(bad, 1).otherwise(0)).alias(f"c{i}") for i, (_, _, bad) in enumerate(checks)])
        counts = probe.collect()[0]
        for i, (what, column, bad) in enumerate(checks):
            if counts[f"c{i}"]:
                example = raw.filter(bad).select(F.expr(column).cast("string")).limit(1).collect()[0][0]
                raise SourceError(f"file source: {counts[f'c{i}']} rows with {what} (e.g. {example!r})")
    return events.withColumn("event_date", F.to_date(F.col(contract.event_time_field)))


