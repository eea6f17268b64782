"""``fp-cdc``: two streaming queries per change-event topic, Kafka -> change rows -> (a) bronze,
the dead-letter table, the current and history tables, exactly once; (b) Redis.

Each query reads the topic ``read_committed`` (the connector writes in Kafka transactions: an
aborted one must stay unseen) with its own checkpoint (``_checkpoints/cdc/<topic>`` and
``_checkpoints/cdc_online/<topic>``).

The **tables query**'s ``foreachBatch`` handler (:class:`CdcBatchWriter`) writes, per batch:

1. the columns the table gained (``cdc_extra``'s names) to the current and history tables, as
   new nullable string columns, before the rows that carry them;
2. every valid change to bronze (``bronze/<topic>``, partitioned by commit date), every invalid
   record to the dead-letter table with its bytes, reason and Kafka coordinates (both appends
   carry ``txnAppId``/``txnVersion``);
3. the changes into the current and history tables (:mod:`pipelines.cdc.tables`, ``MERGE``\\ s
   with Delta's idempotent-write identifiers).

The **online query** (:class:`CdcOnlineWriter`) writes each key's last change of a batch to
Redis (:mod:`pipelines.online.attributes`: newer wins by LSN, a delete removes the key). Apart,
so that Redis does not wait for two ``MERGE``\\ s per batch (BENCHMARKS.md): the change is
committed in the database and on the topic already, and Redis takes a change only over an older
one, so a batch replayed after a crash writes nothing twice and the two queries need no order.
Redis is so usually ahead of the Delta tables.

A snapshot read that changes nothing (:func:`pipelines.cdc.tables.without_unchanged_snapshot_reads`)
reaches bronze only (nor changes Redis). A tombstone has no write of its
own (the delete before it does); it is counted. Each batch logs its steps' seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from pipelines.cdc.changes import CHANGE_COLUMNS, change_rows
from pipelines.cdc.tables import (
    current_from_changes,
    current_from_history,
    current_schema,
    history_rows,
    history_schema,
    idempotent,
    is_valid_change,
    last_change_per_key,
    merge_current,
    merge_history,
    valid_changes,
    without_unchanged_snapshot_reads,
)
from pipelines.contracts.validation import ValidationRules
from pipelines.core.checkpoints import checkpoint_location
from pipelines.core.contract_spec import Contract
from pipelines.core.delta import ensure_delta_table, read_delta_version, streaming_query_id, write_delta_idempotent
from pipelines.core.errors import ConfigError, PipelineError
from pipelines.core.runner import BatchGate, run_queries, with_trigger
from pipelines.core.settings import Settings
from pipelines.ingest.bronze import BRONZE_METADATA, dead_letter_rows
from pipelines.ingest.sources import read_kafka_stream
from pipelines.online.attributes import AttributeChange, AttributeStoreWriter
from pipelines.online.store import redis_client

log = logging.getLogger(__name__)

#: The table's own columns the tables add beside a change's values.
_TABLE_COLUMNS = frozenset({"cdc_lsn", "cdc_commit_time", "cdc_op", "cdc_tx_id", "cdc_deleted", "valid_from", "valid_to"})


def bronze_change_rows(rows: DataFrame, contract: Contract) -> DataFrame:
    """Valid changes as bronze rows: the contract's columns, the envelope's, ``cdc_extra``,
    the Kafka metadata, ``ingested_at`` and ``commit_date`` (the partition column)."""
    return valid_changes(rows).select(
        *contract.field_names, *CHANGE_COLUMNS, "cdc_extra", *BRONZE_METADATA,
        F.col("validated_at").alias("ingested_at"),
        F.to_date("cdc_commit_time").alias("commit_date"),
    )


def added_columns(columns: Sequence[str], contract: Contract) -> list[str]:
    """Of a current or history table's ``columns``, those the source table gained: beyond the
    contract's and the table's own."""
    own = {*contract.field_names, *_TABLE_COLUMNS}
    return [c for c in columns if c not in own]


def with_extra_columns(changes: DataFrame, extra: Sequence[str]) -> DataFrame:
    """``changes`` with each name of ``extra`` as a column of its own (from ``cdc_extra``; null
    where a change does not carry it: a delete, or a change from before the column existed)."""
    return changes.withColumns({name: F.element_at(F.col("cdc_extra"), F.lit(name)) for name in extra})


class StepTimer:
    """Seconds per step of a batch, for its log line: ``summary 0.12s, bronze 0.80s, ...``."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.steps: list[tuple[str, float]] = []

    def done(self, step: str) -> None:
        now = time.monotonic()
        self.steps.append((step, now - self.last))
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.steps) or "no step"


