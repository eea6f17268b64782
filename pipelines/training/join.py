"""Point-in-time-correct training sets: the as-of join of a spine to feature tables, the leakage
guard and report that run on every build, and the content hash that makes a build checkable.

Everything here is a pure DataFrame transform or one aggregation over a DataFrame: the same
code runs on a laptop and on a cluster. Reading inputs, MLflow and writing the table live in
:mod:`pipelines.training.build`.

The join (:func:`point_in_time_join`). For each spine row with timestamp T and each requested
view, the view's feature row of the same entity with the greatest event time in
``[T - max_age, T]`` (both ends included; a view's event time is the event's own time for
trailing views, the window end for sliding views, the session end for session views, the
change's commit time for attributes views). Ties on event time: the latest ``computed_at``,
(attributes views: then the highest LSN, the later change), then the greatest feature values
(compared in column order, nulls lowest), so the same data always gives the same row. An
attributes view's row is the change in force at T: after a delete, its row of nulls. A left join: every spine row
appears exactly once, duplicates included; no row in range, a null entity key or a null
timestamp give nulls (the join's rule; a build's leakage guard then rejects null timestamps).

Modes:

* ``as_corrected`` (the default): every row the feature table holds now, late corrections
  included: the best values we know for the past, which is what a model should learn from.
* ``as_served``: only rows with ``computed_at <= T``, an approximation of what the online store
  could have served at T, to measure train/serve skew. A row the late recompute or a backfill
  replaced carries its new ``computed_at``, so this mode sees the older row it replaced only if
  that older row is still in the table (it is not: replaced rows are gone; it then falls back to
  the previous row of the entity or to nulls).

How: per view, the spine rows and the feature rows are unioned, partitioned by entity, ordered
by time (feature rows before spine rows at equal times, so T itself is included) and each spine
row takes the running maximum of ``(event time, computed_at, features...)`` over the rows before
it: one shuffle and one sort per view, linear in the rows, no range-join blow-up on entities
with many rows (BENCHMARKS.md compares it with a range join, pandas and DuckDB).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, NumericType, TimestampType

from pipelines.core.errors import ConfigError, PipelineError
from pipelines.core.times import format_duration, micros, utc_assuming_local
from pipelines.core.view_spec import FeatureView, event_time_column, feature_names

MODES = ("as_corrected", "as_served")
DEFAULT_MODE = "as_corrected"

_KEY, _TIME, _SIDE, _ROW, _BEST = "__pit_key", "__pit_time", "__pit_side", "__pit_row", "__pit_best"
_FEATURE_SIDE, _SPINE_SIDE = 0, 1


def output_column(view: str, name: str) -> str:
    """A view's column in the training table: ``{view}__{name}`` (two views may share names)."""
    return f"{view}__{name}"


@dataclass(frozen=True)
class ViewRequest:
    """One view of a training set: which features, how old a row may be, which spine column
    holds the view's entity."""

    view: FeatureView
    features: tuple[str, ...]
    max_age: timedelta
    join_key: str

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def event_time_output(self) -> str:
        return output_column(self.name, "event_time")

    @property
    def computed_at_output(self) -> str:
        return output_column(self.name, "computed_at")

    def feature_outputs(self) -> list[str]:
        return [output_column(self.name, f) for f in self.features]

    def output_columns(self) -> list[str]:
        """What the join adds for this view: its row's event time and ``computed_at`` (for audit
        and the leakage guard), then the features."""
        return [self.event_time_output, self.computed_at_output, *self.feature_outputs()]

    def describe(self) -> dict[str, Any]:
        return {"view": self.name, "features": list(self.features), "max_age": format_duration(self.max_age),
                "join_key": self.join_key}


def view_request(view: FeatureView, features: Sequence[str] | None = None, max_age: timedelta | None = None,
                 join_key: str | None = None) -> ViewRequest:
    """A request for ``view``: all its features unless ``features`` names some, its own
    ``training_max_age`` unless ``max_age`` overrides it, its entity column as the spine's join
    key unless ``join_key`` names another. Unknown features or a non-positive age fail, naming
    them."""
    available = feature_names(view)
    chosen = tuple(features) if features else tuple(available)
    unknown = [f for f in chosen if f not in available]
    if unknown:
        raise ConfigError(f"--features: {view.name} has no feature {', '.join(unknown)} ({', '.join(available)})")
    if max_age is not None and not view.computed:
        raise ConfigError(f"--max-age: {view.name} is an attributes view: a row holds until the table changes it "
                          "(the online store serves it whatever its age)")
    age = max_age if max_age is not None else view.training_max_age
    if age <= timedelta(0):
        raise ConfigError(f"--max-age: {view.name}: must be positive")
    return ViewRequest(view, chosen, age, join_key or view.entity)


