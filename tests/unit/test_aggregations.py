"""Feature-view transforms on tiny hand-computed data: boundaries, delay, ties, empty intervals."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from chispa import assert_df_equality

from pipelines.core.config import build
from pipelines.core.contract_spec import load_contracts
from pipelines.core.settings import PROJECT_ROOT
from pipelines.core.view_spec import FeatureView, check_view
from pipelines.features.transforms import session_features, sliding_features, trailing_features

CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")
EVENTS = "account_id string, event_time timestamp, amount_usd double, balance_usd double, merchant_id string"


def ts(hhmm: str) -> datetime:
    """``'10:00'`` or ``'10:00:01'`` on 2026-11-23 (UTC, naive as Spark collects it)."""
    return datetime.fromisoformat(f"2026-11-23T{hhmm}")


def view(**spec) -> FeatureView:
    base = {"name": "v", "source": {"contract": "transactions"}, "entity": "account_id", "event_time": "event_time"}
    built = build(FeatureView, {**base, **spec}, "test")
    check_view(built, CONTRACTS, "test")
    return built


def events(spark, rows):
    """rows of (account, time, amount[, balance[, merchant]])."""
    full = [tuple(r) + (None,) * (5 - len(r)) for r in rows]
    return spark.createDataFrame([(a, ts(t), amt, bal, m) for a, t, amt, bal, m in full], EVENTS)


def trailing(**spec) -> FeatureView:
    return view(kind="trailing", **spec)


COUNT_1H = trailing(aggregations=[{"column": "*", "functions": ["count"], "windows": ["1h"]}])


def test_event_exactly_one_window_before_is_excluded(spark):
    out = trailing_features(events(spark, [("a", "10:00", 1.0), ("a", "11:00", 2.0)]), COUNT_1H)
    assert_df_equality(out, spark.createDataFrame([("a", ts("10:00"), 1), ("a", ts("11:00"), 1)],
                                                  "account_id string, event_time timestamp, count_1h long"),
                       ignore_row_order=True, ignore_nullable=True)


def test_event_just_inside_the_window_is_included(spark):
    out = trailing_features(events(spark, [("a", "10:00:00.000001", 1.0), ("a", "11:00", 2.0)]), COUNT_1H)
    assert sorted((r.event_time, r.count_1h) for r in out.collect()) == [
        (ts("10:00:00.000001"), 1), (ts("11:00"), 2)]


def test_events_at_the_same_time_all_count_for_each_other(spark):
    v = trailing(aggregations=[{"column": "*", "functions": ["count"], "windows": ["1h"]},
                               {"column": "amount_usd", "functions": ["sum"], "windows": ["1h"]}])
    out = trailing_features(events(spark, [("a", "10:00", 1.0), ("a", "10:00", 2.0), ("a", "09:30", 4.0)]), v)
    assert sorted((r.event_time, r.count_1h, r.sum_amount_usd_1h) for r in out.collect()) == [
        (ts("09:30"), 1, 4.0), (ts("10:00"), 3, 7.0), (ts("10:00"), 3, 7.0)]


def test_entities_never_mix(spark):
    out = trailing_features(events(spark, [("a", "10:00", 1.0), ("b", "10:10", 1.0), ("a", "10:20", 1.0)]), COUNT_1H)
    assert sorted((r.account_id, r.event_time, r.count_1h) for r in out.collect()) == [
        ("a", ts("10:00"), 1), ("a", ts("10:20"), 2), ("b", ts("10:10"), 1)]


DELAYED = trailing(delay="30m", aggregations=[
    {"column": "*", "functions": ["count"], "windows": ["1h"]},
    {"column": "amount_usd", "functions": ["sum", "avg", "min", "max", "last"], "windows": ["1h"]},
])


def test_delay_shifts_the_interval_back(spark):
    # 10:00 covers (08:30, 09:30]: only 09:00. 09:40 covers (08:10, 09:10]: 09:00. 09:00 covers (07:30, 08:30].
    out = trailing_features(events(spark, [("a", "09:00", 5.0), ("a", "09:40", 7.0), ("a", "10:00", 9.0)]), DELAYED)
    assert sorted((r.event_time, r.count_1h, r.sum_amount_usd_1h) for r in out.collect()) == [
        (ts("09:00"), 0, 0.0), (ts("09:40"), 1, 5.0), (ts("10:00"), 1, 5.0)]


def test_empty_interval_counts_and_sums_zero_and_nulls_the_rest(spark):
    out = trailing_features(events(spark, [("a", "09:00", 5.0)]), DELAYED).collect()
    assert [(r.count_1h, r.sum_amount_usd_1h, r.avg_amount_usd_1h, r.min_amount_usd_1h, r.max_amount_usd_1h,
             r.last_amount_usd_1h) for r in out] == [(0, 0.0, None, None, None, None)]


def test_last_is_the_latest_non_null_value_ties_broken_by_the_greatest(spark):
    v = trailing(aggregations=[{"column": "balance_usd", "functions": ["last"], "windows": ["1h"]}])
    rows = [("a", "10:00", 1.0, 5.0), ("a", "10:30", 1.0, 3.0), ("a", "10:30", 1.0, 7.0), ("a", "10:45", 1.0, None)]
    out = trailing_features(events(spark, rows), v)
    assert sorted((r.event_time, r.last_balance_usd_1h) for r in out.collect()) == [
        (ts("10:00"), 5.0), (ts("10:30"), 7.0), (ts("10:30"), 7.0), (ts("10:45"), 7.0)]


def test_distinct_count_and_average_over_two_windows(spark):
    v = trailing(aggregations=[{"column": "merchant_id", "functions": ["approx_count_distinct"], "windows": ["1h", "1d"]},
                               {"column": "amount_usd", "functions": ["avg"], "windows": ["1h"]}])
    rows = [("a", "08:00", 2.0, None, "m1"), ("a", "10:00", 4.0, None, "m2"), ("a", "10:30", 6.0, None, "m1")]
    out = trailing_features(events(spark, rows), v)
    assert sorted((r.event_time, r.approx_count_distinct_merchant_id_1h, r.approx_count_distinct_merchant_id_1d,
                   r.avg_amount_usd_1h) for r in out.collect()) == [
        (ts("08:00"), 1, 1, 2.0), (ts("10:00"), 1, 2, 4.0), (ts("10:30"), 2, 2, 5.0)]


TUMBLING = view(kind="sliding", window="1h", aggregations=[{"column": "*", "functions": ["count"]},
                                                            {"column": "amount_usd", "functions": ["sum"]}])


def test_tumbling_windows_are_half_open(spark):
    out = sliding_features(events(spark, [("a", "10:05", 1.0), ("a", "10:59:59", 2.0), ("a", "11:00", 4.0)]), TUMBLING)
    assert_df_equality(
        out,
        spark.createDataFrame([("a", ts("10:00"), ts("11:00"), 2, 3.0), ("a", ts("11:00"), ts("12:00"), 1, 4.0)],
                              "account_id string, window_start timestamp, window_end timestamp, count long, sum_amount_usd double"),
        ignore_row_order=True, ignore_nullable=True,
    )


def test_sliding_window_counts_an_event_in_every_window_containing_it(spark):
    v = view(kind="sliding", window="1h", slide="30m", aggregations=[{"column": "*", "functions": ["count"]}])
    out = sliding_features(events(spark, [("a", "10:40", 1.0)]), v)
    assert sorted((r.window_start, r.window_end, r["count"]) for r in out.collect()) == [
        (ts("10:00"), ts("11:00"), 1), (ts("10:30"), ts("11:30"), 1)]


def test_streaming_sliding_view_emits_closed_windows_and_drops_events_behind_the_watermark(spark, tmp_path: Path):
    """Allowed lateness 10m: after 11:20 the watermark is 11:10, so [10:00, 11:00) is final and a
    later 10:30 event is dropped; 12:30 then closes [11:00, 12:00)."""
    source = tmp_path / "events"
    source.mkdir()
    v = view(kind="sliding", window="1h", allowed_lateness="10m", aggregations=[{"column": "*", "functions": ["count"]}])

    def add(name: str, rows) -> None:
        events(spark, rows).write.parquet(str(source / name))

    add("a", [("a", "10:05", 1.0), ("a", "11:20", 1.0)])
    stream = spark.readStream.schema(EVENTS).option("recursiveFileLookup", "true").parquet(str(source))
    query = (sliding_features(stream, v).writeStream.format("memory").queryName(f"sliding_{time.time_ns()}")
             .outputMode("append").start())
    try:
        query.processAllAvailable()
        add("b", [("a", "10:30", 1.0), ("a", "12:30", 1.0)])
        query.processAllAvailable()
        add("c", [("a", "12:35", 1.0)])  # one more batch: the watermark of 12:20 closes [11:00, 12:00)
        query.processAllAvailable()
        emitted = sorted((r.window_start, r["count"]) for r in spark.table(query.name).collect())
        dropped = sum(op.numRowsDroppedByWatermark for p in query.recentProgress for op in p.stateOperators)
    finally:
        query.stop()
    assert emitted == [(ts("10:00"), 1), (ts("11:00"), 1)]
    assert dropped == 1


def test_sessions_close_after_the_gap(spark):
    v = view(kind="session", gap="30m", aggregations=[{"column": "amount_usd", "functions": ["sum"]}])
    out = session_features(events(spark, [("a", "10:00", 1.0), ("a", "10:10", 2.0), ("a", "11:00", 4.0)]), v)
    assert sorted((r.session_start, r.session_end, r.event_count, r.duration_seconds, r.sum_amount_usd)
                  for r in out.collect()) == [
        (ts("10:00"), ts("10:40"), 2, 600.0, 3.0), (ts("11:00"), ts("11:30"), 1, 0.0, 4.0)]


def test_session_counts_per_listed_value(spark):
    v = view(kind="session", gap="30m", count_by=[{"column": "merchant_id", "values": ["m1", "m2"]}])
    rows = [("a", "10:00", 1.0, None, "m1"), ("a", "10:05", 1.0, None, "m1"), ("a", "10:06", 1.0, None, "m3")]
    out = session_features(events(spark, rows), v).collect()
    assert [(r.event_count, r.count_merchant_id_m1, r.count_merchant_id_m2) for r in out] == [(3, 2, 0)]


def test_a_filter_on_session_end_selects_whole_sessions_never_their_events(spark):
    # Spark pushes filters on a grouping key below the aggregate; a session's key before the
    # merge is each event's own [t, t + gap), so a filter on it would cut sessions short.
    v = view(kind="session", gap="30m", aggregations=[{"column": "amount_usd", "functions": ["sum"]}])
    out = session_features(events(spark, [("a", "10:00", 1.0), ("a", "10:20", 2.0), ("a", "10:40", 4.0)]), v)
    assert out.filter(out.session_end <= ts("10:55")).count() == 0
    assert [(r.event_count, r.sum_amount_usd) for r in out.filter(out.session_end <= ts("11:10")).collect()] == [(3, 7.0)]
