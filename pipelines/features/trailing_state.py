"""Trailing views on a stream: per-entity state in ``transformWithState`` (RocksDB).

The batch transform (:func:`pipelines.features.transforms.trailing_features`) uses a RANGE window
over all of an entity's events; a stream only ever sees the new ones. So each entity keeps, in
state, the events that a future event can still need: with watermark W, a future event has
time t >= W and covers ``(t - delay - window, t - delay]``, so events at or before
``W - (max window + delay)`` are dropped from state, and an event-time timer clears an idle
entity entirely. For every new event the features are computed over the retained and the new
events with exactly the batch semantics (half-open interval, ties, delay, empty intervals,
``last``), so for in-order input the stream and the batch agree row for row.

The processor works on plain rows and tuples, not pandas: most entities bring one or two
events per micro-batch, and per-entity pandas frames cost ~20 ms each (measured), which made a
1,000-entity batch take 20 s. Each entity's new events are appended to its list state; the list
is rewritten (pruned) only once enough of it has expired.

State per entity is bounded by ``max_events_per_entity``: beyond it the oldest events are
evicted, and the entity's later features cover only the events kept (each eviction is logged
with the entity, so the under-count is never silent).

**Corrections.** An event that arrives after later events of its entity (out of order, but
ahead of the watermark) changes the rows already emitted for those later events: every stored
event whose interval ``(s - delay - window, s - delay]`` covers a new event's time is emitted
again, recomputed over everything the entity holds, as a corrected row (the sink gives it the
batch's ``computed_at``, later than the row it corrects, and Redis takes it as a newer version
of the same event time). So the latest row of each event is the batch transform's row, whatever
the arrival order; events at exactly the same time arriving in different micro-batches see each
other the same way. In-order input emits no correction (no stored event is later than a new
one).

Events behind the watermark (their interval may reach events already dropped from state) are
not computed: they are left out, and logged with their count; the late recompute
(:mod:`pipelines.batch.late`) rewrites their days from bronze.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, Row
from pyspark.sql import functions as F
from pyspark.sql.streaming import StatefulProcessor, StatefulProcessorHandle
from pyspark.sql.types import DateType, LongType, StructField, StructType, TimestampType

from pipelines.core.times import from_epoch_micros, micros, spark_interval, utc_assuming_local
from pipelines.core.view_spec import FeatureView
from pipelines.features.transforms import trailing_features

log = logging.getLogger(__name__)

#: Event time in microseconds since the epoch, computed by Spark (no time-zone guesswork in
#: the Python worker); the last field of every state tuple.
_MICROS = "_event_micros"
#: Rewrite an entity's list state once this share of it has expired (appends otherwise).
_PRUNE_SHARE = 0.25


def _window_values(function: str, values: list, times: list) -> Any:
    """One feature over the present (non-null) values of an interval, in time order."""
    if function == "count":
        return len(values)
    if function == "approx_count_distinct":
        return len(set(values))
    if function == "sum":
        return sum(values) if values else 0
    if not values:
        return None
    if function == "avg":
        return float(sum(values)) / len(values)
    if function == "min":
        return min(values)
    if function == "max":
        return max(values)
    if function == "last":
        latest = times[-1]
        return max(v for v, t in zip(values, times) if t == latest)
    raise ValueError(function)


def affected(stored_times: Sequence[int], new_times: Sequence[int], view: FeatureView) -> list[int]:
    """Indexes of the stored events (times in µs) to emit again with a batch's new events: those
    whose interval ``(s - delay - max window, s - delay]`` holds some new event's time (their
    rows change), and those at exactly a new event's time (so that the rows of one entity and
    event time always come from one batch: the latest ``computed_at`` per entity and time is then
    every event's latest row)."""
    if not len(stored_times) or not len(new_times):
        return []
    delay, widest = micros(view.delay), max(micros(w) for _, _, _, w in view.outputs())
    news = np.sort(np.asarray(new_times, dtype=np.int64))
    times = np.asarray(stored_times, dtype=np.int64)
    reach = times - delay
    # The latest new time at or before each stored event's reach; inside the interval if closer than the window.
    at = news.searchsorted(reach, side="right") - 1
    hit = (at >= 0) & (reach - news[np.maximum(at, 0)] < widest)
    same = np.isin(times, news)
    return [int(i) for i in np.flatnonzero(hit | same)]


def compute_trailing(events: Sequence[tuple], targets: Sequence[int], columns: Sequence[str],
                     view: FeatureView) -> list[dict[str, Any]]:
    """Feature rows of the events at indexes ``targets`` over all of ``events`` (one entity,
    any order).

    ``events`` are tuples of ``columns`` values followed by the event time in microseconds.
    Each target event covers the events with time in ``(t - delay - window, t - delay]``: the
    half-open interval of the batch transform, ties at ``t`` included.
    """
    order = sorted(range(len(events)), key=lambda i: events[i][-1])
    ordered = [events[i] for i in order]
    times = np.fromiter((e[-1] for e in ordered), dtype=np.int64, count=len(ordered))
    wanted = set(targets)
    new_positions = [p for p, i in enumerate(order) if i in wanted]
    event_times = times[new_positions]
    delay = micros(view.delay)
    entity_at, time_at = columns.index(view.entity), columns.index(view.event_time)
    rows = [{view.entity: ordered[p][entity_at], view.event_time: ordered[p][time_at]} for p in new_positions]
    present: dict[str, tuple[np.ndarray, list]] = {}
    for name, function, column, window in view.outputs():
        width = micros(window)
        lows = times.searchsorted(event_times - delay - width, side="right")
        highs = times.searchsorted(event_times - delay, side="right")
        if column == "*":
            for row, lo, hi in zip(rows, lows, highs):
                row[name] = int(hi - lo)
            continue
        if column not in present:
            at = columns.index(column)
            positions = np.array([p for p, e in enumerate(ordered) if e[at] is not None], dtype=np.int64)
            present[column] = (positions, [ordered[p][at] for p in positions])
        positions, values = present[column]
        # The present values of [lo, hi) are those whose position p has lo <= p < hi.
        firsts = positions.searchsorted(lows, side="left")
        lasts = positions.searchsorted(highs, side="left")
        for row, a, b in zip(rows, firsts, lasts):
            row[name] = _window_values(function, values[a:b], [int(times[p]) for p in positions[a:b]])
    return rows


