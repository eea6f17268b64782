"""Late-window recompute: the days whose feature rows the stream computed without events that
arrived after their watermark, recomputed from bronze and restated in Redis.

Bronze keeps every valid event; a feature query leaves out (and counts) events behind its
watermark. An event is **late** here when its event time is behind the watermark the stream
could have had when it read the event: the latest event time among rows ingested in earlier
ingest batches *and in the event's own batch* (``ingested_at`` orders them) minus the view's
``allowed_lateness``. The own batch counts because the feature stream reads bronze
``max_files_per_trigger`` files at a time: one ingest commit can be split across two feature
micro-batches, the second running under a watermark the first moved with events of the same
commit. The stream's real watermark is never ahead of that bound (it has seen at most those
rows), so every event the stream dropped is found; events a feature batch still took in may be
found too (a batch of history spanning more than the lateness), which costs a recompute of
their days and changes no row.

Each run, per view: read bronze at its current version, take the rows ingested after the
previous run's cursor (Delta data skipping on ``ingested_at`` keeps this proportional to the
new rows, not to the table), find the late ones, and recompute the days they can change (the
event's own day up to ``max window + delay`` later for trailing views, ``window`` for sliding
views, ``gap`` for session views) with :func:`pipelines.batch.backfill.backfill` from that bronze
version, restating Redis (the rows' ``computed_at`` is their version, so the newer-wins
compare-and-set takes the corrected values for the same event time). A day the feature stream
still writes into (its watermark, from ``ops/feature_metrics``, has not passed the day's end)
is not replaced yet: its rows are not final, and the replace would race the stream's appends
(or write rows the stream writes again later); it is kept as pending and recomputed by the
first run after the watermark passes it. Then one row per view goes to the state table
``ops/late_recompute``: the cursor (latest ``ingested_at`` seen), the latest event time (the
next run's starting watermark), what was found, recomputed and left pending. A run that fails
before that row is written is simply redone by the next one (recomputing is idempotent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    DateType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from pipelines.batch.backfill import DEFAULT_SESSION_HISTORY, UNKNOWN_EARLIEST, DayRange, backfill, history
from pipelines.batch.sources import BronzeSnapshot, read_bronze
from pipelines.core.delta import ensure_delta_table
from pipelines.core.errors import SourceError
from pipelines.core.settings import Settings
from pipelines.core.times import day_start, spark_interval, utc_assuming_local
from pipelines.core.view_spec import FeatureView

log = logging.getLogger(__name__)

STATE_SCHEMA = StructType([
    StructField("view", StringType(), False),
    StructField("run_at", TimestampType(), False),
    StructField("bronze_version", LongType(), False),
    #: Bronze rows ingested at or before this were looked at (the next run's cursor).
    StructField("ingested_through", TimestampType(), True),
    #: The latest event time in bronze up to ``ingested_through`` (the next run's watermark).
    StructField("max_event_time", TimestampType(), True),
    StructField("new_rows", LongType(), False),
    StructField("late_events", LongType(), False),
    StructField("days_recomputed", ArrayType(DateType()), False),
    #: Days to recompute that the stream still writes (its watermark has not passed their
    #: end): left for a later run.
    StructField("days_pending", ArrayType(DateType()), False),
    StructField("feature_table_version", LongType(), True),
    StructField("rows_written", LongType(), False),
    StructField("online_restated", LongType(), False),
])


def influence(view: FeatureView, session_history: timedelta = DEFAULT_SESSION_HISTORY) -> timedelta:
    """How long after an event's time the view's rows can depend on it. A late event can join
    sessions before and after it into one that ends up to a session's length (at most
    ``session_history``, which the backfill enforces) plus ``gap`` later."""
    if view.kind == "session":
        assert view.gap is not None
        return session_history + view.gap
    return history(view)


def mark_late(rows: DataFrame, event_time: str, lateness: timedelta, previous_max: datetime | None) -> DataFrame:
    """``rows`` (bronze rows, with ``ingested_at``) plus ``late``: the event time is behind the
    latest event time of the rows ingested in the same or earlier ingest batches (or
    ``previous_max``, the latest before all of ``rows``) minus ``lateness``: the most any feature
    micro-batch reading the row could have seen (see the module docstring)."""
    batches = rows.groupBy("ingested_at").agg(F.max(event_time).alias("_batch_max"))
    # One row per ingest batch: a window over all of them (no partition) is small.
    earlier = Window.orderBy("ingested_at").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    prior = F.max("_batch_max").over(earlier)
    if previous_max is not None:
        prior = F.greatest(prior, F.lit(previous_max))  # greatest skips nulls
    watermarks = batches.select("ingested_at", (prior - F.expr(f"INTERVAL {spark_interval(lateness)}"))
                                .alias("_watermark"))
    return rows.join(F.broadcast(watermarks), "ingested_at").withColumn(
        "late", F.coalesce(F.col(event_time) < F.col("_watermark"), F.lit(False))
    ).drop("_watermark")


def affected_days(late: DataFrame, view: FeatureView, last_day: date,
                  session_history: timedelta = DEFAULT_SESSION_HISTORY) -> list[date]:
    """Every UTC day, up to ``last_day``, holding rows that ``late`` events can change."""
    reach = F.expr(f"INTERVAL {spark_interval(influence(view, session_history))}")
    days = late.select(F.explode(F.sequence(F.to_date(view.event_time),
                                            F.to_date(F.col(view.event_time) + reach))).alias("day")).distinct()
    return sorted(d for (d,) in days.collect() if d <= last_day)


def day_ranges(days: Sequence[date]) -> list[DayRange]:
    """Consecutive days grouped into ranges."""
    ranges: list[DayRange] = []
    for day in sorted(days):
        if ranges and ranges[-1].end == day:
            ranges[-1] = DayRange(ranges[-1].start, day + timedelta(days=1))
        else:
            ranges.append(DayRange(day, day + timedelta(days=1)))
    return ranges


@dataclass(frozen=True)
class LateOutcome:
    view: str
    new_rows: int
    late_events: int
    #: Days recomputed by this run, and days left for a later one (the stream still writes them).
    days: list[date]
    pending: list[date]
    rows_written: int
    feature_table_version: int | None
    online_restated: int
    seconds: float


def _previous_run(spark: SparkSession, path: str, view: str) -> tuple[datetime | None, datetime | None, list[date]]:
    """(ingested_through, max_event_time, days_pending) of the view's last recorded run
    (None, None, []: the first run)."""
    last = (spark.read.format("delta").load(path).filter(F.col("view") == view)
            .orderBy(F.col("run_at").desc()).limit(1).collect())
    if not last:
        return None, None, []
    row = last[0]
    return (utc_assuming_local(row.ingested_through) if row.ingested_through else None,
            utc_assuming_local(row.max_event_time) if row.max_event_time else None, list(row.days_pending or []))


#: The watermark of a view no feature stream has ever run for: nothing to wait for.
NO_STREAM = datetime.max.replace(tzinfo=timezone.utc)


def stream_watermark(spark: SparkSession, settings: Settings, view: FeatureView) -> datetime | None:
    """The feature stream's latest watermark for ``view`` from ``ops/feature_metrics``: None
    when the stream has batches but no watermark yet (every day waits), :data:`NO_STREAM` when
    it has never run for the view (nothing waits)."""
    path = settings.storage.feature_metrics_path
    if not DeltaTable.isDeltaTable(spark, path):
        return NO_STREAM
    seen = (spark.read.format("delta").load(path).filter(F.col("view") == view.name)
            .agg(F.count(F.lit(1)).alias("batches"), F.max("watermark").alias("watermark")).collect()[0])
    if not seen["batches"]:
        return NO_STREAM
    return utc_assuming_local(seen["watermark"]) if seen["watermark"] else None


@dataclass(frozen=True)
class _Found:
    """What one view's scan of the newly ingested bronze rows found."""

    view: FeatureView
    topic: str
    bronze_version: int
    through: datetime | None
    latest: datetime | None
    new_rows: int
    late_events: int
    #: Days to recompute now, and days left until the stream's watermark passes them.
    days: list[date]
    pending: list[date]


