"""Trailing views on a stream: per-entity state in ``transformWithStateInPandas`` (RocksDB).

The batch transform (:func:`pipelines.aggregations.trailing_features`) uses a RANGE window
over all of an entity's events; a stream only ever sees the new ones. So each entity keeps, in
state, the events that a future event can still need: with watermark W, a future event has
time t >= W and covers ``(t - delay - window, t - delay]``, so events at or before
``W - (max window + delay)`` are dropped from state, and an event-time timer clears an idle
entity entirely. For every new event the features are computed over the retained and the new
events with exactly the batch semantics (half-open interval, ties, delay, empty intervals,
``last``), so for in-order input the stream and the batch agree row for row.

State per entity is bounded by ``max_events_per_entity``: beyond it the oldest events are
evicted, and the entity's later features cover only the events kept (each eviction is logged
with the entity, so the under-count is never silent).

Events behind the watermark (their interval may reach events already dropped from state) are
not computed: they are left out, and logged with their count. Events arriving in different
micro-batches at exactly the same event time do not see each other the way a batch does
(the first one is already emitted); events of one micro-batch do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql.streaming import StatefulProcessor, StatefulProcessorHandle
from pyspark.sql.types import LongType, StructField, StructType

from pipelines.aggregations import trailing_features
from pipelines.views import FeatureView

log = logging.getLogger(__name__)

_MICROS = "_event_micros"


def _micros(values: pd.Series) -> pd.Series:
    stamps = pd.to_datetime(values)
    if stamps.dt.tz is not None:
        stamps = stamps.dt.tz_convert("UTC").dt.tz_localize(None)
    return stamps.astype("datetime64[us]").astype("int64")


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


def compute_trailing(events: pd.DataFrame, is_new: pd.Series, view: FeatureView) -> pd.DataFrame:
    """Features of the rows flagged ``is_new``, over all of ``events`` (one entity, any order)."""
    ordered = events.assign(_new=is_new.values).sort_values(_MICROS, kind="stable").reset_index(drop=True)
    times = ordered[_MICROS].to_numpy()
    new_rows = np.flatnonzero(ordered["_new"].to_numpy())
    event_times = times[new_rows]
    delay = int(view.delay.total_seconds() * 1_000_000)
    out = {view.entity: ordered[view.entity].iloc[new_rows].to_numpy(),
           view.event_time: ordered[view.event_time].iloc[new_rows].reset_index(drop=True)}
    present: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, function, column, window in view.outputs():
        width = int(window.total_seconds() * 1_000_000)
        lo = times.searchsorted(event_times - delay - width, side="right")
        hi = times.searchsorted(event_times - delay, side="right")
        if column == "*":
            out[name] = hi - lo
            continue
        if column not in present:
            mask = ordered[column].notna().to_numpy()
            present[column] = (np.flatnonzero(mask), ordered[column].to_numpy(dtype=object))
        positions, values = present[column]
        # Present values of [lo, hi) are those whose position p has lo <= p < hi.
        first = positions.searchsorted(lo, side="left")
        last = positions.searchsorted(hi, side="left")
        out[name] = [
            _window_values(function, [values[p] for p in positions[a:b]], [times[p] for p in positions[a:b]])
            for a, b in zip(first, last)
        ]
    return pd.DataFrame(out)


class TrailingProcessor(StatefulProcessor):
    """Keeps each entity's recent events and emits one feature row per new event."""

    def __init__(self, view: FeatureView, state_schema: StructType, output_schema: StructType):
        self.view = view
        self.state_schema = state_schema
        self.output_schema = output_schema
        self.state_columns = [f.name for f in state_schema.fields]
        self.lookback = int(view.max_lookback.total_seconds() * 1_000_000)

    def init(self, handle: StatefulProcessorHandle) -> None:
        self.handle = handle
        self.events = handle.getListState("events", self.state_schema)

    def handleInputRows(self, key: Any, rows: Iterator[pd.DataFrame], timerValues: Any) -> Iterator[pd.DataFrame]:
        watermark = timerValues.getCurrentWatermarkInMs() * 1000
        new = pd.concat(list(rows), ignore_index=True)
        new[_MICROS] = _micros(new[self.view.event_time])
        late = new[_MICROS] < watermark
        if late.any():
            log.warning("view %s: %d events of %r behind the watermark left out", self.view.name, int(late.sum()), key)
            new = new[~late]
        if new.empty:
            return
        stored = pd.DataFrame(list(self.events.get()), columns=self.state_columns) if self.events.exists() else None
        new_state = new[self.state_columns]
        everything = new_state if stored is None or stored.empty else pd.concat([stored, new_state], ignore_index=True)
        is_new = pd.Series([False] * (len(everything) - len(new_state)) + [True] * len(new_state))
        features = compute_trailing(everything, is_new, self.view)
        retained = everything[everything[_MICROS] > watermark - self.lookback]
        if len(retained) > self.view.max_events_per_entity:
            log.warning("view %s: entity %r has %d events in state, over max_events_per_entity=%d: "
                        "the oldest are evicted and its later features under-count", self.view.name, key,
                        len(retained), self.view.max_events_per_entity)
            retained = retained.sort_values(_MICROS, kind="stable").iloc[-self.view.max_events_per_entity:]
        self.events.put([tuple(r) for r in retained.itertuples(index=False, name=None)])
        for timer in self.handle.listTimers():
            self.handle.deleteTimer(timer)
        self.handle.registerTimer(int(retained[_MICROS].max() + self.lookback) // 1000 + 1)
        yield _typed(features, self.output_schema)

    def handleExpiredTimer(self, key: Any, timerValues: Any, expiredTimerInfo: Any) -> Iterator[pd.DataFrame]:
        # No event of this entity for max window + delay: nothing it holds is needed any more.
        self.events.clear()
        return iter(())

    def close(self) -> None:
        pass


def _typed(frame: pd.DataFrame, schema: StructType) -> pd.DataFrame:
    """Nullable pandas dtypes, so that missing values reach Spark as nulls, not NaN."""
    out = pd.DataFrame()
    for field in schema.fields:
        values = frame[field.name]
        kind = field.dataType.simpleString()
        if kind in ("bigint", "int"):
            out[field.name] = values.astype("Int64")
        elif kind in ("double", "float"):
            out[field.name] = values.astype("Float64")
        elif kind == "boolean":
            out[field.name] = values.astype("boolean")
        else:
            out[field.name] = values.astype(object).where(values.notna(), None)
    return out


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
    processor = TrailingProcessor(view, state_schema, output_schema)
    return (
        events.select(*columns)
        .filter(f"{view.entity} IS NOT NULL AND {view.event_time} IS NOT NULL")
        .withWatermark(view.event_time, f"{int(view.allowed_lateness.total_seconds())} seconds")
        .groupBy(view.entity)
        .transformWithStateInPandas(processor, output_schema, "Append", "EventTime")
    )
