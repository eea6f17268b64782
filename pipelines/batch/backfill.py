"""Backfills: a view's feature rows over whole UTC days, recomputed from a batch source and
written over exactly those days of its feature table (Delta ``replaceWhere``, one atomic
commit per view).

The rows are the ones the stream would have written, computed by the same transforms:

* a trailing view reads ``max window + delay`` of history before the first day, and writes
  only rows whose event falls inside the days;
* a sliding view reads one ``window`` before (windows ending on the first day start earlier);
* a session view reads ``session_history`` before (a session can begin well before the day
  it ends on: one that starts within ``gap`` of the history read, while the source has older
  events, fails the backfill rather than being written truncated) and ``gap`` after;
* sliding and session rows are written only for windows the stream would have closed: those
  ending at or before the source's latest event time minus ``allowed_lateness``; a window still
  open is left to the stream (which would otherwise write it a second time). Unlike the stream,
  a backfill counts events that arrived after their window closed.

A backfill never deletes what it cannot give back: rows of the table on the replaced days that
lie before the source's first event or after the last window its latest event closes (a
replay cut short, an old bronze version, files that end early, an empty source) make it fail
before anything is written.

Rows are partitioned by ``event_date``, the UTC date of the row's event time (window/session
end for sliding/session views), which is why ranges are whole days: ``--from`` inclusive,
``--to`` exclusive. Running the same backfill twice leaves the same rows (only ``computed_at``,
the time of the computation, differs); a narrower range rewrites only its own days.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.batch.sources import (
    BronzeSnapshot,
    FileSource,
    KafkaReplay,
    merge_dead_letters,
    plan_replay,
    read_bronze,
    read_files,
    read_kafka_range,
    replay_validated,
)
from pipelines.core.delta import path_exists
from pipelines.core.errors import BadSourceArguments, SourceError
from pipelines.core.settings import Settings
from pipelines.core.times import day_start, parse_day, utc_assuming_local
from pipelines.core.view_spec import FeatureView, event_time_column
from pipelines.features.sinks import OnlineResult, feature_table_rows, latest_per_entity, write_online
from pipelines.features.transforms import view_features
from pipelines.ingest.bronze import bronze_rows

log = logging.getLogger(__name__)

#: A source's earliest event time when it is not known (taken as older than any history read).
UNKNOWN_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
#: How much history a session view reads before the first day (see the module docstring).
DEFAULT_SESSION_HISTORY = timedelta(days=1)


@dataclass(frozen=True, order=True)
class DayRange:
    """UTC days ``[start, end)``: the unit a backfill replaces."""

    start: date
    end: date

    @classmethod
    def parse(cls, start: str, end: str) -> DayRange:
        """``--from``/``--to`` as dates (``2026-11-20``) or UTC midnights; ``--to`` exclusive."""
        first, last = parse_day(start, "--from"), parse_day(end, "--to")
        if last <= first:
            raise BadSourceArguments(f"--to {last} must be after --from {first} (--to is exclusive)")
        return cls(first, last)

    @property
    def begins(self) -> datetime:
        return day_start(self.start)

    @property
    def ends(self) -> datetime:
        return day_start(self.end)

    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range((self.end - self.start).days)]

    def __str__(self) -> str:
        return f"{self.start}..{self.end - timedelta(days=1)}"


def days_predicate(ranges: Sequence[DayRange], column: str = "event_date") -> str:
    """The SQL predicate selecting ``ranges`` (used both to filter rows and as ``replaceWhere``)."""
    return " OR ".join(f"({column} >= '{r.start}' AND {column} < '{r.end}')" for r in ranges)


def history(view: FeatureView, session_history: timedelta = DEFAULT_SESSION_HISTORY) -> timedelta:
    """How far before a day's start a view's rows on that day can reach."""
    if view.kind == "trailing":
        return view.max_lookback
    if view.kind == "sliding":
        assert view.window is not None
        return view.window
    return session_history


def lookahead(view: FeatureView) -> timedelta:
    """How far after a day's end events decide a view's rows on that day (a session is only
    over once ``gap`` passes without events), plus the lateness that closes them."""
    return (view.gap if view.kind == "session" and view.gap else timedelta(0)) + view.allowed_lateness


def range_features(events: DataFrame, view: FeatureView, ranges: Sequence[DayRange],
                   latest_event_time: datetime | None) -> DataFrame:
    """Feature-table rows of ``view`` over ``events`` on the days of ``ranges``.

    ``latest_event_time``: the latest event time of the whole source; sliding/session windows
    ending after it minus ``allowed_lateness`` are still open and left out (None: no events,
    every window open). Trailing rows are all final.
    """
    features = view_features(events, view)
    if view.kind != "trailing":
        if latest_event_time is None:
            return feature_table_rows(features, view).limit(0)
        watermark = latest_event_time - view.allowed_lateness
        features = features.filter(F.col(event_time_column(view)) <= F.lit(watermark))
    return feature_table_rows(features, view).filter(F.expr(days_predicate(ranges)))


@dataclass(frozen=True)
class WriteOutcome:
    rows: int
    table_version: int
    files_removed: int
    files_added: int


def replace_days(rows: DataFrame, path: str, ranges: Sequence[DayRange]) -> WriteOutcome:
    """Overwrite the ``ranges`` days of the feature table at ``path`` with ``rows`` in one commit
    (creating the table if needed; new feature columns are added to it)."""
    spark = rows.sparkSession
    # Tagged so its commit is found even if the stream commits to the table right after it.
    tag = f"backfill {uuid.uuid4()}"
    (
        rows.write.format("delta").mode("overwrite")
        .option("replaceWhere", days_predicate(ranges))
        .option("mergeSchema", "true")
        .option("userMetadata", tag)
        .partitionBy("event_date")
        .save(path)
    )
    last = DeltaTable.forPath(spark, path).history(20).filter(F.col("userMetadata") == tag).collect()[0]
    metrics = last["operationMetrics"] or {}
    return WriteOutcome(int(metrics.get("numOutputRows", 0)), int(last["version"]),
                        int(metrics.get("numRemovedFiles", 0)), int(metrics.get("numFiles", 0)))


@dataclass(frozen=True)
class ViewOutcome:
    view: str
    days: list[date]
    rows: int
    table_version: int
    online: OnlineResult | None
    seconds: float


@dataclass(frozen=True)
class SourceEvents:
    """One topic's events as a backfill reads them."""

    #: Valid events of the contract (bronze-shaped), already limited to the read window.
    events: DataFrame
    #: Earliest and latest event time in the whole source (None when it has no events).
    earliest: datetime | None
    latest: datetime | None
    description: str
    #: A cached frame the events derive from, released once the events are cached themselves.
    cached: DataFrame | None = None


