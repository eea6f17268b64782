"""Train/serve skew's comparison on tiny inline rows: the tolerance, nulls, inputs a vector does
not have, events the corrected build lacks, the summary and the drill-down; and fp-skew's exit
code when the model has no predictions table."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from jobs import skew as skew_job
from pipelines.scoring.skew import compare_vectors, differing_rows, skew_summary
from pipelines.scoring.skew_report import pooled_shares

PREDICTIONS = "event_id string, entity string, event_time timestamp, model_name string, model_version string, features string"
T = datetime(2026, 11, 23, 12, 0)


def predictions(spark, *vectors: tuple[str, dict], version: str = "1"):
    """Predictions rows: (event id, served vector)."""
    return spark.createDataFrame([(event_id, "acct-1", T, "fraud", version, json.dumps(vector))
                                  for event_id, vector in vectors], PREDICTIONS)


def compared(spark, served, corrected_rows, corrected_schema: str, **kwargs) -> dict[tuple[str, str], tuple]:
    """(event id, feature) -> (differs, served_null_only, corrected_null_only, abs_diff)."""
    corrected = spark.createDataFrame(corrected_rows, corrected_schema)
    return {(r["event_id"], r["feature"]): (r["differs"], r["served_null_only"], r["corrected_null_only"], r["abs_diff"])
            for r in compare_vectors(served, corrected, **kwargs).collect()}


def test_numbers_within_the_relative_tolerance_are_equal_and_beyond_it_differ(spark):
    served = predictions(spark, ("a", {"x": 1000.0 + 1e-7}), ("b", {"x": 1000.0 + 2e-6}), ("c", {"x": 3}))
    out = compared(spark, served, [("a", 1000.0), ("b", 1000.0), ("c", 3.0)], "event_id string, x double")
    assert out[("a", "x")][0] is False  # 1e-7 <= 1e-9 * 1000
    assert out[("b", "x")][0] is True and out[("b", "x")][3] == pytest.approx(2e-6, rel=1e-3)
    assert out[("c", "x")][0] is False  # a JSON integer against a double


def test_below_one_the_tolerance_is_absolute(spark):
    served = predictions(spark, ("a", {"x": 1e-10}), ("b", {"x": 0.5 + 5e-9}))
    out = compared(spark, served, [("a", 0.0), ("b", 0.5)], "event_id string, x double")
    assert out[("a", "x")][0] is False  # |1e-10 - 0| <= 1e-9 * max(.., 1)
    assert out[("b", "x")][0] is True


def test_the_tolerance_is_a_parameter(spark):
    served = predictions(spark, ("a", {"x": 100.5}))
    assert compared(spark, served, [("a", 100.0)], "event_id string, x double", tolerance=0.01)[("a", "x")][0] is False
    assert compared(spark, served, [("a", 100.0)], "event_id string, x double")[("a", "x")][0] is True


def test_a_null_on_one_side_only_differs_and_both_null_is_equal(spark):
    served = predictions(spark, ("a", {"n": None}), ("b", {"n": 2}), ("c", {"n": None}))
    out = compared(spark, served, [("a", 2), ("b", None), ("c", None)], "event_id string, n bigint")
    assert out[("a", "n")] == (True, True, False, None)
    assert out[("b", "n")] == (True, False, True, None)
    assert out[("c", "n")] == (False, False, False, None)


def test_strings_and_booleans_compare_exactly(spark):
    served = predictions(spark, ("a", {"s": "m-1", "f": True}), ("b", {"s": "m-1 ", "f": False}))
    out = compared(spark, served, [("a", "m-1", True), ("b", "m-1", True)], "event_id string, s string, f boolean")
    assert [out[("a", "s")][0], out[("a", "f")][0], out[("b", "s")][0], out[("b", "f")][0]] == [False, False, True, True]
    assert out[("b", "s")][3] is None  # no difference in size for a string


def test_an_input_a_vector_does_not_have_is_not_compared(spark):
    # Version 1 took x only; version 2 takes x and y.
    served = predictions(spark, ("a", {"x": 1.0})).unionByName(predictions(spark, ("b", {"x": 1.0, "y": 5}), version="2"))
    out = compared(spark, served, [("a", 1.0, 7), ("b", 1.0, 5)], "event_id string, x double, y bigint")
    assert set(out) == {("a", "x"), ("b", "x"), ("b", "y")}


def test_an_event_the_corrected_build_lacks_is_counted_apart_not_as_skew(spark):
    served = predictions(spark, ("a", {"x": 1.0}), ("gone", {"x": 1.0}))
    corrected = spark.createDataFrame([("a", 2.0)], "event_id string, x double")
    comparison = compare_vectors(served, corrected)
    (row,) = skew_summary(comparison).collect()
    assert (row["rows"], row["differing"], row["rows_without_corrected"]) == (1, 1, 1)
    assert [r["event_id"] for r in differing_rows(comparison).collect()] == ["a"]


def test_the_summary_counts_per_version_and_feature_with_differences_among_differing_rows_only(spark):
    served = predictions(spark, ("a", {"x": 10.0, "n": 1}), ("b", {"x": 12.0, "n": 2}), ("c", {"x": 20.0, "n": None}),
                         ("d", {"x": 5.0, "n": 4}))
    corrected = spark.createDataFrame([("a", 10.0, 1), ("b", 11.0, 2), ("c", 16.0, 3), ("d", 5.0, 4)],
                                      "event_id string, x double, n bigint")
    comparison = compare_vectors(served, corrected)
    summary = {r["feature"]: r.asDict() for r in skew_summary(comparison).collect()}
    x, n = summary["x"], summary["n"]
    assert (x["model_name"], x["model_version"], x["rows"], x["differing"], x["share_differing"]) == ("fraud", "1", 4, 2, 0.5)
    assert (x["mean_abs_diff"], x["max_abs_diff"]) == (2.5, 4.0)  # |12-11|, |20-16|: equal rows do not dilute it
    assert (n["rows"], n["differing"], n["served_null_only"], n["corrected_null_only"]) == (4, 1, 1, 0)
    assert n["mean_abs_diff"] is None  # the only difference is a null
    drill = {(r["event_id"], r["feature"]): (r["served"], r["corrected"]) for r in differing_rows(comparison).collect()}
    assert drill == {("b", "x"): ("12.0", "11.0"), ("c", "x"): ("20.0", "16.0"), ("c", "n"): (None, "3")}
    assert pooled_shares([x, n]) == {"n": 0.25, "x": 0.5}


def test_skew_of_a_model_without_a_predictions_table_exits_2_naming_it(capsys, spark, tmp_path):
    lake = tmp_path / "lake"
    assert skew_job.main(["--env", "local", "--set", f"storage.root={lake}", "--model", "fraud"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"skew: error: --model fraud: no predictions table at {lake}/predictions/fraud")
