"""Feature tables and the online store, fed from ``foreachBatch``: the sink side of feature views.

Each view has a Delta feature table (``<storage.root>/features/<view>``, partitioned by
``event_date``: the UTC date of the row's event time) whose rows carry the entity, the
event/window/session times, the feature values and ``computed_at`` (the batch time). Redis
holds, per entity, the row with the latest event time: for trailing views the value as of the
entity's latest event, for sliding views the latest closed window (event time = window end),
for session views the latest closed session (event time = session end).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pandas as pd
import redis

from pyspark import StorageLevel
from pyspark.sql import DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from pipelines.config import RedisSettings, Settings
from pipelines.monitoring import FEATURE_METRICS_SCHEMA, FeatureReporter, ProgressListener
from pipelines.online import OnlineStoreWriter, read_online, redis_client
from pipelines.runner import run_queries, with_trigger
from pipelines.sinks import ensure_delta_table, streaming_query_id, write_delta_idempotent
from pipelines.views import FeatureView

log = logging.getLogger(__name__)

#: The column that orders a view's rows in time (and that Redis compares on).
EVENT_TIME_COLUMN = {"trailing": None, "sliding": "window_end", "session": "session_end"}


def event_time_column(view: FeatureView) -> str:
    return EVENT_TIME_COLUMN[view.kind] or view.event_time


def feature_names(view: FeatureView) -> list[str]:
    """Every feature column the view's transform outputs (what Redis stores)."""
    names = [name for name, *_ in view.outputs()]
    if view.kind == "session":
        names = ["event_count", "duration_seconds", *names]
        names += [f"count_{by.column}_{value}" for by in view.count_by for value in by.values]
    return names


def feature_table_rows(features: DataFrame, view: FeatureView) -> DataFrame:
    """The view's transform output + ``computed_at`` and ``event_date`` (partition column)."""
    return features.withColumn("computed_at", F.current_timestamp()).withColumn(
        "event_date", F.to_date(F.col(event_time_column(view)))
    )


def latest_per_entity(features: DataFrame, view: FeatureView) -> DataFrame:
    """One row per entity: the one with the latest event time (ties: same time, same values
    for trailing views; the greatest start for overlapping windows)."""
    time_column = event_time_column(view)
    order = [F.col(time_column).desc()]
    if view.kind == "sliding":
        order.append(F.col("window_start").desc())
    newest = Window.partitionBy(view.entity).orderBy(*order)
    return features.withColumn("_rank", F.row_number().over(newest)).filter("_rank = 1").drop("_rank")


@functools.lru_cache(maxsize=8)
def _shared_client(settings: RedisSettings) -> redis.Redis:
    """One client (one connection pool) per Redis settings: serving reuses its connections."""
    return redis_client(settings)


def get_online_features(settings: Settings, view: str, entity_ids: Sequence[Any], as_pandas: bool = False,
                        client: redis.Redis | None = None) -> list[dict[str, Any]] | pd.DataFrame:
    """The online values of ``view`` for ``entity_ids``: one row per requested entity, in order,
    with ``entity``, every feature, ``event_time`` (UTC) and ``age_seconds`` (now - event time).

    A missing or expired entity, and a feature stored as null, come back as None (NaN/NaT in
    pandas): never an error, never a default. An undeclared view raises ``KeyError``. Calls
    share one connection pool per Redis settings (or pass ``client``).
    """
    if view not in settings.views:
        raise KeyError(f"view {view!r} is not declared in conf/features ({', '.join(settings.views)})")
    if isinstance(entity_ids, (str, bytes)):
        raise TypeError("entity_ids: a sequence of ids, not one string")
    declared = settings.views[view]
    names = feature_names(declared)
    rows = read_online(client or _shared_client(settings.redis), settings.redis.namespace, view, names,
                       list(entity_ids))
    if not as_pandas:
        return rows
    return pd.DataFrame(rows, columns=["entity", *names, "event_time", "age_seconds"])


@dataclass(frozen=True)
class OnlineResult:
    written: int
    stale: int
    #: The latest event time (aware, UTC) among the rows Redis accepted (None: nothing accepted).
    newest_event_time: datetime | None


