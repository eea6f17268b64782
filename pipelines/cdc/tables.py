"""A table's change rows (:mod:`pipelines.cdc.changes`) into two Delta tables, exactly once:

* **current** (``cdc/<table>/current``): one row per live primary key, as the database has it
  now: the contract's columns, ``cdc_lsn`` and ``cdc_commit_time`` of the change it is at. A
  ``MERGE`` per batch: of several changes of one key in the batch, the last (highest LSN) is
  applied; a change applies only over an older one (``s.cdc_lsn > t.cdc_lsn``), so a replayed
  batch changes nothing; an insert or update upserts, a delete removes the key.
* **history** (``cdc/<table>/history``): one row per committed change, with
  ``valid_from`` (its commit time) and ``valid_to`` (the commit time of the key's next change;
  null while it is the latest). A delete is a row too (``cdc_deleted``, its columns null): from
  its commit on, the key has no attributes. A point-in-time lookup at T takes the key's row with
  ``valid_from <= T < valid_to`` (:func:`as_of`). A ``MERGE`` per batch inserts the batch's
  changes it does not hold yet (by key and LSN) and closes each key's open row with the batch's
  first change of that key.

Snapshot reads (``op r``) are observations, not changes: one that changes nothing is left out
(:func:`without_unchanged_snapshot_reads`), one that differs is applied as a change with its read
time, and one that saw a change committed before it whose event comes after it gives way to
that change (a snapshot reads rows as they are, not as of its LSN).

Both writes carry Delta's idempotent-write identifiers (``txnAppId``/``txnVersion``, through the
session settings Delta reads for ``MERGE``), so a batch replayed after a crash is skipped by
Delta, and both ``MERGE``\\ s are idempotent by construction besides.

Per key, LSN order is commit order: PostgreSQL's row locks make a second transaction wait for
the first to commit before it changes the same row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, LongType, StringType, StructField, StructType, TimestampType

from pipelines.contracts.spark_schema import spark_type
from pipelines.core.contract_spec import Contract

TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
TXN_VERSION = "spark.databricks.delta.write.txnVersion"


def current_schema(contract: Contract, extra: Sequence[str] = ()) -> StructType:
    """The current table's columns: the contract's, ``extra`` ones (strings), the change's LSN
    and commit time."""
    return StructType([
        *[StructField(f.name, spark_type(f), f.name != contract.key_field) for f in contract.fields],
        *[StructField(name, StringType(), True) for name in extra],
        StructField("cdc_lsn", LongType(), False),
        StructField("cdc_commit_time", TimestampType(), False),
    ])


def history_schema(contract: Contract, extra: Sequence[str] = ()) -> StructType:
    """The history table's columns: the contract's (null in a delete's row), ``extra`` ones,
    the change's op, LSN, transaction and whether it deleted the key, and its validity."""
    return StructType([
        *[StructField(f.name, spark_type(f), f.name != contract.key_field) for f in contract.fields],
        *[StructField(name, StringType(), True) for name in extra],
        StructField("cdc_op", StringType(), False),
        StructField("cdc_lsn", LongType(), False),
        StructField("cdc_tx_id", LongType(), True),
        StructField("cdc_deleted", BooleanType(), False),
        StructField("valid_from", TimestampType(), False),
        StructField("valid_to", TimestampType(), True),
    ])


def is_valid_change() -> Column:
    """Whether a change row is a change: valid, and not a tombstone."""
    return F.col("error_class").isNull() & ~F.col("cdc_tombstone")


def valid_changes(rows: DataFrame) -> DataFrame:
    """The changes among change rows: valid, and not a tombstone."""
    return rows.filter(is_valid_change())


def without_unchanged_snapshot_reads(changes: DataFrame, history: DataFrame | None, contract: Contract,
                                     extra: Sequence[str] = ()) -> DataFrame:
    """``changes`` (with their ``kafka_offset``) less the snapshot reads (``op r``) that change
    nothing. A read is dropped when the key's state before it, the change of the greatest LSN
    below the read's among ``history`` (rows held before this batch; None: none) and
    ``changes``, has the same values and deletion; when it is stale: a change of the key with
    a greater LSN arrived before it (held already, or earlier on the topic); or when a change
    of a greater LSN that comes after it on the topic committed before the read was taken (the
    read saw it; :func:`merge_history` handles the same across batches).

    Why: a re-snapshot of a table (a Debezium signal, or a connector restarted before its first
    offset commit) reads every row again; a row that did not change is no change, and the
    history keeps one row per change. A read that differs (the tables missed a change, or
    restore a lost key) is kept and applied as any change. A replayed batch finds its own rows
    in ``history``: they are left out of what it held before."""
    key = contract.key_field
    values = [c for c in _columns(contract, extra) if c != key] + ["cdc_deleted"]
    reads = changes.filter(F.col("cdc_op") == "r").select(
        key, F.col("cdc_lsn").alias("_read_lsn"), F.col("kafka_offset").alias("_read_offset"),
        F.col("cdc_commit_time").alias("_read_time"), *[F.col(c).alias(f"_read_{c}") for c in values])
    known = changes.select(key, *values, "cdc_lsn", "cdc_commit_time", F.col("kafka_offset").alias("_offset"))
    if history is not None:
        held = (history.select(key, *values, "cdc_lsn", F.col("valid_from").alias("cdc_commit_time"))
                .join(changes.select(key, "cdc_lsn"), [key, "cdc_lsn"], "left_anti"))
        known = known.unionByName(held.withColumn("_offset", F.lit(-1).cast("long")))
    pairs = reads.join(known, key)
    latest_before = Window.partitionBy(key, "_read_lsn").orderBy(F.col("cdc_lsn").desc())
    same = F.lit(True)
    for c in values:
        same = same & F.col(c).eqNullSafe(F.col(f"_read_{c}"))
    unchanged = (pairs.filter(F.col("cdc_lsn") < F.col("_read_lsn"))
                 .withColumn("_rank", F.row_number().over(latest_before)).filter((F.col("_rank") == 1) & same)
                 .select(key, "_read_lsn"))
    stale = (pairs.filter((F.col("cdc_lsn") > F.col("_read_lsn")) & (F.col("_offset") < F.col("_read_offset")))
             .select(key, "_read_lsn"))
    # A snapshot reads the rows as they are when it reads them, not as of its LSN: a change
    # committed before the read but streamed after it is in the read already, and its own event
    # follows (fuzzy read). The change is the record; the read is dropped.
    seen_ahead = (pairs.filter((F.col("cdc_lsn") > F.col("_read_lsn")) & (F.col("_offset") > F.col("_read_offset"))
                               & (F.col("cdc_commit_time") <= F.col("_read_time")))
                  .select(key, "_read_lsn"))
    dropped = (unchanged.unionByName(stale).unionByName(seen_ahead)
               .select(F.col(key).alias("_drop_key"), F.col("_read_lsn").alias("_drop_lsn")))
    is_dropped = ((F.col(key) == F.col("_drop_key")) & (F.col("cdc_lsn") == F.col("_drop_lsn"))
                  & (F.col("cdc_op") == "r"))
    return changes.join(dropped.distinct(), is_dropped, "left_anti")


def last_change_per_key(changes: DataFrame, key: str) -> DataFrame:
    """Per key, its change with the highest LSN (of several in one batch, the last)."""
    latest = Window.partitionBy(key).orderBy(F.col("cdc_lsn").desc())
    return changes.withColumn("_cdc_rank", F.row_number().over(latest)).filter("_cdc_rank = 1").drop("_cdc_rank")


def _columns(contract: Contract, extra: Sequence[str]) -> list[str]:
    return [*contract.field_names, *extra]


def merge_current(spark: SparkSession, path: str, changes: DataFrame, contract: Contract,
                  extra: Sequence[str] = ()) -> None:
    """Apply ``changes`` (valid changes, any number per key) to the current table at ``path``
    (see the module docstring)."""
    key = contract.key_field
    latest = last_change_per_key(changes, key)
    columns = [*_columns(contract, extra), "cdc_lsn", "cdc_commit_time"]
    values = {c: F.col(f"s.{c}") for c in columns}
    newer = F.col("s.cdc_lsn") > F.col("t.cdc_lsn")
    (DeltaTable.forPath(spark, path).alias("t")
     .merge(latest.alias("s"), F.col(f"t.{key}") == F.col(f"s.{key}"))
     .whenMatchedDelete(condition=newer & F.col("s.cdc_deleted"))
     .whenMatchedUpdate(condition=newer & ~F.col("s.cdc_deleted"), set=values)
     .whenNotMatchedInsert(condition=~F.col("s.cdc_deleted"), values=values)
     .execute())


def history_rows(changes: DataFrame, contract: Contract, extra: Sequence[str] = ()) -> DataFrame:
    """``changes`` as history rows, each valid until the key's next change in the same batch
    (null for the last of the batch: the table's MERGE leaves it open)."""
    key = contract.key_field
    by_lsn = Window.partitionBy(key).orderBy("cdc_lsn")
    return changes.select(
        *[F.col(c) for c in _columns(contract, extra)],
        "cdc_op", "cdc_lsn", "cdc_tx_id", "cdc_deleted",
        F.col("cdc_commit_time").alias("valid_from"),
        F.lead("cdc_commit_time").over(by_lsn).alias("valid_to"),
    )


def merge_history(spark: SparkSession, path: str, changes: DataFrame, contract: Contract,
                  extra: Sequence[str] = ()) -> None:
    """Append ``changes`` to the history table at ``path`` and close the rows they follow
    (see the module docstring)."""
    key = contract.key_field
    rows = history_rows(changes, contract, extra).withColumn("_cdc_kind", F.lit("row"))
    first = Window.partitionBy(key).orderBy("cdc_lsn")
    # One closing row per key: its first change in the batch ends the key's open row.
    closers = (rows.withColumn("_cdc_first", F.row_number().over(first)).filter("_cdc_first = 1")
               .drop("_cdc_first").withColumn("_cdc_kind", F.lit("close")))
    source = rows.unionByName(closers)
    same_change = (F.col("s._cdc_kind") == "row") & (F.col("t.cdc_lsn") == F.col("s.cdc_lsn"))
    # The rows the batch's first change of a key ends: the key's open row; and, after a fuzzy
    # snapshot read (see without_unchanged_snapshot_reads), the rows that end after this change
    # committed: the read, taken after the change committed (it saw it: the change replaces it),
    # and the row before the read, which the read closed too late. In commit order no other row
    # of a lower LSN ends after this change's commit.
    closes = ((F.col("s._cdc_kind") == "close") & (F.col("t.cdc_lsn") < F.col("s.cdc_lsn"))
              & (F.col("t.valid_to").isNull() | (F.col("t.valid_to") > F.col("s.valid_from"))))
    columns = [*_columns(contract, extra), "cdc_op", "cdc_lsn", "cdc_tx_id", "cdc_deleted", "valid_from", "valid_to"]
    read_saw_it = ((F.col("s._cdc_kind") == "close") & (F.col("t.cdc_op") == "r")
                   & (F.col("t.valid_from") >= F.col("s.valid_from")))
    (DeltaTable.forPath(spark, path).alias("t")
     .merge(source.alias("s"), (F.col(f"t.{key}") == F.col(f"s.{key}")) & (same_change | closes))
     .whenMatchedDelete(condition=read_saw_it)
     .whenMatchedUpdate(condition=F.col("s._cdc_kind") == "close", set={"valid_to": F.col("s.valid_from")})
     .whenNotMatchedInsert(condition=F.col("s._cdc_kind") == "row", values={c: F.col(f"s.{c}") for c in columns})
     .execute())


def current_from_history(history: DataFrame, contract: Contract, extra: Sequence[str] = ()) -> DataFrame:
    """The current table's rows as the history gives them: each key's open row of the highest
    LSN (as the current table's MERGE decides), unless it is a delete's (the key is gone)."""
    open_rows = history.filter(F.col("valid_to").isNull())
    latest = last_change_per_key(open_rows, contract.key_field).filter(~F.col("cdc_deleted"))
    return latest.select(*_columns(contract, extra), "cdc_lsn", F.col("valid_from").alias("cdc_commit_time"))


def current_from_changes(changes: DataFrame, contract: Contract, extra: Sequence[str] = ()) -> DataFrame:
    """The current table's rows from every change of the table (bronze): each key's last change,
    unless it is a delete."""
    latest = last_change_per_key(changes, contract.key_field).filter(~F.col("cdc_deleted"))
    return latest.select(*_columns(contract, extra), "cdc_lsn", "cdc_commit_time")


def attribute_rows(history: DataFrame, key: str, attributes: Sequence[str]) -> DataFrame:
    """A history table as an attributes view's rows (:mod:`pipelines.training.join`): the key,
    ``valid_from`` (when the row's values start to hold), ``computed_at`` (the same: a change is
    served from its commit on), ``cdc_lsn`` (orders changes committed at the same instant) and
    the ``attributes`` (null in a delete's row: from then on the key has none)."""
    return history.select(key, "valid_from", F.col("valid_from").alias("computed_at"), "cdc_lsn", *attributes)


def as_of(history: DataFrame, at: Column) -> DataFrame:
    """The history rows valid at ``at`` (a timestamp column or literal): per key, the change in
    force then (a delete's row included: the key had no attributes then)."""
    return history.filter((F.col("valid_from") <= at) & (F.col("valid_to").isNull() | (at < F.col("valid_to"))))


@contextmanager
def idempotent(spark: SparkSession, app_id: str, version: int) -> Iterator[None]:
    """Delta's idempotent-write identifiers for the writes (``MERGE`` included) made inside, on
    ``spark``: a foreachBatch's own session (each streaming query runs on a clone of its own),
    cleared after. A write whose ``app_id`` already committed ``version`` is skipped."""
    spark.conf.set(TXN_APP_ID, app_id)
    spark.conf.set(TXN_VERSION, str(version))
    try:
        yield
    finally:
        spark.conf.unset(TXN_APP_ID)
        spark.conf.unset(TXN_VERSION)