def _bounds(events: DataFrame, event_time: str) -> tuple[datetime | None, datetime | None]:
    row = events.agg(F.min(event_time).alias("lo"), F.max(event_time).alias("hi")).collect()[0]
    return (utc_assuming_local(row.lo) if row.lo else None), (utc_assuming_local(row.hi) if row.hi else None)


#: The time bounds of a source: its earliest and latest event time (None: no events).
Bounds = tuple[datetime | None, datetime | None]


def load_events(spark: SparkSession, settings: Settings, topic: str,
                source: KafkaReplay | BronzeSnapshot | FileSource, needed: set[str],
                read_from: datetime, read_to: datetime, bounds: Bounds | None = None) -> SourceEvents:
    """The valid events of ``topic``'s contract from ``source``, between ``read_from`` and
    ``read_to`` (event time, end exclusive), with the whole source's time bounds (scanned,
    unless the caller knows them: ``bounds``)."""
    contract = settings.contract_for(topic)
    event_time = contract.event_time_field
    validated = None
    if isinstance(source, KafkaReplay):
        ranges = plan_replay(settings, topic, source)
        total = sum(r.records for r in ranges)
        log.info("%s: replaying %d records (%s)", topic, total,
                 ", ".join(f"p{r.partition} {r.start}..{r.end}" for r in ranges))
        validated = replay_validated(read_kafka_range(spark, settings, topic, ranges, source.allow_gap),
                                     contract, settings, topic).persist(StorageLevel.MEMORY_AND_DISK)
        checkpoint = settings.storage.checkpoint_path("ingest", topic)
        if path_exists(spark, checkpoint):
            # The ingest's verdict stands for every record it consumed or will consume: adding
            # the replay's (validated at another time) could duplicate or contradict it.
            log.info("%s: the ingest consumes this topic (%s): the dead-letter table is left to it", topic, checkpoint)
        else:
            inserted = merge_dead_letters(spark, settings, validated, contract)
            log.info("%s: %d invalid records not yet in the dead-letter table added to it", topic, inserted)
        everything = bronze_rows(validated, contract)
        description = f"Kafka {topic} ({total} records)"
    elif isinstance(source, BronzeSnapshot):
        everything, version = read_bronze(spark, settings, topic, source)
        description = f"bronze {topic} @ version {version}" + (
            f" (as of {source.timestamp.isoformat()})" if source.timestamp is not None else "")
    else:
        everything = read_files(spark, source, contract, needed)
        description = f"{source.format} files {source.path}"
    earliest, latest = bounds if bounds is not None else _bounds(everything, event_time)
    events = everything.filter(
        (F.col("event_date") >= F.lit(read_from.date())) & (F.col("event_date") <= F.lit(read_to.date()))
        & (F.col(event_time) >= F.lit(read_from)) & (F.col(event_time) < F.lit(read_to))
    )
    return SourceEvents(events, earliest, latest, description, validated)