def check_spine(spine: DataFrame, tables: Mapping[str, DataFrame], requests: Sequence[ViewRequest],
                timestamp: str) -> None:
    """Fail, naming the column, when the spine cannot be joined: no timestamp column or not a
    timestamp, a missing join key, a key type unlike the view's entity, an output name that
    clashes with a spine column or another view's."""
    types = {f.name: f.dataType for f in spine.schema.fields}
    if timestamp not in types:
        raise ConfigError(f"spine: no timestamp column {timestamp!r} ({', '.join(types)})")
    if not isinstance(types[timestamp], TimestampType):
        raise ConfigError(f"spine: timestamp column {timestamp!r} is {types[timestamp].simpleString()}, not a timestamp")
    seen = set(types)
    for request in requests:
        if request.join_key not in types:
            raise ConfigError(
                f"spine: no column {request.join_key!r} to join view {request.name} on "
                f"(--join-key {request.name}=<column> names another; spine has {', '.join(types)})"
            )
        entity_type = tables[request.name].schema[request.view.entity].dataType
        if types[request.join_key] != entity_type:
            raise ConfigError(
                f"spine: column {request.join_key!r} is {types[request.join_key].simpleString()}, view "
                f"{request.name}'s entity {request.view.entity!r} is {entity_type.simpleString()}"
            )
        for column in request.output_columns():
            if column in seen:
                raise ConfigError(f"spine: output column {column!r} of view {request.name} already exists")
            seen.add(column)


def point_in_time_join(spine: DataFrame, tables: Mapping[str, DataFrame], requests: Sequence[ViewRequest],
                       timestamp: str, mode: str = DEFAULT_MODE) -> DataFrame:
    """The spine's columns, then for each request :meth:`ViewRequest.output_columns`, by the
    rule in the module docstring. ``tables`` maps view name -> its feature table (any
    DataFrame with the view's entity, event-time column, ``computed_at`` and features)."""
    if mode not in MODES:
        raise ConfigError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    check_spine(spine, tables, requests, timestamp)
    result = spine
    for request in requests:
        result = _join_view(result, tables[request.name], request, timestamp, mode)
    return result


def _join_view(spine: DataFrame, table: DataFrame, request: ViewRequest, timestamp: str, mode: str) -> DataFrame:
    view = request.view
    time_column = event_time_column(view)
    # Struct order is the tie-break order: event time, computed_at, then (attributes: the
    # change's LSN, commit order: two changes may commit in one millisecond) the features.
    order = [F.col("cdc_lsn").alias("cdc_lsn")] if view.kind == "attributes" else []
    row = F.struct(
        F.col(time_column).alias("event_time"),
        F.col("computed_at").alias("computed_at"),
        *order,
        *[F.col(f).alias(f) for f in request.features],
    )
    # When a row becomes visible to a spine row: its event time, or (as served) also its
    # computation. greatest() is the later of the two; computed_at is never null in a table.
    visible = F.col(time_column) if mode == "as_corrected" else F.greatest(F.col(time_column), F.col("computed_at"))
    features = table.where(F.col(view.entity).isNotNull() & F.col(time_column).isNotNull()).select(
        F.col(view.entity).alias(_KEY), visible.alias(_TIME), F.lit(_FEATURE_SIDE).alias(_SIDE), row.alias(_ROW)
    )
    spine_columns = [_quoted(c) for c in spine.columns]
    examples = spine.select(
        *spine_columns, F.col(_quoted(request.join_key)).alias(_KEY), F.col(_quoted(timestamp)).alias(_TIME),
        F.lit(_SPINE_SIDE).alias(_SIDE),
    )
    rows_so_far = (
        Window.partitionBy(_KEY).orderBy(F.col(_TIME).asc_nulls_first(), F.col(_SIDE))
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    )
    # Running max of the struct = the visible row with the greatest (event time, computed_at, ...).
    joined = (
        examples.unionByName(features, allowMissingColumns=True)
        .withColumn(_BEST, F.max(_ROW).over(rows_so_far))
        .where(F.col(_SIDE) == _SPINE_SIDE)
    )
    oldest = F.unix_micros(F.col(_quoted(timestamp))) - micros(request.max_age)
    in_range = F.col(f"{_BEST}.event_time").isNotNull() & (F.unix_micros(F.col(f"{_BEST}.event_time")) >= oldest)
    best = F.when(in_range, F.col(_BEST))
    added = [best.getField("event_time").alias(request.event_time_output),
             best.getField("computed_at").alias(request.computed_at_output)]
    added += [best.getField(f).alias(out) for f, out in zip(request.features, request.feature_outputs())]
    return joined.select(*spine_columns, *added)


