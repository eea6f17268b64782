"""Rebuild the Redis online store from the Delta feature tables: for a new Redis, or after it
lost its data.

For each view, every entity's latest row (as :func:`pipelines.features.sinks.latest_per_entity`
picks it, the same row the stream leaves in Redis) is written with the same key layout and
newer-wins compare-and-set as the stream, with its ``computed_at`` as its version (as the stream
wrote it), and with what is left of its TTL: the stream set the key to expire ``online.ttl``
after it wrote the row (``computed_at``), so a rehydrated key expires at that same moment
(give or take the seconds between the job's start and its Redis writes), and an entity whose key would already have expired is not restored (counted, not written).
Running it again changes nothing: every row is then equal to the stored one (same event time
and version), which the compare-and-set leaves alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core.delta import current_version
from pipelines.core.errors import SourceError
from pipelines.core.settings import Settings
from pipelines.core.times import epoch_micros, micros
from pipelines.core.view_spec import FeatureView
from pipelines.features.sinks import latest_per_entity, write_online

log = logging.getLogger(__name__)

_TTL_MS = "_ttl_ms"


@dataclass(frozen=True)
class RehydrateOutcome:
    view: str
    table_version: int
    entities: int
    expired: int
    written: int
    #: Entities Redis already held at this event time and version, or a newer one.
    unchanged: int
    seconds: float


def rehydrate(spark: SparkSession, settings: Settings, views: Sequence[FeatureView],
              now: datetime | None = None) -> list[RehydrateOutcome]:
    """Write each view's latest row per entity from its feature table to Redis (see module)."""
    outcomes, missing = [], []
    for view in views:
        if not view.online.enabled:
            log.info("%s: online store disabled for this view, skipped", view.name)
            continue
        path = settings.storage.feature_path(view.name)
        if not DeltaTable.isDeltaTable(spark, path):
            # The other views are still restored; the run fails at the end, naming this one.
            log.error("%s: no feature table at %s", view.name, path)
            missing.append(view.name)
            continue
        started = time.monotonic()
        version = current_version(spark, path)
        table = spark.read.format("delta").option("versionAsOf", version).load(path)
        moment = now or datetime.now(timezone.utc)
        ttl_ms = micros(view.online.ttl) // 1000
        latest = latest_per_entity(table.filter(F.col(view.entity).isNotNull()), view).withColumn(
            _TTL_MS, F.unix_millis("computed_at") + F.lit(ttl_ms) - F.lit(epoch_micros(moment) // 1000)
        ).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            counts = latest.agg(F.count(F.lit(1)).alias("n"), F.sum(F.when(F.col(_TTL_MS) <= 0, 1).otherwise(0))
                                .alias("expired")).collect()[0]
            entities, expired = counts["n"], counts["expired"] or 0
            result = write_online(latest.filter(F.col(_TTL_MS) > 0), view, settings.redis, _TTL_MS)
        finally:
            latest.unpersist()
        outcome = RehydrateOutcome(view.name, version, entities, expired, result.written,
                                   entities - expired - result.written, time.monotonic() - started)
        log.info("%s: %d entities at table version %d: %d written to Redis, %d unchanged (already there or newer), "
                 "%d expired (TTL %s passed since written) in %.1fs", view.name, entities, version, result.written,
                 outcome.unchanged, expired, view.online.ttl, outcome.seconds)
        outcomes.append(outcome)
    if missing:
        raise SourceError(f"no feature table for {', '.join(missing)} (run the features job or a backfill first); "
                          f"{len(outcomes)} other views restored")
    return outcomes
