"""Drift and quality of a served model, on tiny inline rows: the training profile's bins, PSI per
version, hour and feature against hand-computed values, precision/recall at the threshold by
hand, AUC against scikit-learn, and the settings and time range they run with."""

from __future__ import annotations

import json
import math
from datetime import date, datetime, timezone

import numpy as np
import pandas as pd
import pytest
from chispa import assert_df_equality
from sklearn.metrics import roc_auc_score

from pipelines.core.errors import ConfigError
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.scoring.drift import PSI_FLOOR, daily_quality, hourly_psi
from pipelines.scoring.monitoring import MonitoringRange
from pipelines.scoring.profile import Binned, ReferenceProfile, binned, reference_profile
from tests.support import naive, utc

CONF = PROJECT_ROOT / "conf"
PREDICTIONS = "event_id string, model_name string, model_version string, event_time timestamp, score double, features string"
LABELS = "transaction_id string, account_id string, is_fraud boolean, label_time timestamp"

#: x: a quarter below 1, half in [1, 2), a quarter at 2 or above, never missing; the score: half below 0.5.
PROFILE = ReferenceProfile({"x": Binned((1.0, 2.0), (0.25, 0.5, 0.25), 0.0)}, Binned((0.5,), (0.5, 0.5), 0.0), 100)


def term(actual: float, expected: float) -> float:
    """One bin's PSI term, both shares floored at 1e-4 (the documented rule)."""
    a, e = max(actual, 1e-4), max(expected, 1e-4)
    return (a - e) * math.log(a / e)


def predictions(spark, rows):
    """(version, event time, score, features dict or None) -> predictions rows of model fraud."""
    return spark.createDataFrame(
        [(f"tx-{i}", "fraud", version, naive(when), score, None if features is None else json.dumps(features))
         for i, (version, when, score, features) in enumerate(rows)], PREDICTIONS)


def psi_of(frame, feature):
    (row,) = [r for r in frame.collect() if r.feature == feature]
    return row


# --------------------------------------------------------------------------- the profile


def test_edges_are_the_training_quantiles_and_shares_are_of_all_rows():
    # 0..99 at the quartiles (linear): 24.75, 49.5, 74.25; 25 values in each bin.
    assert binned(pd.Series(range(100), dtype="float64"), bins=4) == Binned((24.75, 49.5, 74.25), (0.25,) * 4, 0.0)


def test_a_value_on_an_edge_falls_in_the_bin_above():
    # The median of 0, 0, 1, 1, 2, 2 is 1: the two 1s count above it.
    assert binned([0.0, 0.0, 1.0, 1.0, 2.0, 2.0], bins=2) == Binned((1.0,), (2 / 6, 4 / 6), 0.0)


def test_repeated_quantiles_collapse_into_one_edge():
    # Nine 5s and a 7: the deciles 0.1..0.8 are all 5, the 0.9 one is 5 + 0.1 * 2 = 5.2.
    profile = binned([5.0] * 9 + [7.0])
    assert profile.edges == (5.0, pytest.approx(5.2)) and (profile.shares, profile.missing) == ((0.0, 0.9, 0.1), 0.0)


def test_missing_values_are_a_bin_of_their_own():
    assert binned(pd.Series([1.0, np.nan, None, 3.0]), bins=2).missing == 0.5
    # Nullable booleans: True 1.0, False 0.0, pd.NA missing (as the notebook casts them).
    assert binned(pd.Series([True, False, None, True], dtype="boolean"), bins=2) == Binned((1.0,), (0.25, 0.5), 0.25)


def test_a_profile_survives_its_json_artifact():
    features = pd.DataFrame({"amount_usd": [1.0, 5.0, None, 9.0], "count_1h": pd.array([1, None, 3, 3], dtype="Int64")})
    profile = reference_profile(features, np.array([0.1, 0.4, 0.2, 0.9]), bins=3)
    assert ReferenceProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    assert profile.rows == 4 and sorted(profile.features) == ["amount_usd", "count_1h"]


def test_a_non_numeric_feature_is_refused_naming_it():
    with pytest.raises(ValueError, match="merchant_id: object is not numeric"):
        reference_profile(pd.DataFrame({"amount_usd": [1.0], "merchant_id": ["m-1"]}), [0.5])


# --------------------------------------------------------------------------- PSI