def _quoted(column: str) -> str:
    return f"`{column.replace('`', '``')}`"


# --------------------------------------------------------------------------- the guard and report


class LeakageError(PipelineError):
    """A training set holds values from after its examples' timestamps (or labels from after the
    cutoff): the build fails before anything is written."""


@dataclass(frozen=True)
class ViewReport:
    name: str
    #: Spine rows that got a feature row.
    matched: int
    #: Feature column -> share of spine rows where it is null (unmatched rows count as null).
    null_rates: Mapping[str, float]
    #: Age of the joined row (T - its event time), seconds: p50, p95, max (None: no match).
    age_p50_seconds: float | None
    age_p95_seconds: float | None
    age_max_seconds: float | None
    #: Guard: rows whose feature event time is after T, older than T - max_age, or (as served)
    #: computed after T. Any of them fails the build.
    after_timestamp: int
    older_than_max_age: int
    computed_after_timestamp: int


@dataclass(frozen=True)
class TrainingReport:
    rows: int
    null_timestamps: int
    views: tuple[ViewReport, ...]
    #: Spine rows whose label time is after the label cutoff (only checked when both are given).
    labels_after_cutoff: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)

    def violations(self) -> list[str]:
        """One readable line per broken rule; empty when the training set is sound."""
        found = []
        if self.null_timestamps:
            found.append(f"{self.null_timestamps} spine rows have a null (or unparseable) timestamp")
        if self.labels_after_cutoff:
            found.append(f"{self.labels_after_cutoff} spine rows have a label known only after the label cutoff")
        for view in self.views:
            if view.after_timestamp:
                found.append(f"{view.name}: {view.after_timestamp} rows joined a feature row from after their timestamp")
            if view.older_than_max_age:
                found.append(f"{view.name}: {view.older_than_max_age} rows joined a feature row older than max_age")
            if view.computed_after_timestamp:
                found.append(f"{view.name}: {view.computed_after_timestamp} rows joined a feature row computed after "
                             "their timestamp (as_served)")
        return found

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: rows, and per view match rate, null rates, ages."""
        result: dict[str, float] = {"rows": self.rows}
        for view in self.views:
            result[f"{view.name}.match_rate"] = view.matched / self.rows if self.rows else 0.0
            for feature, rate in view.null_rates.items():
                result[f"{view.name}.null_rate.{feature}"] = rate
            for label, value in (("p50", view.age_p50_seconds), ("p95", view.age_p95_seconds),
                                 ("max", view.age_max_seconds)):
                if value is not None:
                    result[f"{view.name}.age_{label}_seconds"] = value
        return result


def training_report(training: DataFrame, requests: Sequence[ViewRequest], timestamp: str, mode: str,
                    label_time: str | None = None, label_cutoff: datetime | None = None) -> TrainingReport:
    """Check and describe a joined training set in one aggregation. Works on the output columns
    only (not on how they were joined), so it also catches a leak from any other join. A naive
    ``label_cutoff`` is local time, as PySpark reads naive datetimes."""
    ts = F.unix_micros(F.col(_quoted(timestamp)))
    expressions: list[Column] = [F.count(F.lit(1)).alias("rows"),
                                 F.count_if(F.col(_quoted(timestamp)).isNull()).alias("null_timestamps")]
    if label_time is not None and label_cutoff is not None:
        expressions.append(F.count_if(F.col(_quoted(label_time)) > F.lit(utc_assuming_local(label_cutoff))).alias("labels_after_cutoff"))
    for i, request in enumerate(requests):
        event = F.unix_micros(F.col(_quoted(request.event_time_output)))
        age_seconds = (ts - event) / 1_000_000
        expressions += [
            F.count(F.col(_quoted(request.event_time_output))).alias(f"v{i}_matched"),
            F.count_if(event > ts).alias(f"v{i}_after"),
            F.count_if(event < ts - micros(request.max_age)).alias(f"v{i}_older"),
            F.count_if(F.unix_micros(F.col(_quoted(request.computed_at_output))) > ts).alias(f"v{i}_computed_after"),
            F.percentile_approx(age_seconds, [0.5, 0.95], 10_000).alias(f"v{i}_ages"),
            F.max(age_seconds).alias(f"v{i}_age_max"),
        ]
        expressions += [F.count_if(F.col(_quoted(out)).isNull()).alias(f"v{i}_null_{j}")
                        for j, out in enumerate(request.feature_outputs())]
    totals = training.agg(*expressions).first().asDict()
    rows = totals["rows"]
    views = []
    for i, request in enumerate(requests):
        ages = totals[f"v{i}_ages"] or [None, None]
        views.append(ViewReport(
            name=request.name,
            matched=totals[f"v{i}_matched"],
            null_rates={f: (totals[f"v{i}_null_{j}"] / rows if rows else 0.0) for j, f in enumerate(request.features)},
            age_p50_seconds=ages[0], age_p95_seconds=ages[1], age_max_seconds=totals[f"v{i}_age_max"],
            after_timestamp=totals[f"v{i}_after"],
            older_than_max_age=totals[f"v{i}_older"],
            computed_after_timestamp=totals[f"v{i}_computed_after"] if mode == "as_served" else 0,
        ))
    return TrainingReport(rows=rows, null_timestamps=totals["null_timestamps"], views=tuple(views),
                          labels_after_cutoff=totals.get("labels_after_cutoff", 0))


def check_leakage(report: TrainingReport) -> None:
    """Raise :class:`LeakageError` listing every violation of the report, if any."""
    violations = report.violations()
    if violations:
        raise LeakageError("leakage guard: " + "; ".join(violations))


# --------------------------------------------------------------------------- content hash, histograms


def content_hash(df: DataFrame) -> str:
    """A hash of the rows and the schema, independent of row order and file layout: equal for
    the same multiset of rows (duplicates count). Computed in one aggregation (two 64/32-bit
    row hashes summed exactly as decimals), never by collecting rows."""
    parts: list[Column] = []
    for name in df.columns:
        # Null markers make (null, 1) and (1, null) hash differently (the hashes skip nulls).
        parts += [F.col(_quoted(name)), F.col(_quoted(name)).isNull()]
    totals = df.agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.xxhash64(*parts).cast("decimal(38,0)")).alias("xx"),
        F.sum(F.hash(*parts).cast("decimal(38,0)")).alias("murmur"),
    ).first()
    text = f"{df.schema.simpleString()}|{totals['rows']}|{totals['xx']}|{totals['murmur']}"
    return hashlib.sha256(text.encode()).hexdigest()


def numeric_columns(df: DataFrame, columns: Sequence[str]) -> list[str]:
    """The ``columns`` that can be drawn as histograms (numbers and booleans)."""
    types = {f.name: f.dataType for f in df.schema.fields}
    return [c for c in columns if isinstance(types[c], (NumericType, BooleanType))]


def histograms(df: DataFrame, columns: Sequence[str], bins: int = 20) -> dict[str, tuple[list[float], list[int]]]:
    """Per column: ``bins + 1`` edges and ``bins`` counts of its non-null values (one pass for the
    ranges, one grouped pass for the counts; only the counts reach the driver). A column whose
    values are all null gets no entry; a constant column one bin."""
    if not columns:
        return {}
    values = {c: F.col(_quoted(c)).cast("double") for c in columns}
    ranges = df.agg(*[e for c, v in values.items() for e in (F.min(v).alias(f"min_{c}"), F.max(v).alias(f"max_{c}"))]
                    ).first().asDict()
    drawn = {c: (ranges[f"min_{c}"], ranges[f"max_{c}"]) for c in columns if ranges[f"min_{c}"] is not None}
    if not drawn:
        return {}
    buckets = []
    for c, (low, high) in drawn.items():
        width = (high - low) / bins if high > low else 1.0
        # least() skips nulls (least(null, 19) = 19): null values must stay out explicitly.
        index = F.when(values[c].isNotNull(),
                       F.least(F.floor((values[c] - F.lit(low)) / F.lit(width)), F.lit(bins - 1)).cast("int"))
        buckets.append(F.struct(F.lit(c).alias("column"), index.alias("bin")))
    counted = (
        df.select(F.explode(F.array(*buckets)).alias("b")).where(F.col("b.bin").isNotNull())
        .groupBy("b.column", "b.bin").count().collect()
    )
    result: dict[str, tuple[list[float], list[int]]] = {}
    for c, (low, high) in drawn.items():
        width = (high - low) / bins if high > low else 1.0
        result[c] = ([low + i * width for i in range(bins + 1)], [0] * bins)
    for row in counted:
        result[row["column"]][1][row["bin"]] = row["count"]
    return result
