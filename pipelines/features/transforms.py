"""Feature-view transforms: pure ``DataFrame -> DataFrame`` functions, one per view kind.

The same functions run on a static DataFrame (tests, backfills) and, for sliding and session
views, on a streaming one (the watermark they declare is a no-op on static data). Semantics,
boundaries and nulls are those documented in :mod:`pipelines.core.view_spec`; in short:

* functions over an empty interval: ``count`` and ``approx_count_distinct`` 0, ``sum`` 0,
  ``avg``/``min``/``max``/``last`` null; null values are ignored by every function but
  ``count`` of ``*``;
* ``last``: the value of the latest event in the interval with a non-null value; among events
  at that same time, the greatest value (so the result does not depend on row order);
* ``approx_count_distinct``: exact in trailing views (stream and batch both count the
  interval's distinct values), Spark's HyperLogLog++ (relative error ~5%) in sliding and
  session views, the same function on a stream and in a batch.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from pipelines.core.times import micros, spark_interval
from pipelines.core.view_spec import FeatureView


def _aggregate(function: str, column: str, event_time: str) -> Column:
    """The aggregate expression of ``function`` over ``column`` (a window or a group)."""
    if column == "*":
        return F.count(F.lit(1))
    value = F.col(column)
    if function == "count":
        return F.count(value)
    if function == "sum":
        return F.sum(value)
    if function == "avg":
        return F.avg(value)
    if function == "min":
        return F.min(value)
    if function == "max":
        return F.max(value)
    if function == "approx_count_distinct":
        return F.approx_count_distinct(value)
    if function == "last":
        # The latest (time, value) pair; _finish takes the value out.
        return F.max(F.when(value.isNotNull(), F.struct(F.col(event_time).alias("t"), value.alias("v"))))
    raise ValueError(f"unsupported function {function!r}")  # view_spec.check_view rejects it first


def _finish(function: str, aggregated: Column) -> Column:
    """The feature value from an aggregate (after ``.over(...)`` for window functions)."""
    if function == "sum":
        # A sum over nothing (or only nulls) is 0, not null: counts and sums add up.
        return F.coalesce(aggregated, F.lit(0).cast("long"))
    if function == "last":
        return aggregated.getField("v")
    return aggregated


def trailing_features(events: DataFrame, view: FeatureView) -> DataFrame:
    """One row per event: ``entity``, ``event_time`` and every feature of the trailing view.

    For an event of entity k at time t, a feature over window w aggregates k's events with
    event time in ``(t - delay - w, t - delay]``. Events with a null entity or event time are
    not features of anything and are left out (bronze never has them: the contract requires
    both).
    """
    event_micros = "_event_micros"
    rows = events.filter(F.col(view.entity).isNotNull() & F.col(view.event_time).isNotNull())
    rows = rows.withColumn(event_micros, F.unix_micros(F.col(view.event_time)))
    ordered = Window.partitionBy(view.entity).orderBy(event_micros)
    delay = micros(view.delay)
    features = []
    for name, function, column, window in view.outputs():
        assert window is not None
        # RANGE frames include every row with an ordering value in [current + lo, current + hi]:
        # lo = -(delay + w) + 1 microsecond makes the interval open at t - delay - w.
        frame = ordered.rangeBetween(-(delay + micros(window)) + 1, -delay)
        if function == "approx_count_distinct" and column != "*":
            # Exact for trailing views: the stream holds the interval's events and counts them
            # exactly, so the batch must too (HyperLogLog++ undercounts on hash collisions).
            value = F.size(F.collect_set(F.col(column)).over(frame)).cast("long")
        else:
            value = _finish(function, _aggregate(function, column, view.event_time).over(frame))
        features.append(value.alias(name))
    return rows.select(view.entity, view.event_time, *features)


def sliding_features(events: DataFrame, view: FeatureView) -> DataFrame:
    """One row per (entity, window) with events: ``entity``, ``window_start``, ``window_end``
    and the features. Windows are ``[start, end)``, aligned to the epoch, ``slide`` apart; an
    event belongs to every window that contains it. On a stream, a window is emitted once the
    watermark (max event time - ``allowed_lateness``) passes its end; later events are dropped
    and counted by Spark (``numRowsDroppedByWatermark``)."""
    assert view.window is not None
    slide = view.slide or view.window
    grouped = (
        events.filter(F.col(view.entity).isNotNull())
        .withWatermark(view.event_time, spark_interval(view.allowed_lateness))
        .groupBy(view.entity, F.window(view.event_time, spark_interval(view.window), spark_interval(slide)).alias("w"))
    )
    features = [
        _finish(function, _aggregate(function, column, view.event_time)).alias(name)
        for name, function, column, _ in view.outputs()
    ]
    return grouped.agg(*features).select(
        view.entity, F.col("w.start").alias("window_start"), F.col("w.end").alias("window_end"),
        *[name for name, *_ in view.outputs()],
    )


def session_features(events: DataFrame, view: FeatureView) -> DataFrame:
    """One row per (entity, session): ``session_start`` (first event), ``session_end`` (last
    event + gap), ``event_count``, ``duration_seconds`` (last - first event), the features, and
    ``count_{column}_{value}`` per ``count_by`` value. A session closes after ``gap`` without
    events of its entity; on a stream it is emitted once the watermark passes its end."""
    assert view.gap is not None
    grouped = (
        events.filter(F.col(view.entity).isNotNull())
        .withWatermark(view.event_time, spark_interval(view.allowed_lateness))
        .groupBy(view.entity, F.session_window(view.event_time, spark_interval(view.gap)).alias("s"))
    )
    features = [
        F.count(F.lit(1)).alias("event_count"),
        F.min(view.event_time).alias("_first"),
        F.max(view.event_time).alias("_last"),
    ]
    features += [
        _finish(function, _aggregate(function, column, view.event_time)).alias(name)
        for name, function, column, _ in view.outputs()
    ]
    counted = []
    for by in view.count_by:
        for value in by.values:
            name = f"count_{by.column}_{value}"
            features.append(F.count(F.when(F.col(by.column).cast("string") == value, True)).alias(name))
            counted.append(name)
    # Start and end from the aggregates, not from the grouping key ``s`` (equal values: first
    # event, last event + gap): Spark pushes a filter on a grouping key below the aggregate, and
    # for session windows that key is each event's own [t, t + gap) before the merge, so a
    # filter such as ``session_end <= x`` on the result would drop events, not sessions.
    return grouped.agg(*features).select(
        view.entity,
        F.col("_first").alias("session_start"),
        (F.col("_last") + F.expr(f"INTERVAL {spark_interval(view.gap)}")).alias("session_end"),
        "event_count",
        ((F.unix_micros("_last") - F.unix_micros("_first")) / 1_000_000).alias("duration_seconds"),
        *[name for name, *_ in view.outputs()],
        *counted,
    )


def view_features(events: DataFrame, view: FeatureView) -> DataFrame:
    """The features of ``view`` over ``events`` (dispatch on the view's kind)."""
    return {"trailing": trailing_features, "sliding": sliding_features, "session": session_features}[view.kind](
        events, view
    )