def needed_columns(view: FeatureView) -> set[str]:
    """Every source column the view's transform reads."""
    columns = {view.entity, view.event_time} | {a.column for a in view.aggregations if a.column != "*"}
    return columns | {by.column for by in view.count_by}


def entities_latest_within(rows: DataFrame, table: DataFrame, view: FeatureView,
                           ranges: Sequence[DayRange]) -> DataFrame:
    """Each entity's latest row among ``rows`` (recomputed on ``ranges``), kept only if the
    feature ``table`` has no later row of that entity on another day: only then is it the row
    Redis should serve. (Redis' own newer-wins check would also refuse an older row, but not
    when the newer one is missing there, e.g. expired or never written.) Reads only the days
    from the first range on, outside the ranges, and only the entity and time columns."""
    time_column = event_time_column(view)
    latest = latest_per_entity(rows, view)
    later = table.filter(~F.expr(days_predicate(ranges)) & (F.col("event_date") >= F.lit(min(r.start for r in ranges))))
    later = later.select(F.col(view.entity).alias("_entity"), F.col(time_column).alias("_later"))
    superseded = (latest.join(later, latest[view.entity] == later["_entity"])
                  .filter(F.col("_later") > F.col(time_column)).select("_entity").distinct())
    return latest.join(superseded, latest[view.entity] == superseded["_entity"], "left_anti")


def _check_coverage(spark: SparkSession, path: str, view: FeatureView, ranges: Sequence[DayRange],
                    source: SourceEvents) -> None:
    """Fail when replacing the days would delete rows the source cannot give back: rows of the
    table on those days before the source's first event, or after the last window its latest
    event closes (a replay cut short, an old bronze version, files that end early, an empty
    source)."""
    if not DeltaTable.isDeltaTable(spark, path):
        return
    time_column = event_time_column(view)
    table = spark.read.format("delta").load(path).filter(F.expr(days_predicate(ranges)))
    if source.latest is None:
        lost = table
    else:
        closed = source.latest if view.kind == "trailing" else source.latest - view.allowed_lateness
        beyond = F.col(time_column) > F.lit(closed)
        if source.earliest is not None and source.earliest != UNKNOWN_EARLIEST:
            beyond = beyond | (F.col(time_column) < F.lit(source.earliest))
        lost = table.filter(beyond)
    found = lost.agg(F.count(F.lit(1)).alias("n"), F.min("event_date").alias("first"),
                     F.max("event_date").alias("last")).collect()[0]
    if found["n"]:
        raise SourceError(
            f"{view.name}: {found['n']} rows of the table on {found['first']}..{found['last']} lie outside what "
            f"{source.description} covers (events {source.earliest or '-'} .. {source.latest or '-'}): replacing "
            "those days would delete them; narrow --from/--to or extend the source")


def _check_sessions(rows: DataFrame, view: FeatureView, read_from: datetime, source: SourceEvents) -> None:
    """Fail when a session may be missing its start: it begins within ``gap`` of the history
    read and the source has older events."""
    assert view.gap is not None
    if source.earliest is None or source.earliest >= read_from:
        return
    cut = rows.filter(F.col("session_start") < F.lit(read_from + view.gap)).select(view.entity).limit(1).collect()
    if cut:
        raise SourceError(f"{view.name}: a session of {view.entity} {cut[0][0]!r} starts within {view.gap} of the "
                          f"history read ({read_from:%Y-%m-%d %H:%M}): it may start earlier; raise --session-history")


