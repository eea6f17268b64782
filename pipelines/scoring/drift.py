"""Drift and quality of a served model, from its predictions table: pure transforms.

* :func:`hourly_psi`: per model version, event-time hour and feature (each model input of the
  reference profile, and ``score``), the population stability index of the served values
  against the training set's distribution (:mod:`pipelines.scoring.profile`).
* :func:`daily_quality`: per model version and event-time day, once labels have arrived:
  precision and recall at the serving threshold and the ROC AUC.

Hours and days are UTC, computed from the epoch (not the session's time zone). Both take the
predictions as ``predictions/<model>`` holds them (``model_name``, ``model_version``,
``event_id``, ``event_time``, ``score``, and ``features``: the JSON vector the model got, by
input name). Nothing here reads or writes: :mod:`pipelines.scoring.monitoring` does.
"""

from __future__ import annotations

from functools import reduce

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    DateType,
    DoubleType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from pipelines.scoring.profile import SCORE, ReferenceProfile

#: The share a bin is given when it is empty on either side: ``ln(a/e)`` of an empty bin is
#: infinite, so a bin with no rows counts as 1e-4 of them. A bin empty on one side and holding
#: everything on the other gives about (1 - 1e-4) * ln(1e4) = 9.2: large, finite, comparable.
PSI_FLOOR = 1e-4

#: The groups both tables are per, beside their time column.
KEYS = ("model_name", "model_version")

#: ``ops/feature_drift``: one row per model version, hour and feature (``score`` included).
FEATURE_DRIFT_SCHEMA = StructType([
    StructField("model_name", StringType(), False),
    StructField("model_version", StringType(), True),
    StructField("hour", TimestampType(), False),
    StructField("feature", StringType(), False),
    StructField("rows", LongType(), False),
    StructField("missing_share", DoubleType(), False),
    StructField("psi", DoubleType(), False),
    StructField("computed_at", TimestampType(), False),
])

#: ``ops/model_quality``: one row per model version and day.
MODEL_QUALITY_SCHEMA = StructType([
    StructField("model_name", StringType(), False),
    StructField("model_version", StringType(), True),
    StructField("day", DateType(), False),
    StructField("threshold", DoubleType(), False),
    StructField("scored", LongType(), False),
    StructField("labeled", LongType(), False),
    StructField("positives", LongType(), False),
    StructField("flagged", LongType(), False),
    StructField("true_positives", LongType(), False),
    StructField("precision", DoubleType(), True),
    StructField("recall", DoubleType(), True),
    StructField("auc", DoubleType(), True),
    StructField("computed_at", TimestampType(), False),
])


def utc_hour(moment: Column) -> Column:
    """The UTC hour ``moment`` falls in (its start), whatever the session's time zone."""
    return F.timestamp_seconds(F.floor(F.unix_seconds(moment) / 3600) * 3600)


def utc_day(moment: Column) -> Column:
    """The UTC day ``moment`` falls in, whatever the session's time zone."""
    return F.date_from_unix_date(F.floor(F.unix_seconds(moment) / 86400).cast("int"))


def json_number(text: Column) -> Column:
    """A value of the features JSON, read as text, as a double: ``true``/``false`` are 1/0 (the
    training notebook casts booleans so), a number is itself, anything else (null, an absent
    key, a string) is null."""
    return (F.when(text == "true", F.lit(1.0)).when(text == "false", F.lit(0.0))
            .otherwise(text.try_cast("double")))


def bin_index(value: Column, edges: tuple[float, ...]) -> Column:
    """The bin of ``value`` by ``edges``: the number of edges at or below it (0..len(edges), so
    a value on an edge is in the bin above it); -1 when it is missing (null or NaN)."""
    index = F.when(value.isNull() | F.isnan(value), F.lit(-1))
    for number in range(len(edges), 0, -1):  # the highest edge at or below the value decides
        index = index.when(value >= F.lit(edges[number - 1]), F.lit(number))
    return index.otherwise(F.lit(0))


