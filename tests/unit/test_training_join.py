"""The point-in-time join on tiny hand-computed data: one rule per test (boundaries, ties,
missing entities, several views, duplicates, both modes), then the checks around it."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from chispa import assert_df_equality

from pipelines.cdc.tables import attribute_rows
from pipelines.core.errors import ConfigError
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.training.join import (
    LeakageError,
    check_leakage,
    content_hash,
    histograms,
    output_column,
    point_in_time_join,
    training_report,
    view_request,
)

VIEWS = load_settings("local", PROJECT_ROOT / "conf").views
VELOCITY, HOURLY = VIEWS["account_velocity"], VIEWS["merchant_hourly"]

SPINE = "example string, account_id string, merchant_id string, ts timestamp"
VELOCITY_TABLE = "account_id string, event_time timestamp, computed_at timestamp, count_1h long"
HOURLY_TABLE = ("merchant_id string, window_start timestamp, window_end timestamp, computed_at timestamp, "
                "count long")
OUT_VELOCITY = "account_velocity__event_time timestamp, account_velocity__computed_at timestamp, account_velocity__count_1h long"
OUT_HOURLY = "merchant_hourly__event_time timestamp, merchant_hourly__computed_at timestamp, merchant_hourly__count long"


def t(text: str) -> datetime:
    return datetime.fromisoformat(f"2026-11-20 {text}")


def velocity(max_age: str = "1h"):
    return view_request(VELOCITY, ["count_1h"], max_age=_age(max_age))


def hourly(max_age: str = "1h"):
    return view_request(HOURLY, ["count"], max_age=_age(max_age))


def _age(text: str) -> timedelta:
    return timedelta(hours=int(text[:-1])) if text.endswith("h") else timedelta(minutes=int(text[:-1]))


def join(spark, spine_rows, velocity_rows, request=None, mode="as_corrected"):
    spine = spark.createDataFrame(spine_rows, SPINE)
    table = spark.createDataFrame(velocity_rows, VELOCITY_TABLE)
    return point_in_time_join(spine, {"account_velocity": table}, [request or velocity()], "ts", mode)


def expect(spark, rows, schema=f"{SPINE}, {OUT_VELOCITY}"):
    return spark.createDataFrame(rows, schema)


def test_a_feature_row_at_exactly_the_spine_time_is_used(spark):
    got = join(spark, [("e1", "a", "m", t("10:00"))],
               [("a", t("09:30"), t("09:31"), 1), ("a", t("10:00"), t("10:00:05"), 2),
                ("a", t("10:00:01"), t("10:00:02"), 3)])
    assert_df_equality(got, expect(spark, [("e1", "a", "m", t("10:00"), t("10:00"), t("10:00:05"), 2)]),
                       ignore_row_order=True)


def test_max_age_includes_a_row_exactly_max_age_old_and_not_one_older(spark):
    got = join(spark, [("at-boundary", "a", "m", t("10:00")), ("past-boundary", "b", "m", t("10:00"))],
               [("a", t("09:00"), t("09:00"), 1), ("b", t("08:59:59"), t("09:00"), 7)], velocity("1h"))
    assert_df_equality(got, expect(spark, [
        ("at-boundary", "a", "m", t("10:00"), t("09:00"), t("09:00"), 1),
        ("past-boundary", "b", "m", t("10:00"), None, None, None),
    ]), ignore_row_order=True)


def test_ties_on_event_time_take_the_latest_computed_at(spark):
    # The 10:00 row was recomputed at 12:00 (a late correction): the correction wins.
    got = join(spark, [("e1", "a", "m", t("10:30"))],
               [("a", t("10:00"), t("10:00:05"), 1), ("a", t("10:00"), t("12:00"), 5)])
    assert_df_equality(got, expect(spark, [("e1", "a", "m", t("10:30"), t("10:00"), t("12:00"), 5)]),
                       ignore_row_order=True)


def test_full_ties_are_broken_by_the_values_whatever_the_input_order(spark):
    rows = [("a", t("10:00"), t("10:01"), 4), ("a", t("10:00"), t("10:01"), 9), ("a", t("10:00"), t("10:01"), 6)]
    expected = expect(spark, [("e1", "a", "m", t("10:30"), t("10:00"), t("10:01"), 9)])
    for ordered in (rows, rows[::-1]):
        assert_df_equality(join(spark, [("e1", "a", "m", t("10:30"))], ordered), expected, ignore_row_order=True)


def test_an_entity_without_feature_rows_or_a_null_key_gets_nulls(spark):
    got = join(spark, [("unknown", "zz", "m", t("10:00")), ("null-key", None, "m", t("10:00"))],
               [("a", t("09:30"), t("09:30"), 1)])
    assert_df_equality(got, expect(spark, [
        ("unknown", "zz", "m", t("10:00"), None, None, None),
        ("null-key", None, "m", t("10:00"), None, None, None),
    ]), ignore_row_order=True)


def test_duplicate_spine_rows_are_all_kept(spark):
    spine = [("e1", "a", "m", t("10:00")), ("e1", "a", "m", t("10:00")), ("e2", "a", "m", t("09:45"))]
    got = join(spark, spine, [("a", t("09:30"), t("09:30"), 1), ("a", t("09:50"), t("09:50"), 2)])
    assert_df_equality(got, expect(spark, [
        ("e1", "a", "m", t("10:00"), t("09:50"), t("09:50"), 2),
        ("e1", "a", "m", t("10:00"), t("09:50"), t("09:50"), 2),
        ("e2", "a", "m", t("09:45"), t("09:30"), t("09:30"), 1),
    ]), ignore_row_order=True)


def test_views_with_different_entity_keys_join_on_their_own_columns(spark):
    spine = spark.createDataFrame([("e1", "a", "m1", t("10:20")), ("e2", "b", "m2", t("10:20"))], SPINE)
    velocity_table = spark.createDataFrame([("a", t("10:10"), t("10:10"), 3), ("m1", t("10:10"), t("10:10"), 99)],
                                           VELOCITY_TABLE)
    hourly_table = spark.createDataFrame([("m1", t("09:00"), t("10:00"), t("10:11"), 40),
                                          ("m1", t("09:15"), t("10:15"), t("10:26"), 41),
                                          ("m2", t("09:15"), t("10:15"), t("10:26"), 7),
                                          ("a", t("09:15"), t("10:15"), t("10:26"), 55)], HOURLY_TABLE)
    got = point_in_time_join(spine, {"account_velocity": velocity_table, "merchant_hourly": hourly_table},
                             [velocity(), hourly()], "ts")
    # Sliding rows are placed at their window end; velocity rows keyed "m1" never reach merchant m1.
    expected = spark.createDataFrame([
        ("e1", "a", "m1", t("10:20"), t("10:10"), t("10:10"), 3, t("10:15"), t("10:26"), 41),
        ("e2", "b", "m2", t("10:20"), None, None, None, t("10:15"), t("10:26"), 7),
    ], f"{SPINE}, {OUT_VELOCITY}, {OUT_HOURLY}")
    assert_df_equality(got, expected, ignore_row_order=True)


def test_as_served_only_uses_rows_computed_by_the_spine_time(spark):
    table = [("a", t("09:00"), t("09:00:05"), 1),
             # recomputed by a backfill at 11:00: as served at 10:00 it did not exist yet
             ("a", t("09:40"), t("11:00"), 2),
             # computed late but before 10:00
             ("a", t("09:50"), t("09:58"), 3),
             ("a", t("09:55"), t("10:05"), 4)]
    spine = [("e1", "a", "m", t("10:00"))]
    served = join(spark, spine, table, velocity("2h"), mode="as_served")
    corrected = join(spark, spine, table, velocity("2h"), mode="as_corrected")
    assert_df_equality(served, expect(spark, [("e1", "a", "m", t("10:00"), t("09:50"), t("09:58"), 3)]),
                       ignore_row_order=True)
    assert_df_equality(corrected, expect(spark, [("e1", "a", "m", t("10:00"), t("09:55"), t("10:05"), 4)]),
                       ignore_row_order=True)


def test_as_served_prefers_the_greatest_event_time_not_the_last_computed(spark):
    # At 12:30 both rows are visible; the 11:00 row is newer by event time though computed first.
    table = [("a", t("10:00"), t("12:00"), 1), ("a", t("11:00"), t("11:05"), 2)]
    got = join(spark, [("e1", "a", "m", t("12:30"))], table, velocity("3h"), mode="as_served")
    assert_df_equality(got, expect(spark, [("e1", "a", "m", t("12:30"), t("11:00"), t("11:05"), 2)]),
                       ignore_row_order=True)


@pytest.mark.parametrize("spine_schema, message", [
    ("example string, merchant_id string, ts timestamp", "no column 'account_id' to join view account_velocity"),
    ("example string, account_id int, merchant_id string, ts timestamp", "'account_id' is int"),
    ("example string, account_id string, merchant_id string, ts string", "'ts' is string, not a timestamp"),
    ("example string, account_id string, account_velocity__count_1h long, ts timestamp",
     "'account_velocity__count_1h' of view account_velocity already exists"),
])
def test_a_spine_that_cannot_be_joined_fails_naming_the_column(spark, spine_schema, message):
    spine = spark.createDataFrame([], spine_schema)
    table = spark.createDataFrame([], VELOCITY_TABLE)
    with pytest.raises(ConfigError, match=message):
        point_in_time_join(spine, {"account_velocity": table}, [velocity()], "ts")


def test_unknown_features_are_refused_naming_them():
    with pytest.raises(ConfigError, match="account_velocity has no feature count_2h"):
        view_request(VELOCITY, ["count_1h", "count_2h"])


def test_max_age_defaults_to_the_online_ttl():
    assert view_request(VELOCITY).max_age == VELOCITY.online.ttl == timedelta(days=7)


def test_the_leakage_guard_catches_a_join_that_takes_the_latest_row_regardless_of_time(spark):
    spine = spark.createDataFrame([("e1", "a", "m", t("10:00")), ("e2", "b", "m", t("10:00"))], SPINE)
    # A leaking "join": each entity's latest feature row, whenever it happened.
    leaking = spine.join(spark.createDataFrame(
        [("a", t("10:30"), t("10:30"), 5, 9), ("b", t("09:50"), t("09:50"), 1, 9)],
        "account_id string, account_velocity__event_time timestamp, account_velocity__computed_at timestamp, "
        "account_velocity__count_1h long, unused int").drop("unused"), "account_id", "left")
    report = training_report(leaking, [velocity()], "ts", "as_corrected")
    assert report.views[0].after_timestamp == 1
    with pytest.raises(LeakageError, match="account_velocity: 1 rows joined a feature row from after their timestamp"):
        check_leakage(report)


def test_the_report_counts_matches_null_rates_and_ages(spark):
    got = join(spark, [("e1", "a", "m", t("10:00")), ("e2", "b", "m", t("10:00")), ("e3", "a", "m", t("10:10"))],
               [("a", t("09:50"), t("09:50"), 1), ("a", t("10:00"), t("10:00"), None)])
    report = training_report(got, [velocity()], "ts", "as_corrected")
    assert (report.rows, report.views[0].matched) == (3, 2)
    # e2 has no row; e1 and e3 took the 10:00 row whose count_1h is null.
    assert report.views[0].null_rates == {"count_1h": 1.0}
    assert (report.views[0].age_p50_seconds, report.views[0].age_max_seconds) == (0.0, 600.0)
    assert report.violations() == []


def test_labels_after_the_cutoff_and_null_timestamps_are_violations(spark):
    rows = spark.createDataFrame([("e1", None, t("09:00")), ("e2", t("10:00"), t("12:00"))],
                                 "example string, ts timestamp, label_time timestamp")
    report = training_report(rows, [], "ts", "as_corrected", label_time="label_time", label_cutoff=t("11:00"))
    assert report.violations() == ["1 spine rows have a null (or unparseable) timestamp",
                                   "1 spine rows have a label known only after the label cutoff"]


def test_content_hash_ignores_row_order_and_sees_values_nulls_and_duplicates(spark):
    schema = "a string, b long"
    base = content_hash(spark.createDataFrame([("x", 1), ("y", None)], schema))
    assert content_hash(spark.createDataFrame([("y", None), ("x", 1)], schema)) == base
    assert content_hash(spark.createDataFrame([("x", 2), ("y", None)], schema)) != base
    assert content_hash(spark.createDataFrame([("x", 1), ("y", None), ("x", 1)], schema)) != base
    # The row hashes skip nulls: without null markers these two rows would hash alike.
    assert (content_hash(spark.createDataFrame([(None, "1")], "a string, b string"))
            != content_hash(spark.createDataFrame([("1", None)], "a string, b string")))
    assert content_hash(spark.createDataFrame([("x", 1), ("y", None)], "a string, c long")) != base


def test_output_columns_are_prefixed_with_the_view():
    assert output_column("merchant_hourly", "count") == "merchant_hourly__count"


def test_histograms_count_non_null_values_per_bin(spark):
    frame = spark.createDataFrame([(0.0, 5, None), (1.0, 5, None), (2.5, 5, None), (4.0, None, None), (None, 5, None)],
                                  "x double, constant long, empty double")
    got = histograms(frame, ["x", "constant", "empty"], bins=4)
    # x: edges 0, 1, 2, 3, 4; the maximum falls in the last bin; the null is in no bin.
    assert got["x"] == ([0.0, 1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1])
    assert got["constant"][1] == [4, 0, 0, 0]
    assert "empty" not in got


# --------------------------------------------------------------------------- attributes views

PROFILE = VIEWS["account_profile"]
HISTORY = ("account_id string, status string, credit_limit double, home_country string, updated_at timestamp, "
           "cdc_op string, cdc_lsn long, cdc_tx_id long, cdc_deleted boolean, valid_from timestamp, valid_to timestamp")
OUT_PROFILE = ("account_profile__event_time timestamp, account_profile__computed_at timestamp, "
               "account_profile__status string, account_profile__credit_limit double")


def profile_join(spark, spine_rows, history_rows):
    spine = spark.createDataFrame(spine_rows, SPINE)
    history = spark.createDataFrame(history_rows, HISTORY)
    table = attribute_rows(history, PROFILE.entity, PROFILE.attributes)
    return point_in_time_join(spine, {"account_profile": table},
                              [view_request(PROFILE, ["status", "credit_limit"])], "ts")


def change(account, status, limit, op, lsn, at, until=None, deleted=False):
    return (account, status, limit, None if deleted else "DE", None, op, lsn, 1, deleted, at, until)


def test_an_attributes_row_holds_from_its_commit_until_the_next_change_then_a_delete_leaves_nulls(spark):
    history = [change("a", "active", 100.0, "c", 10, t("09:00"), t("10:00")),
               change("a", "frozen", 50.0, "u", 20, t("10:00"), t("11:00")),
               change("a", None, None, "d", 30, t("11:00"), deleted=True)]
    spine = [("before", "a", "m", t("08:59")), ("between", "a", "m", t("09:59:59")), ("at-change", "a", "m", t("10:00")),
             ("year-later", "b", "m", t("10:00")), ("after-delete", "a", "m", t("11:30"))]
    got = profile_join(spark, spine, history)
    expected = [("before", "a", "m", t("08:59"), None, None, None, None),
                ("between", "a", "m", t("09:59:59"), t("09:00"), t("09:00"), "active", 100.0),
                ("at-change", "a", "m", t("10:00"), t("10:00"), t("10:00"), "frozen", 50.0),
                ("year-later", "b", "m", t("10:00"), None, None, None, None),
                ("after-delete", "a", "m", t("11:30"), t("11:00"), t("11:00"), None, None)]
    assert_df_equality(got, expect(spark, expected, f"{SPINE}, {OUT_PROFILE}"), ignore_row_order=True)


def test_an_attributes_view_takes_no_max_age_at_build_time():
    with pytest.raises(ConfigError, match="--max-age: account_profile is an attributes view"):
        view_request(PROFILE, max_age=timedelta(days=30))


def test_an_attributes_row_has_no_age_limit(spark):
    got = profile_join(spark, [("e", "a", "m", datetime(2027, 11, 20, 9))],
                       [change("a", "active", 100.0, "c", 10, t("09:00"))])
    assert [(r.account_profile__status, r.account_profile__credit_limit) for r in got.collect()] == [("active", 100.0)]


def test_of_two_changes_committed_at_the_same_instant_the_later_lsn_holds(spark):
    # By values, ("active", 900.0) would win the tie; the later change (LSN 21) is ("active", 5.0).
    history = [change("a", "active", 900.0, "u", 20, t("10:00"), t("10:00")),
               change("a", "active", 5.0, "u", 21, t("10:00"))]
    got = profile_join(spark, [("e", "a", "m", t("10:00"))], history)
    assert [r.account_profile__credit_limit for r in got.collect()] == [5.0]