class TrailingProcessor(StatefulProcessor):
    """Keeps each entity's recent events and emits one feature row per new event."""

    def __init__(self, view: FeatureView, columns: Sequence[str], state_schema: StructType, output_schema: StructType):
        self.view = view
        self.columns = list(columns)
        self.state_schema = state_schema
        self.output_names = [f.name for f in output_schema.fields]
        self.lookback = micros(view.max_lookback)
        #: (position, type) of the state fields that PySpark may return as internal ints.
        self.internal_fields = [(i, f.dataType) for i, f in enumerate(state_schema.fields[:-1])
                                if isinstance(f.dataType, (TimestampType, DateType))]

    def _canonical(self, event: tuple) -> tuple:
        """An event tuple with timestamps as aware UTC datetimes and dates as dates.

        PySpark hands the same timestamp in different forms: naive local time in input rows,
        and from list state either aware UTC or Spark's internal µs, depending on how it was
        written. A timestamp feature (min/max/last of a timestamp column) must compare like
        with like."""
        if not self.internal_fields:
            return tuple(event)
        values = list(event)
        for i, data_type in self.internal_fields:
            value = values[i]
            if value is None:
                continue
            if isinstance(data_type, TimestampType):
                values[i] = from_epoch_micros(value) if isinstance(value, int) else utc_assuming_local(value)
            elif isinstance(value, int):
                values[i] = data_type.fromInternal(value)
        return tuple(values)

    def init(self, handle: StatefulProcessorHandle) -> None:
        self.handle = handle
        self.events = handle.getListState("events", self.state_schema)

    def handleInputRows(self, key: Any, rows: Iterator[Row], timerValues: Any) -> Iterator[Row]:
        watermark = timerValues.getCurrentWatermarkInMs() * 1000
        new, late = [], 0
        for row in rows:
            event = self._canonical(tuple(row[c] for c in self.columns) + (row[_MICROS],))
            if event[-1] < watermark:
                late += 1
            else:
                new.append(event)
        if late:
            log.warning("view %s: %d events of %r behind the watermark left out", self.view.name, late, key)
        if not new:
            return
        stored = [self._canonical(e) for e in self.events.get()]  # empty for a new entity
        everything = stored + new
        # The new events' rows, and corrected rows of the stored events an earlier arrival changes.
        corrected = affected([e[-1] for e in stored], [e[-1] for e in new], self.view)
        targets = corrected + list(range(len(stored), len(everything)))
        features = compute_trailing(everything, targets, self.columns, self.view)
        horizon = watermark - self.lookback
        expired = sum(1 for e in stored if e[-1] <= horizon)
        limit = self.view.max_events_per_entity
        if len(everything) - expired > limit:
            log.warning("view %s: entity %r has %d events in state, over max_events_per_entity=%d: "
                        "the oldest are evicted and its later features under-count", self.view.name, key,
                        len(everything) - expired, limit)
        if expired > _PRUNE_SHARE * len(stored) or len(everything) - expired > limit:
            kept = sorted((e for e in everything if e[-1] > horizon), key=lambda e: e[-1])[-limit:]
            self.events.put(kept)
        else:
            # Expired events left in the list are harmless: no future interval reaches them.
            self.events.appendList(new)
        newest = max(e[-1] for e in everything)
        for timer in self.handle.listTimers():
            self.handle.deleteTimer(timer)
        self.handle.registerTimer((newest + self.lookback) // 1000 + 1)
        for feature_row in features:
            yield Row(**{name: feature_row[name] for name in self.output_names})

    def handleExpiredTimer(self, key: Any, timerValues: Any, expiredTimerInfo: Any) -> Iterator[Row]:
        # No event of this entity for max window + delay: nothing it holds is needed any more.
        self.events.clear()
        return iter(())

    def close(self) -> None:
        pass


def trailing_features_stream(events: DataFrame, view: FeatureView) -> DataFrame:
    """The streaming twin of :func:`trailing_features` (same output schema and values)."""
    spark = events.sparkSession
    columns = [view.entity, view.event_time] + sorted(
        {column for _, _, column, _ in view.outputs() if column not in ("*", view.entity, view.event_time)}
    )
    empty = spark.createDataFrame([], events.select(*columns).schema)
    output_schema = StructType([StructField(f.name, f.dataType, True) for f in trailing_features(empty, view).schema])
    input_types = {f.name: f.dataType for f in events.schema.fields}
    state_schema = StructType(
        [StructField(c, input_types[c], True) for c in columns] + [StructField(_MICROS, LongType(), True)]
    )
    processor = TrailingProcessor(view, columns, state_schema, output_schema)
    return (
        events.select(*columns, F.unix_micros(F.col(view.event_time)).alias(_MICROS))
        .filter(f"{view.entity} IS NOT NULL AND {view.event_time} IS NOT NULL")
        .withWatermark(view.event_time, spark_interval(view.allowed_lateness))
        .groupBy(view.entity)
        .transformWithState(processor, output_schema, "Append", "EventTime")
    )