@dataclass(frozen=True)
class CdcBatchResult:
    changes: int
    tombstones: int
    dead_letters: int
    new_columns: tuple[str, ...]


class CdcBatchWriter:
    """``foreachBatch`` handler of one change-event topic (see the module docstring)."""

    def __init__(self, topic: str, contract: Contract, settings: Settings):
        self.topic, self.contract, self.settings = topic, contract, settings
        storage = settings.storage
        self.bronze = storage.bronze_path(topic)
        self.current, self.history = storage.cdc_path(topic, "current"), storage.cdc_path(topic, "history")
        self.results: dict[int, CdcBatchResult] = {}
        self._lock = threading.Lock()
        self.online = AttributeStoreWriter(redis_client(settings.redis), settings.redis.namespace, contract.name)

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        spark = batch.sparkSession
        app_id = f"cdc:{self.topic}:{streaming_query_id(spark)}"
        rows = batch.persist(StorageLevel.MEMORY_AND_DISK)
        steps = StepTimer()
        expanded: DataFrame | None = None
        try:
            # One pass: how many of each kind, whether a snapshot read is among the changes, and
            # the names of columns beyond the contract's that the changes carry.
            is_change = is_valid_change()
            summary = rows.groupBy(
                F.when(F.col("error_class").isNotNull(), "invalid").when(F.col("cdc_tombstone"), "tombstone")
                .otherwise("change").alias("kind")).agg(
                F.count(F.lit(1)).alias("n"),
                F.max(is_change & (F.col("cdc_op") == "r")).alias("reads"),
                F.array_distinct(F.flatten(F.collect_list(F.coalesce(F.map_keys("cdc_extra"), F.array().cast("array<string>"))))).alias("extra"),
            ).collect()
            counts = {r["kind"]: r["n"] for r in summary}
            changed = next((r for r in summary if r["kind"] == "change"), None)
            steps.done("summary")
            new_columns: list[str] = []
            if changed is not None:
                changes = valid_changes(rows)
                tables = {path: spark.read.format("delta").load(path).columns for path in (self.current, self.history)}
                # The columns the source table gained before this batch: the current table's beyond its own.
                known = added_columns(tables[self.current], self.contract)
                new_columns = sorted(set(changed["extra"]) - set(known))
                clashing = [n for n in new_columns if n in rows.columns or n in _TABLE_COLUMNS or n.startswith("_")]
                if clashing:
                    # Stops the query before anything of the batch is written: nothing is lost.
                    raise PipelineError(f"{self.topic}: the source table gained column(s) {', '.join(clashing)}, "
                                        "whose name(s) fp-cdc uses itself (or starting with '_', the online store's): "
                                        f"declare them in contract {self.contract.name!r} or rename them")
                extra = [*known, *new_columns]
                for path, have in tables.items():
                    # Per table, what it lacks: a replay after a crash between the two finds one done.
                    for name in (n for n in extra if n not in have):
                        spark.sql(f"ALTER TABLE delta.`{path}` ADD COLUMNS (`{name}` STRING)")
                if new_columns:
                    log.warning("%s: the source table gained column(s) %s: added to %s and %s as nullable strings",
                                self.topic, ", ".join(new_columns), self.current, self.history)
                expanded = with_extra_columns(changes, extra)
                if changed["reads"]:
                    # A snapshot: the reads of rows the history holds unchanged are no change.
                    held, _ = read_delta_version(spark, self.history, None, f"history of {self.topic}")
                    expanded = without_unchanged_snapshot_reads(expanded, held, self.contract, extra)
                expanded = expanded.persist(StorageLevel.MEMORY_AND_DISK)
                steps.done("schema")
            if counts.get("change"):
                write_delta_idempotent(bronze_change_rows(rows, self.contract), self.bronze, app_id, batch_id,
                                       ["commit_date"])
                steps.done("bronze")
            if counts.get("invalid"):
                write_delta_idempotent(dead_letter_rows(rows, self.contract), self.settings.storage.dead_letter_path,
                                       app_id, batch_id, ["failed_date"])
                steps.done("dead_letters")
            if changed is not None:
                with idempotent(spark, f"{app_id}:current", batch_id):
                    merge_current(spark, self.current, expanded, self.contract, extra)
                steps.done("merge_current")
                with idempotent(spark, f"{app_id}:history", batch_id):
                    merge_history(spark, self.history, expanded, self.contract, extra)
                steps.done("merge_history")
        finally:
            if expanded is not None:
                expanded.unpersist()
            rows.unpersist()
        result = CdcBatchResult(counts.get("change", 0), counts.get("tombstone", 0), counts.get("invalid", 0),
                                tuple(new_columns))
        log.info("%s batch %d: %d changes, %d tombstones, %d dead letters%s in %s", self.topic, batch_id,
                 result.changes, result.tombstones, result.dead_letters,
                 f", new columns {', '.join(new_columns)}" if new_columns else "", steps)
        with self._lock:
            self.results[batch_id] = result