def test_psi_is_the_hand_computed_sum_over_the_bins(spark):
    # x: 0.5, 0.7 below 1; 1.0 on the first edge (bin [1, 2)); 2.0 on the second (bin [2, inf)).
    rows = predictions(spark, [("3", "2026-11-23 10:05:00", s, {"x": x})
                               for s, x in [(0.1, 0.5), (0.2, 0.7), (0.6, 1.0), (0.9, 2.0)]])

    out = hourly_psi(rows, PROFILE)

    x = psi_of(out, "x")
    assert (x.model_version, x.hour, x.rows, x.missing_share) == ("3", naive("2026-11-23 10:00:00"), 4, 0.0)
    assert x.psi == pytest.approx(term(0.5, 0.25) + term(0.25, 0.5) + term(0.25, 0.25) + term(0.0, 0.0))
    assert x.psi == pytest.approx(0.5 * math.log(2))
    assert psi_of(out, "score").psi == pytest.approx(0.0)  # two of four below 0.5, as in training


def test_a_feature_missing_at_serving_everywhere_is_a_large_drift(spark):
    rows = predictions(spark, [("3", "2026-11-23 10:05:00", 0.1, {}), ("3", "2026-11-23 10:06:00", 0.9, {"x": None}),
                               ("3", "2026-11-23 10:07:00", 0.2, None)])

    x = psi_of(hourly_psi(rows, PROFILE), "x")

    assert x.missing_share == 1.0
    expected = term(1.0, 0.0) + term(0.0, 0.25) + term(0.0, 0.5) + term(0.0, 0.25)
    assert x.psi == pytest.approx(expected)
    assert x.psi > 15  # far past 0.25, and finite


def test_an_empty_bin_counts_as_the_floor(spark):
    # Every value in [1, 2): the two open-ended bins are empty at serving.
    rows = predictions(spark, [("3", "2026-11-23 10:05:00", 0.1, {"x": 1.5}), ("3", "2026-11-23 10:06:00", 0.9, {"x": 1.2})])

    x = psi_of(hourly_psi(rows, PROFILE), "x")

    assert x.psi == pytest.approx(2 * (PSI_FLOOR - 0.25) * math.log(PSI_FLOOR / 0.25) + (1 - 0.5) * math.log(1 / 0.5))


def test_boolean_and_integer_features_are_read_as_the_notebook_casts_them(spark):
    profile = ReferenceProfile({"flag": Binned((1.0,), (0.5, 0.5), 0.0), "count": Binned((3.0,), (0.5, 0.5), 0.0)},
                               Binned((0.5,), (0.5, 0.5), 0.0), 10)
    rows = predictions(spark, [("3", "2026-11-23 10:05:00", 0.1, {"flag": True, "count": 1}),
                               ("3", "2026-11-23 10:06:00", 0.9, {"flag": True, "count": 3}),
                               ("3", "2026-11-23 10:07:00", 0.9, {"flag": True, "count": 5}),
                               ("3", "2026-11-23 10:08:00", 0.1, {"flag": False, "count": 2})])

    out = hourly_psi(rows, profile)

    assert psi_of(out, "flag").psi == pytest.approx(term(0.25, 0.5) + term(0.75, 0.5))
    assert psi_of(out, "count").psi == pytest.approx(0.0)  # 1, 2 below 3; 3, 5 at or above


def test_rows_are_grouped_per_version_and_utc_hour(spark):
    rows = predictions(spark, [("3", "2026-11-23 10:00:00", 0.1, {"x": 0.5}), ("3", "2026-11-23 10:59:59.999", 0.1, {"x": 0.5}),
                               ("3", "2026-11-23 11:00:00", 0.1, {"x": 0.5}), ("4", "2026-11-23 10:30:00", 0.1, {"x": 0.5})])

    out = hourly_psi(rows, PROFILE).select("model_name", "model_version", "hour", "feature", "rows")

    expected = spark.createDataFrame(
        [("fraud", version, naive(hour), feature, n)
         for version, hour, n in [("3", "2026-11-23 10:00:00", 2), ("3", "2026-11-23 11:00:00", 1),
                                  ("4", "2026-11-23 10:00:00", 1)] for feature in ("x", "score")],
        "model_name string, model_version string, hour timestamp, feature string, rows long")
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True)


# --------------------------------------------------------------------------- quality


def labels(spark, rows):
    """(transaction id, is_fraud, label time) -> labels rows."""
    return spark.createDataFrame([(tx, "acct-1", fraud, naive(when)) for tx, fraud, when in rows], LABELS)


def scored(spark, rows, version="3"):
    """(transaction id, score, event time) -> predictions of one version."""
    return spark.createDataFrame([(tx, "fraud", version, naive(when), score, "{}") for tx, score, when in rows],
                                 PREDICTIONS)