def write_online(features: DataFrame, view: FeatureView, store: RedisSettings, version: int,
                 ttl_ms_column: str | None = None) -> OnlineResult:
    """Write each entity's latest row of ``features`` to Redis from the executors.

    Each partition sends its own latest row per entity, with no shuffle to find the global
    one: the newer-wins compare-and-set makes the newest row win whatever the order of the
    writes. Trailing rows come partitioned by entity; sliding and session rows by (entity,
    window), so an entity with several closed windows in one batch costs one write per
    partition holding them, the older ones counted as stale. Rows without an entity cannot
    have a key: they stay in the feature table and are counted and logged, never written.
    ``ttl_ms_column``: a column holding each row's TTL in ms (default: the view's TTL).
    """
    entity, time_column, names = view.entity, event_time_column(view), feature_names(view)
    ttl: timedelta = view.online.ttl
    tiebreak = "window_start" if view.kind == "sliding" else time_column

    def write_partition(rows: Iterator[Row]) -> Iterator[tuple[int, int, int | None, int]]:
        latest: dict[Any, dict[str, Any]] = {}
        without_entity = 0
        for row in rows:
            values = row.asDict()
            if values[entity] is None:
                without_entity += 1
                continue
            held = latest.get(values[entity])
            if held is None or (values[time_column], values[tiebreak]) > (held[time_column], held[tiebreak]):
                latest[values[entity]] = values
        if latest:
            writer = OnlineStoreWriter(redis_client(store), store.namespace, view.name, ttl)
            result = writer.write(latest.values(), entity, time_column, names, version, ttl_ms_column)
            yield result.written, result.stale, result.newest_written_micros, without_entity
        elif without_entity:
            yield 0, 0, None, without_entity

    parts = features.rdd.mapPartitions(write_partition).collect()
    without_entity = sum(p[3] for p in parts)
    if without_entity:
        log.warning("view %s: %d feature rows without %s kept in the table, not written to Redis",
                    view.name, without_entity, entity)
    times = [p[2] for p in parts if p[2] is not None]
    newest = datetime.fromtimestamp(0, timezone.utc) + timedelta(microseconds=max(times)) if times else None
    return OnlineResult(sum(p[0] for p in parts), sum(p[1] for p in parts), newest)


@dataclass(frozen=True)
class FeatureBatchResult:
    rows: int
    online: OnlineResult | None


@dataclass
class FeatureBatchWriter:
    """``foreachBatch`` handler of one view: Delta feature table, then Redis (both idempotent)."""

    view: FeatureView
    settings: Settings
    #: Redis version of the stream's writes; restatements (backfills) write higher ones.
    version: int = 0
    results: dict[int, FeatureBatchResult] = field(default_factory=dict)

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        self.write_batch(batch, batch_id, f"features:{self.view.name}:{streaming_query_id(batch.sparkSession)}")

    def write_batch(self, batch: DataFrame, batch_id: int, app_id: str) -> FeatureBatchResult:
        rows = feature_table_rows(batch, self.view).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            count = rows.count()
            online = None
            if count:
                write_delta_idempotent(rows, self.settings.storage.feature_path(self.view.name), app_id, batch_id,
                                       ["event_date"])
                if self.view.online.enabled:
                    online = write_online(rows, self.view, self.settings.redis, self.version)
        finally:
            rows.unpersist()
        result = FeatureBatchResult(count, online)
        self.results[batch_id] = result
        return result


def source_topic(settings: Settings, view: FeatureView) -> str:
    """The ingested topic whose contract is the view's source."""
    topics = [t for t in settings.ingest.topics if settings.kafka.topics[t].contract == view.source.contract]
    if view.source.contract is None or len(topics) != 1:
        raise ValueError(f"view {view.name!r}: its source must be the contract of exactly one ingested topic")
    return topics[0]


def bronze_source(spark: SparkSession, settings: Settings, view: FeatureView) -> DataFrame:
    """The view's events as a stream of its topic's bronze Delta table."""
    return (
        spark.readStream.format("delta")
        .option("maxFilesPerTrigger", str(settings.features.max_files_per_trigger))
        .load(settings.storage.bronze_path(source_topic(settings, view)))
    )


def feature_stream(spark: SparkSession, settings: Settings, view: FeatureView) -> DataFrame:
    """The streaming feature rows of ``view``, from its bronze table (README "Where the feature
    streams read" has the measurement behind reading bronze rather than Kafka)."""
    from pipelines.aggregations import view_features
    from pipelines.trailing_stream import trailing_features_stream

    source = bronze_source(spark, settings, view)
    return trailing_features_stream(source, view) if view.kind == "trailing" else view_features(source, view)


def start_features(spark: SparkSession, settings: Settings, views: list[FeatureView],
                   available_now: bool = False) -> tuple[list[StreamingQuery], ProgressListener]:
    """One streaming query per view (checkpoint ``_checkpoints/features/<view>``), writing its
    feature table and Redis in ``foreachBatch``; a listener logs each batch and appends it to
    ``ops/feature_metrics``."""
    ensure_delta_table(spark, settings.storage.feature_metrics_path, FEATURE_METRICS_SCHEMA)
    listener = ProgressListener(spark)
    spark.streams.addListener(listener)
    queries = []
    for view in views:
        name = f"features_{view.name}"
        handler = FeatureBatchWriter(view, settings)
        listener.register(name, FeatureReporter(view.name, handler, settings.storage.feature_metrics_path))
        writer = (
            feature_stream(spark, settings, view).writeStream.queryName(name)
            .foreachBatch(handler)
            .option("checkpointLocation", settings.storage.checkpoint_path("features", view.name))
        )
        queries.append(with_trigger(writer, available_now, settings.features.trigger_interval).start())
        log.info("features %s (%s) -> %s", view.name, view.kind, settings.storage.feature_path(view.name))
    return queries, listener


def run_features(spark: SparkSession, settings: Settings, views: list[FeatureView], available_now: bool = False,
                 timeout: float | None = None) -> int:
    """Run the views' queries until they end (``available_now``), ``timeout`` or SIGTERM."""
    queries, listener = start_features(spark, settings, views, available_now)
    try:
        run_queries(queries, timeout)
        listener.drain(queries, timeout=30)
    finally:
        spark.streams.removeListener(listener)
    return 0
