"""Where a feature value is written: each view's Delta feature table and the Redis online store,
from a ``foreachBatch`` handler (the stream) or a batch job (backfills, rehydrate).

Each view has a Delta feature table (``<storage.root>/features/<view>``, partitioned by
``event_date``: the UTC date of the row's event time) whose rows carry the entity, the
event/window/session times, the feature values and ``computed_at`` (the batch time). Redis
holds, per entity, the row with the latest event time: for trailing views the value as of the
entity's latest event, for sliding views the latest closed window (event time = window end),
for session views the latest closed session (event time = session end).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, Row, Window
from pyspark.sql import functions as F

from pipelines.core.delta import streaming_query_id, write_delta_idempotent
from pipelines.core.settings import RedisSettings, Settings
from pipelines.core.times import from_epoch_micros
from pipelines.core.view_spec import FeatureView, event_time_column, feature_names
from pipelines.online.store import OnlineStoreWriter, redis_client

log = logging.getLogger(__name__)


def feature_table_rows(features: DataFrame, view: FeatureView) -> DataFrame:
    """The view's transform output + ``computed_at`` (unless it has one: the stream stamps it with
    the micro-batch's recorded time, so a replayed batch carries the same) and ``event_date``
    (the partition column)."""
    if "computed_at" not in features.columns:
        features = features.withColumn("computed_at", F.current_timestamp())
    return features.withColumn("event_date", F.to_date(F.col(event_time_column(view))))


def latest_per_entity(features: DataFrame, view: FeatureView) -> DataFrame:
    """One row per entity: the one with the latest event time; among overlapping windows the
    greatest start; among rows of one event (a trailing row and its corrections) the latest
    ``computed_at`` when the rows have one (feature-table rows do)."""
    time_column = event_time_column(view)
    order = [F.col(time_column).desc()]
    if view.kind == "sliding":
        order.append(F.col("window_start").desc())
    if "computed_at" in features.columns:
        order.append(F.col("computed_at").desc())
    newest = Window.partitionBy(view.entity).orderBy(*order)
    return features.withColumn("_rank", F.row_number().over(newest)).filter("_rank = 1").drop("_rank")


@dataclass(frozen=True)
class OnlineResult:
    written: int
    stale: int
    #: The latest event time (aware, UTC) among the rows Redis accepted (None: nothing accepted).
    newest_event_time: datetime | None


def write_online(features: DataFrame, view: FeatureView, store: RedisSettings,
                 ttl_ms_column: str | None = None) -> OnlineResult:
    """Write each entity's latest row of ``features`` (feature-table rows, with ``computed_at``)
    to Redis from the executors. A row's Redis version is its ``computed_at``: for one event
    time, a later computation (a stream correction, a backfill, the late recompute) replaces an
    earlier one, and an earlier one never replaces a later one, whoever writes last.

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

    def newness(values: dict[str, Any]) -> tuple:
        return values[time_column], values[tiebreak], values["computed_at"]

    def write_partition(rows: Iterator[Row]) -> Iterator[tuple[int, int, int | None, int]]:
        latest: dict[Any, dict[str, Any]] = {}
        without_entity = 0
        for row in rows:
            values = row.asDict()
            if values[entity] is None:
                without_entity += 1
                continue
            held = latest.get(values[entity])
            if held is None or newness(values) > newness(held):
                latest[values[entity]] = values
        if latest:
            writer = OnlineStoreWriter(redis_client(store), store.namespace, view.name, ttl)
            result = writer.write(latest.values(), entity, time_column, names, "computed_at", ttl_ms_column)
            yield result.written, result.stale, result.newest_written_micros, without_entity
        elif without_entity:
            yield 0, 0, None, without_entity

    parts = features.rdd.mapPartitions(write_partition).collect()
    without_entity = sum(p[3] for p in parts)
    if without_entity:
        log.warning("view %s: %d feature rows without %s kept in the table, not written to Redis",
                    view.name, without_entity, entity)
    times = [p[2] for p in parts if p[2] is not None]
    newest = from_epoch_micros(max(times)) if times else None
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
                    online = write_online(rows, self.view, self.settings.redis)
        finally:
            rows.unpersist()
        result = FeatureBatchResult(count, online)
        self.results[batch_id] = result
        return result