def _find_late(spark: SparkSession, settings: Settings, view: FeatureView, state_path: str,
               session_history: timedelta) -> _Found:
    topic = settings.source_topic(view)
    bronze, version = read_bronze(spark, settings, topic, BronzeSnapshot())
    assert version is not None
    cursor, previous_max, pending = _previous_run(spark, state_path, view.name)
    new = bronze.select(view.entity, view.event_time, "ingested_at")
    if cursor is not None:
        new = new.filter(F.col("ingested_at") > F.lit(cursor))
    marked = mark_late(new, view.event_time, view.allowed_lateness, previous_max).cache()
    try:
        summary = marked.agg(F.count(F.lit(1)).alias("rows"), F.sum(F.col("late").cast("long")).alias("late"),
                             F.max("ingested_at").alias("through"), F.max(view.event_time).alias("latest")).collect()[0]
        new_rows, late_count = summary["rows"], summary["late"] or 0
        through = utc_assuming_local(summary["through"]) if summary["through"] else cursor
        latest = max([t for t in (previous_max, utc_assuming_local(summary["latest"]) if summary["latest"] else None) if t],
                     default=None)
        days = affected_days(marked.filter("late"), view, latest.date(), session_history) if late_count and latest else []
    finally:
        marked.unpersist()
    # A day the stream still writes into cannot be replaced now: its rows there are not final
    # (and replacing them would race its appends). It waits until the watermark passes its end.
    watermark = stream_watermark(spark, settings, view)
    wanted = sorted(set(days) | set(pending))
    ready = [d for d in wanted if watermark is not None and day_start(d + timedelta(days=1)) <= watermark]
    waiting = [d for d in wanted if d not in ready]
    log.info("%s: %d bronze rows ingested since %s (bronze %s version %d), %d late%s%s", view.name, new_rows,
             cursor or "the start", topic, version, late_count,
             f"; recomputing {', '.join(str(r) for r in day_ranges(ready))}" if ready else "",
             f"; waiting for the stream's watermark ({watermark or 'none yet'}) to pass "
             f"{', '.join(str(r) for r in day_ranges(waiting))}" if waiting else "")
    return _Found(view, topic, version, through, latest, new_rows, late_count, ready, waiting)


