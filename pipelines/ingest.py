"""The bronze ingest: one streaming query per topic, Kafka -> validate -> dedupe -> bronze / DLQ.

Each query has its own checkpoint (``<storage.root>/_checkpoints/ingest/<topic>``) and its own
``foreachBatch`` handler (:class:`pipelines.sinks.IngestBatchWriter`). The transforms are
those of :mod:`pipelines.bronze`, the same functions a batch replay uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming import StreamingQuery

from pipelines.bronze import drop_duplicate_events, table_schemas, validate_records
from pipelines.config import Settings, format_duration
from pipelines.contracts import Contract
from pipelines.monitoring import METRICS_SCHEMA, IngestReporter, ProgressListener
from pipelines.runner import run_queries, with_trigger
from pipelines.sinks import IngestBatchWriter, ensure_delta_table
from pipelines.sources import read_kafka_stream
from pipelines.validation import ValidationRules

log = logging.getLogger(__name__)


def validation_rules(settings: Settings) -> ValidationRules:
    return ValidationRules(
        max_value_bytes=settings.ingest.max_value_bytes,
        future_tolerance=settings.ingest.future_tolerance,
        max_event_age=settings.ingest.max_event_age,
    )


def bronze_stream(records: DataFrame, contract: Contract, rules: ValidationRules) -> DataFrame:
    """Kafka records -> validated records with repeated deliveries removed (valid and invalid
    rows together; the batch handler splits them)."""
    return drop_duplicate_events(validate_records(records, contract, rules), contract, rules)


@dataclass
class IngestRun:
    """The running queries of one ingest job and their progress listener."""

    queries: list[StreamingQuery]
    listener: ProgressListener


def create_tables(spark: SparkSession, settings: Settings, topics: Sequence[str]) -> None:
    """Create the bronze, dead-letter and metrics tables that do not exist yet."""
    rules = validation_rules(settings)
    for topic in topics:
        bronze, dead_letter = table_schemas(spark, settings.contract_for(topic), rules)
        ensure_delta_table(spark, settings.storage.bronze_path(topic), bronze, ["event_date"])
        ensure_delta_table(spark, settings.storage.dead_letter_path, dead_letter, ["failed_date"])
    if settings.ingest.metrics_enabled:
        ensure_delta_table(spark, settings.storage.stream_metrics_path, METRICS_SCHEMA)


def start_ingest(
    spark: SparkSession,
    settings: Settings,
    topics: Sequence[str] | None = None,
    available_now: bool = False,
) -> IngestRun:
    """Start one ingest query per topic (default: ``ingest.topics``).

    ``available_now`` processes what is in the topics when the query starts, in batches of at
    most ``max_offsets_per_trigger``, then stops; otherwise a processing-time trigger of
    ``trigger_interval`` runs until stopped.
    """
    topics = list(topics or settings.ingest.topics)
    rules = validation_rules(settings)
    unknown = [t for t in topics if t not in settings.kafka.topics]
    if unknown:
        raise ValueError(f"topics not declared under kafka.topics: {', '.join(unknown)}")
    create_tables(spark, settings, topics)
    listener = ProgressListener(spark)
    metrics_table = settings.storage.stream_metrics_path if settings.ingest.metrics_enabled else None
    spark.streams.addListener(listener)
    queries = []
    for topic in topics:
        contract = settings.contract_for(topic)
        handler = IngestBatchWriter(
            topic, contract, settings.kafka, settings.storage, settings.ingest.publish_dlq_topic
        )
        name = f"ingest_{topic}"
        listener.register(name, IngestReporter(topic, handler, metrics_table))
        stream = bronze_stream(read_kafka_stream(spark, settings.kafka, topic, settings.ingest), contract, rules)
        writer = (
            stream.writeStream.queryName(name)
            .foreachBatch(handler)
            .option("checkpointLocation", settings.storage.checkpoint_path("ingest", topic))
        )
        queries.append(with_trigger(writer, available_now, settings.ingest.trigger_interval).start())
        log.info(
            "ingesting %s -> %s (contract %s v%d, trigger %s)", topic, settings.storage.bronze_path(topic),
            contract.name, contract.version,
            "availableNow" if available_now else format_duration(settings.ingest.trigger_interval),
        )
    return IngestRun(queries, listener)


def run_ingest(
    spark: SparkSession,
    settings: Settings,
    topics: Sequence[str] | None = None,
    available_now: bool = False,
    timeout: float | None = None,
) -> int:
    """Run the ingest until its queries end (``available_now``), ``timeout`` seconds pass, or
    SIGTERM/SIGINT asks for a graceful stop (the current batch finishes). Returns 0."""
    run = start_ingest(spark, settings, topics, available_now)
    try:
        run_queries(run.queries, timeout)
        # Progress events reach the listener asynchronously: let it record the last batches.
        run.listener.drain(run.queries, timeout=30)
    finally:
        spark.streams.removeListener(run.listener)
    return 0
