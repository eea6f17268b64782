"""Which recomputed rows a backfill restates in Redis: an entity's latest recomputed row, only
when the feature table holds nothing later for it on another day."""

from __future__ import annotations

from datetime import date, datetime

from chispa import assert_df_equality

from pipelines.batch.backfill import DayRange, entities_latest_within
from pipelines.core.settings import PROJECT_ROOT, load_settings

VIEW = load_settings("local", PROJECT_ROOT / "conf").views["account_velocity"]
SCHEMA = "account_id string, event_time timestamp, count_1h long, event_date date"


def row(account: str, when: str, count: int) -> tuple:
    moment = datetime.fromisoformat(when)
    return (account, moment, count, moment.date())


def test_only_entities_whose_latest_row_was_recomputed_are_restated(spark):
    recomputed = spark.createDataFrame(
        [row("a", "2026-11-20 10:00", 1), row("a", "2026-11-20 11:00", 2), row("b", "2026-11-20 12:00", 1),
         row("c", "2026-11-20 13:00", 1)], SCHEMA)
    # The whole table: a has a later row on the next day, c only an earlier one on the day before.
    table = recomputed.unionByName(spark.createDataFrame(
        [row("a", "2026-11-21 09:00", 3), row("c", "2026-11-19 08:00", 5)], SCHEMA))
    got = entities_latest_within(recomputed, table, VIEW, [DayRange(date(2026, 11, 20), date(2026, 11, 21))])
    expected = spark.createDataFrame([row("b", "2026-11-20 12:00", 1), row("c", "2026-11-20 13:00", 1)], SCHEMA)
    assert_df_equality(got, expected, ignore_row_order=True)