def test_precision_and_recall_at_the_threshold_by_hand(spark):
    day = "2026-11-23 09:00:00"
    rows = [("a", 0.9, day), ("b", 0.6, day), ("c", 0.5, day), ("d", 0.3, day), ("e", 0.2, day), ("f", 0.95, day)]
    known = [("a", True, day), ("b", False, day), ("c", True, day), ("d", True, day), ("e", False, day)]  # f: none yet

    (row,) = daily_quality(scored(spark, rows), labels(spark, known), 0.5).collect()

    # Flagged (>= 0.5): a, b, c (0.5 on the threshold counts) and f. Labeled flagged: a (fraud),
    # b (not), c (fraud) -> precision 2/3. Fraud: a, c, d; found: a, c -> recall 2/3.
    assert (row.day, row.threshold, row.scored, row.labeled, row.positives, row.flagged, row.true_positives) == \
        (date(2026, 11, 23), 0.5, 6, 5, 3, 4, 2)
    assert (row.precision, row.recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))


def test_auc_equals_scikit_learns_on_the_same_rows_ties_included(spark):
    day = "2026-11-23 09:00:00"
    values = [("a", 0.1, False), ("b", 0.4, False), ("c", 0.35, True), ("d", 0.8, True), ("e", 0.4, True),
              ("f", 0.7, False), ("g", 0.4, False), ("h", 0.8, False), ("i", 0.05, True)]
    unlabeled = [("u1", 0.99, day), ("u2", 0.01, day)]  # no label: not in the AUC

    (row,) = daily_quality(scored(spark, [(t, s, day) for t, s, _ in values] + unlabeled),
                           labels(spark, [(t, y, day) for t, _, y in values]), 0.5).collect()

    assert row.auc == pytest.approx(roc_auc_score([y for _, _, y in values], [s for _, s, _ in values]))


def test_without_fraud_among_the_labels_recall_and_auc_are_null(spark):
    day = "2026-11-23 09:00:00"

    (row,) = daily_quality(scored(spark, [("a", 0.9, day), ("b", 0.1, day)]),
                           labels(spark, [("a", False, day), ("b", False, day)]), 0.5).collect()

    assert (row.positives, row.precision, row.recall, row.auc) == (0, 0.0, None, None)


def test_without_any_label_precision_recall_and_auc_are_null(spark):
    (row,) = daily_quality(scored(spark, [("a", 0.9, "2026-11-23 09:00:00")]), labels(spark, []), 0.5).collect()

    assert (row.scored, row.labeled, row.flagged, row.precision, row.recall, row.auc) == (1, 0, 1, None, None, None)


def test_the_latest_label_of_a_transaction_is_the_one_counted(spark):
    day = "2026-11-23 09:00:00"
    known = [("a", True, "2026-11-24 09:00:00"), ("a", False, "2026-11-26 09:00:00"),  # reviewed: not fraud
             ("b", False, "2026-11-24 09:00:00"), ("b", True, "2026-11-25 09:00:00")]  # chargeback: fraud

    (row,) = daily_quality(scored(spark, [("a", 0.9, day), ("b", 0.2, day)]), labels(spark, known), 0.5).collect()

    assert (row.labeled, row.positives, row.true_positives, row.flagged) == (2, 1, 0, 1)


def test_quality_is_per_version_and_utc_day(spark):
    rows = scored(spark, [("a", 0.9, "2026-11-23 23:59:59"), ("b", 0.9, "2026-11-24 00:00:00")]).unionByName(
        scored(spark, [("c", 0.9, "2026-11-23 12:00:00")], version="4"))

    out = daily_quality(rows, labels(spark, []), 0.5).select("model_version", "day", "scored")

    assert sorted(out.collect()) == [("3", date(2026, 11, 23), 1), ("3", date(2026, 11, 24), 1),
                                     ("4", date(2026, 11, 23), 1)]


# --------------------------------------------------------------------------- settings and range


def test_the_serving_threshold_defaults_to_one_half():
    assert load_settings("local", CONF).scoring.threshold == 0.5


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1])
def test_a_threshold_not_strictly_between_zero_and_one_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"scoring\.threshold: .* is not strictly between 0 and 1"):
        load_settings("local", CONF, {"scoring": {"threshold": value}})


def test_the_range_covers_whole_hours_and_its_quality_the_days_they_touch():
    hours = MonitoringRange.covering(utc("2026-11-22 22:15:00"), utc("2026-11-23 10:00:01"))
    assert (hours.start, hours.end) == (utc("2026-11-22 22:00:00"), utc("2026-11-23 11:00:00"))
    assert (hours.first_day, hours.end_day) == (date(2026, 11, 22), date(2026, 11, 24))
    exact = MonitoringRange.covering(utc("2026-11-22 00:00:00"), datetime(2026, 11, 23, tzinfo=timezone.utc))
    assert (exact.end, exact.end_day) == (utc("2026-11-23 00:00:00"), date(2026, 11, 23))


def test_a_range_that_ends_before_it_starts_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match="--to .* must be after --from"):
        MonitoringRange.covering(utc("2026-11-23 10:00:00"), utc("2026-11-23 09:00:00"))
