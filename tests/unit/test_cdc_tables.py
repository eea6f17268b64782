"""Change rows into the current and history tables (:mod:`pipelines.cdc.tables`)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from chispa import assert_df_equality
from delta.tables import DeltaTable
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, DoubleType, LongType, StringType, StructField, StructType, TimestampType

from pipelines.cdc.tables import (
    as_of,
    current_schema,
    history_schema,
    idempotent,
    merge_current,
    merge_history,
    without_unchanged_snapshot_reads,
)
from pipelines.core.delta import ensure_delta_table
from pipelines.core.settings import PROJECT_ROOT, load_settings

T = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
CHANGE_SCHEMA = StructType([
    StructField("account_id", StringType()), StructField("status", StringType()),
    StructField("credit_limit", DoubleType()), StructField("home_country", StringType()),
    StructField("updated_at", TimestampType()),
    StructField("cdc_op", StringType()), StructField("cdc_lsn", LongType()), StructField("cdc_tx_id", LongType()),
    StructField("cdc_commit_time", TimestampType()), StructField("cdc_deleted", BooleanType()),
])


@pytest.fixture(scope="module")
def contract():
    return load_settings("local", PROJECT_ROOT / "conf").contracts["accounts"]


def at(seconds: int) -> datetime:
    return T + timedelta(seconds=seconds)


def change(account, op, lsn, status=None, limit=None, country="DE", second=None):
    """One change row; a delete carries the key only."""
    if op == "d":
        return (account, None, None, None, None, "d", lsn, lsn, at(second if second is not None else lsn), True)
    return (account, status, limit, country, at(lsn), op, lsn, lsn, at(second if second is not None else lsn), False)


@pytest.fixture
def tables(spark, tmp_path, contract):
    current, history = str(tmp_path / "current"), str(tmp_path / "history")
    ensure_delta_table(spark, current, current_schema(contract))
    ensure_delta_table(spark, history, history_schema(contract))
    return current, history


def apply(spark, tables, contract, rows, batch_id=0, app_id="test"):
    frame = spark.createDataFrame(rows, CHANGE_SCHEMA)
    current, history = tables
    with idempotent(spark, f"{app_id}:current", batch_id):
        merge_current(spark, current, frame, contract)
    with idempotent(spark, f"{app_id}:history", batch_id):
        merge_history(spark, history, frame, contract)


def current_rows(spark, path):
    return spark.read.format("delta").load(path).select("account_id", "status", "credit_limit", "cdc_lsn")


def expected_current(spark, rows):
    schema = StructType([StructField("account_id", StringType(), False), StructField("status", StringType()),
                         StructField("credit_limit", DoubleType()), StructField("cdc_lsn", LongType(), False)])
    return spark.createDataFrame(rows, schema)


def test_several_changes_of_a_key_in_one_batch_resolve_to_the_last(spark, tables, contract):
    apply(spark, tables, contract, [change("a", "c", 1, "active", 100.0), change("c", "c", 2, "active", 5.0)], 0)
    apply(spark, tables, contract, [
        change("a", "u", 3, "frozen", 100.0), change("a", "u", 4, "frozen", 250.0),
        change("b", "c", 5, "active", 10.0), change("b", "u", 6, "closed", 10.0),
        change("c", "d", 7),
        change("d", "c", 8, "active", 1.0), change("d", "d", 9),
    ], 1)
    assert_df_equality(current_rows(spark, tables[0]),
                       expected_current(spark, [("a", "frozen", 250.0, 4), ("b", "closed", 10.0, 6)]),
                       ignore_row_order=True, ignore_nullable=True)


def test_an_older_change_never_overwrites_a_newer_one(spark, tables, contract):
    apply(spark, tables, contract, [change("a", "c", 10, "active", 100.0)], 0)
    apply(spark, tables, contract, [change("a", "u", 5, "frozen", 1.0), change("a", "d", 7)], 1)
    assert_df_equality(current_rows(spark, tables[0]), expected_current(spark, [("a", "active", 100.0, 10)]),
                       ignore_nullable=True)


def test_a_replayed_batch_is_skipped_and_would_change_nothing_anyway(spark, tables, contract):
    batch = [change("a", "c", 1, "active", 100.0), change("a", "u", 2, "frozen", 100.0), change("b", "c", 3, "active", 1.0),
             change("b", "d", 4)]
    apply(spark, tables, contract, batch, 0)
    versions = [DeltaTable.forPath(spark, path).history(1).first().version for path in tables]
    before = [spark.read.format("delta").load(path).collect() for path in tables]
    apply(spark, tables, contract, batch, 0)  # the same batch id: Delta skips both MERGEs
    assert [DeltaTable.forPath(spark, path).history(1).first().version for path in tables] == versions
    apply(spark, tables, contract, batch, 0, app_id="another")  # applied: the MERGEs are idempotent too
    assert [sorted(spark.read.format("delta").load(path).collect(), key=str) for path in tables] == [
        sorted(b, key=str) for b in before]


def test_the_history_has_a_row_per_change_valid_until_the_keys_next_change(spark, tables, contract):
    apply(spark, tables, contract, [change("a", "c", 1, "active", 100.0), change("a", "u", 2, "frozen", 100.0)], 0)
    apply(spark, tables, contract, [change("a", "u", 5, "active", 300.0), change("b", "c", 6, "active", 1.0)], 1)
    apply(spark, tables, contract, [change("a", "d", 9)], 2)
    history = spark.read.format("delta").load(tables[1]).select("account_id", "cdc_op", "status", "cdc_deleted",
                                                                "valid_from", "valid_to")
    schema = StructType([StructField("account_id", StringType(), False), StructField("cdc_op", StringType(), False),
                         StructField("status", StringType()), StructField("cdc_deleted", BooleanType(), False),
                         StructField("valid_from", TimestampType(), False), StructField("valid_to", TimestampType())])
    expected = spark.createDataFrame([
        ("a", "c", "active", False, at(1), at(2)),
        ("a", "u", "frozen", False, at(2), at(5)),
        ("a", "u", "active", False, at(5), at(9)),
        ("a", "d", None, True, at(9), None),
        ("b", "c", "active", False, at(6), None),
    ], schema)
    assert_df_equality(history, expected, ignore_row_order=True, ignore_nullable=True)


def test_as_of_gives_the_value_valid_at_a_time_between_two_changes(spark, tables, contract):
    apply(spark, tables, contract, [change("a", "c", 1, "active", 100.0), change("a", "u", 5, "frozen", 100.0),
                                    change("a", "d", 9)], 0)
    history = spark.read.format("delta").load(tables[1])

    def status_at(seconds):
        return [(r.status, r.cdc_deleted) for r in as_of(history, F.lit(at(seconds))).collect()]

    assert status_at(0) == []  # before the account existed
    assert status_at(1) == [("active", False)]  # at the commit: valid from then on
    assert status_at(4) == [("active", False)]  # between two changes: the earlier one, never the later
    assert status_at(5) == [("frozen", False)]
    assert status_at(20) == [(None, True)]  # deleted: no attributes


READ_SCHEMA = StructType([*CHANGE_SCHEMA.fields, StructField("kafka_offset", LongType())])


def reads_kept(spark, contract, history_rows, batch):
    """The ``(key, op, lsn)`` of ``batch`` (changes with their offsets) that are kept."""
    history = (spark.createDataFrame(history_rows, CHANGE_SCHEMA).withColumnRenamed("cdc_commit_time", "valid_from")
               if history_rows is not None else None)
    frame = spark.createDataFrame(batch, READ_SCHEMA)
    kept = without_unchanged_snapshot_reads(frame, history, contract)
    return sorted((r.account_id, r.cdc_op, r.cdc_lsn) for r in kept.collect())


def test_a_snapshot_read_equal_to_the_keys_state_before_it_is_no_change(spark, contract):
    # The reads' own timestamps differ from the rows they read (updated_at is the row's): same row.
    held = [change("a", "c", 1, "active", 100.0), change("b", "c", 2, "active", 5.0), change("c", "c", 3, "active", 7.0),
            change("c", "d", 4)]
    batch = [(*change("a", "r", 10, "active", 100.0)[:4], at(1), *change("a", "r", 10)[5:], 0),   # unchanged
             (*change("b", "r", 11, "frozen", 5.0)[:4], at(2), *change("b", "r", 11)[5:], 1),    # missed change
             (*change("c", "r", 12, "active", 7.0)[:4], at(3), *change("c", "r", 12)[5:], 2),    # held as deleted
             (*change("d", "r", 13, "active", 1.0), 3)]                                         # unknown key
    assert reads_kept(spark, contract, held, batch) == [("b", "r", 11), ("c", "r", 12), ("d", "r", 13)]


def test_a_read_is_compared_with_the_change_before_it_in_the_same_batch_and_a_stale_read_is_dropped(spark, contract):
    batch = [(*change("a", "u", 5, "frozen", 9.0), 0),
             (*change("a", "r", 6, "frozen", 9.0)[:4], at(5), *change("a", "r", 6)[5:], 1),  # = the update before it
             (*change("b", "u", 9, "closed", 1.0), 2),
             (*change("b", "r", 7, "active", 1.0), 3)]  # LSN 7 arrives after LSN 9: read before that update
    assert reads_kept(spark, contract, None, batch) == [("a", "u", 5), ("b", "u", 9)]


def test_a_replayed_batch_does_not_take_its_own_rows_for_the_state_before_it(spark, contract):
    # The batch (a read, then an update of the key) was applied once: its rows are held. Taken
    # for rows from before the batch, the update would make the read stale, or equal to it.
    batch = [(*change("a", "r", 10, "frozen", 100.0), 0), (*change("a", "u", 11, "closed", 100.0), 1)]
    held = [change("a", "c", 1, "active", 100.0), change("a", "r", 10, "frozen", 100.0),
            change("a", "u", 11, "closed", 100.0)]
    assert reads_kept(spark, contract, held, batch) == [("a", "r", 10), ("a", "u", 11)]


def test_a_read_that_saw_a_change_committed_before_it_gives_way_to_that_change_in_one_batch(spark, contract):
    # A snapshot reads rows as they are when it reads them: the update committed at 15 is in the
    # read taken at 20, and the update's own event comes after the read on the topic.
    held = [change("a", "c", 1, "active", 100.0)]
    batch = [(*change("a", "r", 10, "frozen", 100.0, second=20), 0), (*change("a", "u", 12, "frozen", 100.0, second=15), 1)]
    assert reads_kept(spark, contract, held, batch) == [("a", "u", 12)]


def test_a_read_that_saw_a_change_gives_way_to_it_in_the_history_across_batches(spark, tables, contract):
    apply(spark, tables, contract, [change("a", "c", 1, "active", 100.0)], 0)
    apply(spark, tables, contract, [change("a", "r", 10, "frozen", 100.0, second=20)], 1)
    apply(spark, tables, contract, [change("a", "u", 12, "frozen", 100.0, second=15)], 2)
    history = spark.read.format("delta").load(tables[1])
    naive = {1: at(1).replace(tzinfo=None), 15: at(15).replace(tzinfo=None)}
    assert sorted((r.cdc_op, r.valid_from, r.valid_to) for r in history.collect()) == [
        ("c", naive[1], naive[15]), ("u", naive[15], None)]
    assert_df_equality(current_rows(spark, tables[0]), expected_current(spark, [("a", "frozen", 100.0, 12)]),
                       ignore_nullable=True)