def hourly_psi(predictions: DataFrame, profile: ReferenceProfile) -> DataFrame:
    """One row per ``model_name``, ``model_version``, UTC event-time ``hour`` and ``feature``
    (every input of ``profile``, and ``score``): ``rows`` (predictions in the hour),
    ``missing_share`` (their share without a value) and ``psi``.

    ``psi`` = sum over the bins of ``(a - e) * ln(a / e)``, ``a`` the hour's share of rows in
    the bin, ``e`` the profile's, the missing bin included, each share raised to
    :data:`PSI_FLOOR` when below it (so an empty bin gives a large finite term). Bins are the
    profile's (:mod:`pipelines.scoring.profile`: a value on an edge is in the bin above). A
    feature is missing in a prediction when its ``features`` JSON has no such key, a null, or a
    value that is no number or boolean; the score is missing when null or NaN. The usual
    reading: below 0.1 stable, 0.1 to 0.25 a moderate shift worth watching, above 0.25 a large
    shift (the model sees inputs unlike its training data). An hour of few rows is noisy: read
    ``psi`` beside ``rows``.

    ``predictions`` should hold the predictions of the model version ``profile`` belongs to;
    rows are grouped by version all the same.
    """
    distributions = [*profile.features.items(), (SCORE, profile.score)]
    vector = StructType([StructField(name, StringType()) for name in profile.features])
    parsed = predictions.select(
        *KEYS, utc_hour(F.col("event_time")).alias("hour"), F.col("score").cast("double").alias("_score"),
        F.from_json(F.col("features"), vector).alias("_features"))
    # Values first, in columns of their own: binning compares each with every edge.
    values = parsed.select(*KEYS, "hour", *[json_number(F.col("_features").getField(name)).alias(f"_v{i}")
                                            for i, name in enumerate(profile.features)],
                           F.col("_score").alias(f"_v{len(profile.features)}"))
    # Long: one row per prediction and feature, then a count per bin. (One wide aggregation of
    # every bin of every feature outgrows Spark's code generation from about 20 features.)
    binned = values.select(*KEYS, "hour", F.explode(F.array(*[
        F.struct(F.lit(name).alias("feature"), bin_index(F.col(f"_v{i}"), d.edges).alias("bin"))
        for i, (name, d) in enumerate(distributions)])).alias("_b"))
    counts = binned.groupBy(*KEYS, "hour", "_b.feature", "_b.bin").count()
    per_feature = counts.groupBy(*KEYS, "hour", "feature").agg(
        F.sum("count").alias("rows"), F.map_from_entries(F.collect_list(F.struct("bin", "count"))).alias("_counts"))
    # The profile's shares by feature: the missing bin first, then the value bins low to high.
    expected = F.create_map(*[column for name, d in distributions for column in
                              (F.lit(name), F.array(*[F.lit(float(s)) for s in (d.missing, *d.shares)]))])
    shares = F.element_at(expected, F.col("feature"))

    def share_of(index: Column) -> Column:  # index 0: missing (bin -1), 1..: value bins 0..
        return F.coalesce(F.try_element_at(F.col("_counts"), index - 1), F.lit(0)) / F.col("rows")

    def plus_term(total: Column, index: Column) -> Column:
        actual = F.greatest(share_of(index), F.lit(PSI_FLOOR))
        wanted = F.greatest(F.element_at(shares, index + 1), F.lit(PSI_FLOOR))
        return total + (actual - wanted) * F.log(actual / wanted)

    psi = F.aggregate(F.sequence(F.lit(0), F.size(shares) - 1), F.lit(0.0), plus_term)
    return per_feature.select(*KEYS, "hour", "feature", "rows", share_of(F.lit(0)).alias("missing_share"),
                              psi.alias("psi"))


def latest_labels(labels: DataFrame) -> DataFrame:
    """One label per ``transaction_id``, as the training spine takes it
    (:func:`pipelines.training.spines.labeled_transactions`): the latest by ``label_time``, then
    ``is_fraud`` true first (a rerun picks the same one). Labels without ``is_fraud`` are none."""
    latest = Window.partitionBy("transaction_id").orderBy(F.col("label_time").desc_nulls_last(),
                                                         F.col("is_fraud").desc_nulls_last())
    return (labels.where(F.col("is_fraud").isNotNull()).select("transaction_id", "is_fraud", "label_time")
            .withColumn("_n", F.row_number().over(latest)).where("_n = 1").drop("_n"))