class CdcOnlineWriter:
    """``foreachBatch`` handler of a change topic's online query: each key's last valid change
    of the batch to Redis (:mod:`pipelines.online.attributes`), the columns beyond the contract's
    (``cdc_extra``) as text. No Delta write: the tables query keeps those. Newer wins by LSN, so
    a batch replayed after a crash writes nothing twice, and the two queries need no order."""

    def __init__(self, topic: str, contract: Contract, settings: Settings):
        self.topic, self.contract = topic, contract
        self.store = AttributeStoreWriter(redis_client(settings.redis), settings.redis.namespace, contract.name)
        self.applied: dict[int, int] = {}
        self._lock = threading.Lock()

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        key = self.contract.key_field
        valid = valid_changes(batch)
        latest = last_change_per_key(valid, key).select(
            *self.contract.field_names, "cdc_extra", "cdc_op", "cdc_lsn",
            F.unix_micros("cdc_commit_time").alias("cdc_commit_micros"), "cdc_deleted")
        started = time.monotonic()
        result = self.store.write(
            AttributeChange(row[key], row["cdc_lsn"], row["cdc_commit_micros"], row["cdc_deleted"],
                            {**{c: row[c] for c in self.contract.field_names if c != key},
                             **{n: v for n, v in (row["cdc_extra"] or {}).items()
                                if n not in _TABLE_COLUMNS and not n.startswith("_")}},
                            read=row["cdc_op"] == "r")
            for row in latest.toLocalIterator())
        if result.applied or result.stale:
            log.info("%s online batch %d: %d keys written, %d not (Redis held newer, or a read the same), in %.2fs",
                     self.topic, batch_id,
                     result.applied, result.stale, time.monotonic() - started)
        with self._lock:
            self.applied[batch_id] = result.applied


def create_cdc_tables(spark: SparkSession, settings: Settings, topic: str) -> None:
    contract = settings.contract_for(topic)
    storage = settings.storage
    ensure_delta_table(spark, storage.cdc_path(topic, "current"), current_schema(contract))
    ensure_delta_table(spark, storage.cdc_path(topic, "history"), history_schema(contract))


def change_topics(settings: Settings, topics: Sequence[str] | None) -> list[str]:
    """``topics`` (default: each of ``cdc.tables``'), each checked to be a declared change topic."""
    topics = list(topics or [settings.cdc.topic_for(t) for t in settings.cdc.tables])
    for topic in topics:
        if topic not in settings.kafka.topics:
            raise ConfigError(f"--topics: {topic!r} is not declared under kafka.topics")
        contract = settings.contract_for(topic)
        if not contract.is_changes:
            raise ConfigError(f"--topics: {topic!r} has contract {contract.name!r}, not a change-event contract "
                              "(format: debezium)")
    return topics


REBUILD_SOURCES = ("history", "bronze")