def backfill(spark: SparkSession, settings: Settings, views: Sequence[FeatureView], ranges: Sequence[DayRange],
             source: KafkaReplay | BronzeSnapshot | FileSource, restate_online: bool = False,
             session_history: timedelta = DEFAULT_SESSION_HISTORY, bounds: Bounds | None = None) -> list[ViewOutcome]:
    """Recompute ``views`` on the days of ``ranges`` from ``source`` and replace those days of
    their feature tables; with ``restate_online`` also write each entity's latest recomputed
    row to Redis with the new table version as its version (newer event times still win).
    ``bounds``: the source's earliest and latest event time when the caller knows them (saves a
    scan of the whole source)."""
    ranges = sorted(ranges)
    by_topic: dict[str, list[FeatureView]] = {}
    for view in views:
        by_topic.setdefault(settings.source_topic(view), []).append(view)
    if isinstance(source, FileSource) and len(by_topic) > 1:
        raise BadSourceArguments(f"a file source holds one contract's events: choose views of one topic "
                                 f"({', '.join(sorted(by_topic))} asked)")
    outcomes = []
    for topic, topic_views in by_topic.items():
        read_from = min(r.begins for r in ranges) - max(history(v, session_history) for v in topic_views)
        read_to = max(r.ends for r in ranges) + max(lookahead(v) for v in topic_views)
        needed = set().union(*(needed_columns(v) for v in topic_views))
        loaded = load_events(spark, settings, topic, source, needed, read_from, read_to, bounds)
        events = loaded.events.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            count = events.count()
            if loaded.cached is not None:
                loaded.cached.unpersist()
            log.info("%s: %d events between %s and %s from %s (source spans %s .. %s)", topic, count,
                     f"{read_from:%Y-%m-%d %H:%M}", f"{read_to:%Y-%m-%d %H:%M}", loaded.description,
                     "?" if loaded.earliest == UNKNOWN_EARLIEST else loaded.earliest, loaded.latest)
            if loaded.earliest is not None and loaded.earliest > read_from:
                log.warning("%s: the source starts at %s, after the history needed (%s): features of the first "
                            "days cover only what the source has", topic, loaded.earliest, read_from)
            for view in topic_views:
                outcomes.append(_backfill_view(spark, settings, view, ranges, events, loaded, read_from,
                                               session_history, restate_online))
        finally:
            events.unpersist()
    return outcomes


def _backfill_view(spark: SparkSession, settings: Settings, view: FeatureView, ranges: Sequence[DayRange],
                   events: DataFrame, loaded: SourceEvents, read_from: datetime, session_history: timedelta,
                   restate_online: bool) -> ViewOutcome:
    started = time.monotonic()
    view_from = min(r.begins for r in ranges) - history(view, session_history)
    rows = range_features(events.filter(F.col(view.event_time) >= F.lit(view_from)), view, ranges, loaded.latest)
    rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        if view.kind == "session":
            _check_sessions(rows, view, view_from, loaded)
        _check_coverage(spark, settings.storage.feature_path(view.name), view, ranges, loaded)
        outcome = replace_days(rows, settings.storage.feature_path(view.name), ranges)
        online = None
        if restate_online and view.online.enabled:
            table = spark.read.format("delta").option("versionAsOf", outcome.table_version).load(
                settings.storage.feature_path(view.name))
            online = write_online(entities_latest_within(rows, table, view, ranges), view, settings.redis)
    finally:
        rows.unpersist()
    days = [d for r in ranges for d in r.days()]
    seconds = time.monotonic() - started
    log.info("%s: replaced event_date %s (%d days): %d rows, table version %d (%d files removed, %d added) "
             "in %.1fs%s", view.name, ", ".join(str(r) for r in ranges), len(days), outcome.rows,
             outcome.table_version, outcome.files_removed, outcome.files_added, seconds,
             f"; Redis {online.written} restated, {online.stale} older than stored" if online else "")
    return ViewOutcome(view.name, days, outcome.rows, outcome.table_version, online, seconds)