def daily_quality(predictions: DataFrame, labels: DataFrame, threshold: float) -> DataFrame:
    """One row per ``model_name``, ``model_version`` and UTC event-time ``day`` of
    ``predictions``, with ``labels`` (the labels contract: ``transaction_id``, ``is_fraud``,
    ``label_time``; a prediction's ``event_id`` is its transaction's id) as known now (the
    latest of a transaction's labels, :func:`latest_labels`):

    * ``scored``: predictions; ``labeled``: those with a label; ``positives``: labeled fraud;
    * ``flagged``: predictions with ``score >= threshold`` (labeled or not: the alert volume);
    * ``true_positives``: labeled fraud and flagged;
    * ``precision`` = true positives / labeled flagged predictions (null when none is);
      ``recall`` = true positives / positives (null without positives);
    * ``auc``: ROC AUC of the labeled predictions, rank based (Mann-Whitney: ties count half,
      as average ranks), null unless both fraud and non-fraud are among them.

    Unlabeled predictions count in ``scored`` and ``flagged`` only: labels arrive days late, so a
    recent day's figures rest on few labels (read them beside ``labeled``).
    """
    scored = predictions.select(*KEYS, utc_day(F.col("event_time")).alias("day"), "event_id",
                                F.col("score").cast("double").alias("score"))
    # Only the labels of these predictions are ranked (the labels table holds every day's).
    relevant = labels.join(scored.select(F.col("event_id").alias("transaction_id")).distinct(), "transaction_id",
                           "left_semi")
    known = latest_labels(relevant).select(F.col("transaction_id").alias("event_id"), F.col("is_fraud").alias("_label"))
    joined = scored.join(known, "event_id", "left").withColumn("_flagged", F.col("score") >= F.lit(threshold))
    label, flagged = F.col("_label"), F.coalesce(F.col("_flagged"), F.lit(False))
    keys = [*KEYS, "day"]
    counts = joined.groupBy(*keys).agg(
        F.count(F.lit(1)).alias("scored"),
        F.count(label).alias("labeled"),
        F.count_if(label).alias("positives"),
        F.count_if(flagged).alias("flagged"),
        F.count_if(label.isNotNull() & flagged).alias("_labeled_flagged"),
        F.count_if(label & flagged).alias("true_positives"),
    )
    # Rank sums over distinct scores: each score's rows take the average of the ranks they span.
    by_score = (joined.where(label.isNotNull() & F.col("score").isNotNull()).groupBy(*keys, "score")
                .agg(F.count(F.lit(1)).alias("_n"), F.count_if(label).alias("_p")))
    lower = Window.partitionBy(*keys).orderBy("score").rowsBetween(Window.unboundedPreceding, -1)
    ranked = by_score.withColumn("_below", F.coalesce(F.sum("_n").over(lower), F.lit(0)))
    pos, neg = F.col("_pos"), F.col("_neg")
    aucs = ranked.groupBy(*keys).agg(
        F.sum(F.col("_p") * (F.col("_below") + (F.col("_n") + 1) / 2)).alias("_rank_sum"),
        F.sum("_p").alias("_pos"), F.sum(F.col("_n") - F.col("_p")).alias("_neg"),
    ).select(*[F.col(k).alias(f"_auc_{k}") for k in keys],
             F.when((pos > 0) & (neg > 0), (F.col("_rank_sum") - pos * (pos + 1) / 2) / (pos * neg)).alias("auc"))
    # Null-safe: a model served outside the registry has a null version.
    on = reduce(lambda a, b: a & b, [F.col(k).eqNullSafe(F.col(f"_auc_{k}")) for k in keys])
    return counts.join(aucs, on, "left").select(
        *keys, F.lit(float(threshold)).alias("threshold"), "scored", "labeled", "positives", "flagged",
        "true_positives",
        F.when(F.col("_labeled_flagged") > 0, F.col("true_positives") / F.col("_labeled_flagged")).alias("precision"),
        F.when(F.col("positives") > 0, F.col("true_positives") / F.col("positives")).alias("recall"),
        F.col("auc").cast("double").alias("auc"))
