"""Train/serve skew: the feature vectors ``fp-score`` served, compared with the point-in-time
build of the same events (``as_corrected``: each event's own rows, with every correction known
now), feature by feature.

Everything here is a pure ``DataFrame -> DataFrame`` transform; reading the predictions and the
corrected build's inputs, the Delta table and the MLflow run live in
:mod:`pipelines.scoring.skew_report`.

What a served vector is compared with (:func:`corrected_vectors`): the training join's columns
for the event (:func:`pipelines.training.join.point_in_time_join` at the event's time, mode
``as_corrected``), named as the model's inputs are (``{view}__{feature}``, or a field of the
event). An in-order event's served vector equals it; the live path serves an out-of-order event
its entity's features as they stood when it came (with it counted), and an event served before
a late event of its entity arrived lacks that event, which the corrected build counts: those
rows differ.

The comparison (:func:`compare_vectors`), per served row and input of its vector:

* both sides null: equal; a null on one side only: differing (``served_null_only`` or
  ``corrected_null_only`` says which side);
* numbers (any numeric type of the corrected column; the served JSON number read as a double):
  equal when ``|served - corrected| <= tolerance * max(|served|, |corrected|, 1)``, a relative
  tolerance (default :data:`DEFAULT_TOLERANCE`, 1e-9) that turns absolute below 1: the live path
  sums in Lua doubles (compensated), Spark in its own order, and the last bits differ. Integers
  above 2**53 are compared as doubles (the live path holds them as doubles anyway). NaN equals
  only NaN;
* booleans, timestamps and strings: equal when equal (the served text read as the corrected
  column's type; a text that does not read as that type counts as a null).

Only the inputs a served vector has are compared (a model version with fewer inputs is not
charged for the others). A served row whose event the corrected build lacks (not in bronze yet,
or outside what was read) is not compared: it is counted as ``rows_without_corrected``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, DataType, MapType, NumericType, StringType, TimestampType

from pipelines.training.join import ViewRequest, point_in_time_join

#: Relative tolerance of numeric comparisons (absolute below 1): see the module docstring.
DEFAULT_TOLERANCE = 1e-9
#: What identifies a served row in the comparison's output, beside the feature.
SERVED_KEYS = ("event_id", "entity", "event_time", "model_name", "model_version")
#: Grouping of :func:`skew_summary` by default: one row per model version and feature.
SUMMARY_KEYS = ("model_name", "model_version")

_SERVED, _CORRECTED, _MATCHED, _ITEM, _CID = "__served", "__corrected", "__matched", "__item", "__corrected_id"


def corrected_vectors(spine: DataFrame, tables: dict[str, DataFrame], requests: Sequence[ViewRequest],
                      id_column: str, timestamp: str, event_fields: Sequence[str]) -> DataFrame:
    """One row per spine row: ``event_id`` (the spine's ``id_column``), each of ``event_fields``
    (the spine's own columns: the event's validated values) and each request's feature columns
    (``{view}__{feature}``), from the point-in-time join at ``timestamp``, mode ``as_corrected``:
    every row the ``tables`` hold, a trailing view's row at the event's own time included (the
    join's rules: :mod:`pipelines.training.join`; no row in ``[T - max_age, T]`` gives nulls)."""
    joined = point_in_time_join(spine, tables, requests, timestamp, mode="as_corrected")
    outputs = [c for r in requests for c in r.feature_outputs()]
    return joined.select(F.col(_quoted(id_column)).alias("event_id"),
                         *[F.col(_quoted(c)) for c in [*event_fields, *outputs]])


def served_features(predictions: DataFrame) -> DataFrame:
    """The input names of the vectors in ``predictions`` (its ``features`` JSON objects), one row
    each (``feature``), distinct."""
    return (predictions.select(F.explode(F.map_keys(F.from_json("features", MapType(StringType(), StringType()))))
                               .alias("feature")).distinct())


def compare_vectors(predictions: DataFrame, corrected: DataFrame, tolerance: float = DEFAULT_TOLERANCE) -> DataFrame:
    """One row per served row of ``predictions`` and input of its vector that ``corrected`` has
    a column for, by the rules of the module docstring.

    ``predictions``: the predictions table's rows (:data:`SERVED_KEYS` and ``features``, the
    served vector as a JSON object by input name). ``corrected``: ``event_id`` and one typed
    column per input (:func:`corrected_vectors`), at most one row per event id.

    Output: :data:`SERVED_KEYS`, ``feature``, ``served`` (the served value as text; null for a
    JSON null), ``corrected`` (the corrected value as text), ``matched`` (the event has a
    corrected row), ``differs``, ``served_null_only``, ``corrected_null_only`` and ``abs_diff``
    (``|served - corrected|`` for numbers with both sides present, else null); ``differs`` and
    the null flags are false on unmatched rows.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance: {tolerance} must not be negative")
    types = {f.name: f.dataType for f in corrected.schema.fields if f.name != "event_id"}
    served = predictions.select(*SERVED_KEYS,
                                F.from_json("features", MapType(StringType(), StringType())).alias(_SERVED))
    right = corrected.select(F.col("event_id").alias(_CID),
                             F.struct(*[F.col(_quoted(n)) for n in types]).alias(_CORRECTED),
                             F.lit(True).alias(_MATCHED))
    joined = served.join(right, served["event_id"] == right[_CID], "left")
    items = [_compare_one(name, kind, tolerance) for name, kind in types.items()]
    if not items:
        return joined.select(*SERVED_KEYS, *[F.lit(None).cast(t).alias(n) for n, t in _ITEM_TYPES]).limit(0)
    return (joined.select(*SERVED_KEYS, F.explode(F.array(*items)).alias(_ITEM))
            .where(F.col(f"{_ITEM}.present"))
            .select(*SERVED_KEYS, *[F.col(f"{_ITEM}.{n}").alias(n) for n, _ in _ITEM_TYPES]))


_ITEM_TYPES = (("feature", "string"), ("served", "string"), ("corrected", "string"), ("matched", "boolean"),
               ("differs", "boolean"), ("served_null_only", "boolean"), ("corrected_null_only", "boolean"),
               ("abs_diff", "double"))


def _compare_one(name: str, kind: DataType, tolerance: float) -> Column:
    """The comparison of input ``name`` on one joined row, as a struct of :data:`_ITEM_TYPES`
    and ``present`` (the served vector has the input)."""
    text = F.col(_SERVED).getItem(name)
    corrected = F.col(_CORRECTED).getField(name)
    matched = F.coalesce(F.col(_MATCHED), F.lit(False))
    abs_diff = F.lit(None).cast("double")
    if isinstance(kind, NumericType):
        served_value, corrected_value = text.try_cast("double"), corrected.cast("double")
        abs_diff = F.abs(served_value - corrected_value)
        # NaN - NaN is NaN, and Spark orders NaN above every number: compared apart.
        both_nan = F.isnan(served_value) & F.isnan(corrected_value)
        unequal = ~both_nan & (abs_diff > F.lit(tolerance) * F.greatest(F.abs(served_value), F.abs(corrected_value),
                                                                          F.lit(1.0)))
    else:
        target = kind if isinstance(kind, (BooleanType, TimestampType)) else StringType()
        served_value, corrected_value = text.try_cast(target), corrected.cast(target)
        unequal = served_value != corrected_value
    served_null, corrected_null = served_value.isNull(), corrected_value.isNull()
    both = ~served_null & ~corrected_null
    differs = matched & ((served_null != corrected_null) | (both & unequal))
    return F.struct(
        F.lit(name).alias("feature"),
        F.map_contains_key(F.col(_SERVED), name).alias("present"),
        text.alias("served"),
        corrected.cast("string").alias("corrected"),
        matched.alias("matched"),
        differs.alias("differs"),
        (matched & served_null & ~corrected_null).alias("served_null_only"),
        (matched & corrected_null & ~served_null).alias("corrected_null_only"),
        F.when(matched & both, abs_diff).alias("abs_diff"),
    )


def skew_summary(comparison: DataFrame, by: Sequence[str] = SUMMARY_KEYS) -> DataFrame:
    """Per ``by`` (default: model name and version) and feature, from :func:`compare_vectors`:
    ``rows`` compared (served rows with a corrected row), ``differing``, ``share_differing``
    (``differing / rows``; null when nothing was compared), ``served_null_only``,
    ``corrected_null_only``, ``mean_abs_diff`` and ``max_abs_diff`` (over the differing rows with
    a number on both sides; null when there is none) and ``rows_without_corrected`` (served
    rows whose event the corrected build lacks: not compared)."""
    matched = F.col("matched")
    differing = matched & F.col("differs")
    return (comparison.groupBy(*by, "feature").agg(
        F.count_if(matched).alias("rows"),
        F.count_if(differing).alias("differing"),
        F.count_if(F.col("served_null_only")).alias("served_null_only"),
        F.count_if(F.col("corrected_null_only")).alias("corrected_null_only"),
        F.avg(F.when(differing, F.col("abs_diff"))).alias("mean_abs_diff"),
        F.max(F.when(differing, F.col("abs_diff"))).alias("max_abs_diff"),
        F.count_if(~matched).alias("rows_without_corrected"),
    ).select(*by, "feature", "rows", "differing",
             F.when(F.col("rows") > 0, F.col("differing") / F.col("rows")).alias("share_differing"),
             "served_null_only", "corrected_null_only", "mean_abs_diff", "max_abs_diff", "rows_without_corrected"))


def differing_rows(comparison: DataFrame) -> DataFrame:
    """The drill-down of :func:`compare_vectors`: only the rows that differ, one per served row
    and feature: :data:`SERVED_KEYS`, ``feature``, ``served``, ``corrected`` (as text) and
    ``abs_diff``."""
    return comparison.where(F.col("differs")).select(*SERVED_KEYS, "feature", "served", "corrected", "abs_diff")


def _quoted(column: str) -> str:
    return f"`{column.replace('`', '``')}`"