def recompute_late(spark: SparkSession, settings: Settings, views: Sequence[FeatureView],
                   session_history: timedelta = DEFAULT_SESSION_HISTORY) -> list[LateOutcome]:
    """One late-window recompute run over ``views`` (see the module docstring). Views of one
    topic with the same days to recompute share one backfill (one read of bronze)."""
    state_path = settings.storage.late_recompute_path
    ensure_delta_table(spark, state_path, STATE_SCHEMA)
    started = time.monotonic()
    found = [_find_late(spark, settings, view, state_path, session_history) for view in views]
    scan_seconds = (time.monotonic() - started) / max(len(found), 1)
    groups: dict[tuple, list[_Found]] = {}
    for item in found:
        if item.days:
            groups.setdefault((item.topic, item.bronze_version, tuple(item.days), item.latest), []).append(item)
    done: dict[str, tuple] = {}
    failed: dict[str, str] = {}
    for (_, version, days, latest), items in groups.items():
        started = time.monotonic()
        # Latest event time known from the state: no scan of the whole bronze table. The
        # earliest is unknown: taken as older than any history read (sessions are checked).
        try:
            results = backfill(spark, settings, [i.view for i in items], day_ranges(days),
                               BronzeSnapshot(version=version), restate_online=True, session_history=session_history,
                               bounds=(UNKNOWN_EARLIEST, latest))
        except SourceError as exc:
            # These views keep their cursor (no state row): the next run retries them; the
            # other views go on.
            log.error("late recompute of %s failed: %s", ", ".join(i.view.name for i in items), exc)
            failed.update({i.view.name: str(exc) for i in items})
            continue
        seconds = (time.monotonic() - started) / len(items)
        for outcome in results:
            done[outcome.view] = (outcome.rows, outcome.table_version,
                                  outcome.online.written if outcome.online else 0, seconds)
    now = datetime.now(timezone.utc)
    outcomes, state = [], []
    for item in found:
        if item.view.name in failed:
            continue
        written, table_version, restated, seconds = done.get(item.view.name, (0, None, 0, 0.0))
        state.append((item.view.name, now, item.bronze_version, item.through, item.latest, item.new_rows,
                      item.late_events, item.days, item.pending, table_version, written, restated))
        outcomes.append(LateOutcome(item.view.name, item.new_rows, item.late_events, item.days, item.pending, written,
                                    table_version, restated, scan_seconds + seconds))
    # One commit for every view's progress: written only once all their recomputes are done.
    if state:
        spark.createDataFrame(state, STATE_SCHEMA).write.format("delta").mode("append").save(state_path)
    if failed:
        raise SourceError("; ".join(f"{view}: {reason}" for view, reason in failed.items()))
    return outcomes
