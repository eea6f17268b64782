"""The feature views' streaming job: one query per view, from its topic's bronze table through the
view's transform (:mod:`pipelines.features.transforms`; trailing views keep per-entity state,
:mod:`pipelines.features.trailing_state`) into its feature table and Redis
(:class:`pipelines.features.sinks.FeatureBatchWriter`).
"""

from __future__ import annotations

import logging

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from pipelines.core.checkpoints import checkpoint_location
from pipelines.core.delta import ensure_delta_table
from pipelines.core.errors import SourceError
from pipelines.core.progress import ProgressListener
from pipelines.core.runner import BatchGate, run_queries, with_trigger
from pipelines.core.settings import Settings
from pipelines.core.view_spec import FeatureView
from pipelines.features.metrics import FEATURE_METRICS_SCHEMA, FeatureReporter
from pipelines.features.sinks import FeatureBatchWriter
from pipelines.features.trailing_state import trailing_features_stream
from pipelines.features.transforms import view_features

log = logging.getLogger(__name__)


def bronze_source(spark: SparkSession, settings: Settings, view: FeatureView) -> DataFrame:
    """The view's events as a stream of its topic's bronze Delta table."""
    return (
        spark.readStream.format("delta")
        .option("maxFilesPerTrigger", str(settings.features.max_files_per_trigger))
        .load(settings.storage.bronze_path(settings.source_topic(view)))
    )


def feature_stream(spark: SparkSession, settings: Settings, view: FeatureView) -> DataFrame:
    """The streaming feature rows of ``view``, from its bronze table (README "Where the feature
    streams read" has the measurement behind reading bronze rather than Kafka)."""
    source = bronze_source(spark, settings, view)
    rows = trailing_features_stream(source, view) if view.kind == "trailing" else view_features(source, view)
    # Inside the streaming plan current_timestamp() is the micro-batch's time, recorded in the
    # checkpoint: a batch replayed after a crash gets the same computed_at (its Redis version).
    return rows.withColumn("computed_at", F.current_timestamp())


def start_features(spark: SparkSession, settings: Settings, views: list[FeatureView],
                   available_now: bool = False, gate: BatchGate | None = None,
                   ) -> tuple[list[StreamingQuery], ProgressListener]:
    """One streaming query per view (checkpoint ``_checkpoints/features/<view>``), writing its
    feature table and Redis in ``foreachBatch``; a listener logs each batch and appends it to
    ``ops/feature_metrics``. With a ``gate``, the handlers run through it (a stop request holds
    each query's next batch before it writes)."""
    for view in views:
        bronze = settings.storage.bronze_path(settings.source_topic(view))
        if not DeltaTable.isDeltaTable(spark, bronze):
            raise SourceError(f"view {view.name}: no bronze table at {bronze} yet; fp-ingest creates it when it "
                              f"starts on topic {settings.source_topic(view)!r}: start it first")
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
            .foreachBatch(gate.wrap(handler) if gate else handler)
            .option("checkpointLocation", checkpoint_location(spark, settings.storage.checkpoint_path("features", view.name)))
        )
        queries.append(with_trigger(writer, available_now, settings.features.trigger_interval).start())
        log.info("features %s (%s) -> %s", view.name, view.kind, settings.storage.feature_path(view.name))
    return queries, listener


def run_features(spark: SparkSession, settings: Settings, views: list[FeatureView], available_now: bool = False,
                 timeout: float | None = None) -> int:
    """Run the views' queries until they end (``available_now``), ``timeout`` or SIGTERM/SIGINT
    (which stop them between batches)."""
    gate = BatchGate()
    queries, listener = start_features(spark, settings, views, available_now, gate)
    try:
        run_queries(queries, timeout, gate=gate)
        listener.drain(queries, timeout=30)
    finally:
        spark.streams.removeListener(listener)
    return 0