def rebuild_tables(spark: SparkSession, settings: Settings, topic: str, source: str) -> dict[str, int]:
    """Rewrite a change topic's tables from what else holds its changes, for a lost or damaged
    table (fp-cdc stopped meanwhile): from ``history``, the current table; from ``bronze`` (every
    change since the connector's first snapshot), the current and the history tables. Each is
    replaced in one Delta commit (time travel keeps the old one). Returns rows per table."""
    if source not in REBUILD_SOURCES:
        raise ConfigError(f"--rebuild-from: {source!r} is not one of {', '.join(REBUILD_SOURCES)}")
    contract = settings.contract_for(topic)
    storage = settings.storage
    current, history = storage.cdc_path(topic, "current"), storage.cdc_path(topic, "history")
    create_cdc_tables(spark, settings, topic)
    if source == "history":
        rows = spark.read.format("delta").load(history)
        extra = added_columns(rows.columns, contract)
        tables = {current: current_from_history(rows, contract, extra)}
    else:
        bronze = spark.read.format("delta").load(storage.bronze_path(topic))
        seen = {r[0] for r in bronze.select(F.explode(F.map_keys("cdc_extra"))).distinct().collect()}
        kept = added_columns(spark.read.format("delta").load(current).columns, contract)
        extra = [*kept, *sorted(seen - set(kept) - _TABLE_COLUMNS)]
        # As fp-cdc does: a change is one row, by key and LSN; an unchanged snapshot read, none.
        changes = without_unchanged_snapshot_reads(
            with_extra_columns(bronze, extra).dropDuplicates([contract.key_field, "cdc_lsn"]), None, contract, extra)
        tables = {current: current_from_changes(changes, contract, extra),
                  history: history_rows(changes, contract, extra)}
    counts = {}
    for path, rows in tables.items():
        rows.write.format("delta").mode("overwrite").option("mergeSchema", "true").save(path)
        counts[path] = spark.read.format("delta").load(path).count()
        log.info("%s: rebuilt from %s: %d rows", path, source, counts[path])
    return counts


def start_cdc(spark: SparkSession, settings: Settings, topics: Sequence[str] | None = None,
              available_now: bool = False) -> tuple[list[StreamingQuery], BatchGate]:
    """Two queries per change-event topic (default: each of ``cdc.tables``'), each with its own
    checkpoint: the tables query (:class:`CdcBatchWriter`, every ``cdc.trigger_interval``) and the
    online query (:class:`CdcOnlineWriter`, every ``cdc.online_trigger_interval``), so that Redis
    does not wait for the tables' ``MERGE``\\ s."""
    rules = ValidationRules.of(settings.ingest)
    gate = BatchGate()
    queries = []
    for topic in change_topics(settings, topics):
        contract = settings.contract_for(topic)
        create_cdc_tables(spark, settings, topic)
        handlers = {"cdc": (CdcBatchWriter(topic, contract, settings), settings.cdc.trigger_interval),
                    "cdc_online": (CdcOnlineWriter(topic, contract, settings), settings.cdc.online_trigger_interval)}
        for name, (handler, interval) in handlers.items():
            records = read_kafka_stream(spark, settings.kafka, topic, settings.ingest, read_committed=True)
            checkpoint = checkpoint_location(spark, settings.storage.checkpoint_path(name, topic))
            writer = (change_rows(records, contract, rules).writeStream.queryName(f"{name}_{topic}")
                      .foreachBatch(gate.wrap(handler)).option("checkpointLocation", checkpoint))
            queries.append(with_trigger(writer, available_now, interval).start())
        log.info("cdc %s -> %s, %s; Redis %s:cdc.%s:*", topic, handlers["cdc"][0].current, handlers["cdc"][0].history,
                 settings.redis.namespace, contract.name)
    return queries, gate


def run_cdc(spark: SparkSession, settings: Settings, topics: Sequence[str] | None = None,
            available_now: bool = False, timeout: float | None = None) -> int:
    """Run the CDC queries until they end (``available_now``), ``timeout`` seconds pass, or a
    signal asks for a graceful stop. Returns 0."""
    queries, gate = start_cdc(spark, settings, topics, available_now)
    run_queries(queries, timeout, gate=gate)
    return 0
