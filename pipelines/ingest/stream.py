"""The bronze ingest: one streaming query per topic, Kafka -> validate -> dedupe -> bronze / DLQ.

Each query has its own checkpoint (``<storage.root>/_checkpoints/ingest/<topic>``) and its own
``foreachBatch`` handler (:class:`pipelines.ingest.sinks.IngestBatchWriter`). The transforms are
those of :mod:`pipelines.ingest.bronze`, the same functions a batch replay uses.

Avro topics (contract ``format: avro``) are decoded with every version of their subject as
writer schemas, fetched when the query starts (the contract's own schema must be one of them).
A record framed with a version registered later stops the query with a marked failure; the
ingest restarts it from its checkpoint with the new version, so the batch is decoded, exactly
once, by the restarted query (:mod:`pipelines.ingest.avro_records`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming import StreamingQuery

from pipelines.contracts.avro import WriterSchema
from pipelines.contracts.registry import SchemaRegistry, avro_topics, writer_schemas
from pipelines.contracts.validation import ValidationRules
from pipelines.core.checkpoints import checkpoint_location
from pipelines.core.contract_spec import Contract
from pipelines.core.delta import ensure_delta_table
from pipelines.core.progress import ProgressListener
from pipelines.core.runner import BatchGate, run_queries, with_trigger
from pipelines.core.settings import Settings
from pipelines.core.times import format_duration
from pipelines.ingest.avro_records import NEW_WRITER_SCHEMA_MARKER
from pipelines.ingest.bronze import check_records, drop_duplicate_events, table_schemas
from pipelines.ingest.metrics import METRICS_SCHEMA, IngestReporter
from pipelines.ingest.sinks import IngestBatchWriter
from pipelines.ingest.sources import read_kafka_stream

log = logging.getLogger(__name__)

#: A query that keeps meeting writer schemas it cannot plan for (a registry answering
#: inconsistently) fails after this many restarts instead of looping.
MAX_SCHEMA_RESTARTS = 5


def bronze_stream(records: DataFrame, contract: Contract, rules: ValidationRules,
                  writers: Sequence[WriterSchema] = ()) -> DataFrame:
    """Kafka records -> validated (JSON) or decoded (Avro, with the subject's ``writers``)
    records with repeated deliveries removed (valid and invalid rows together; the batch
    handler splits them)."""
    return drop_duplicate_events(check_records(records, contract, rules, writers), contract, rules)


@dataclass
class IngestRun:
    """The running queries of one ingest job and their progress listener; ``restart`` starts a
    query again after it stopped for a new writer schema (None for any other failure)."""

    queries: list[StreamingQuery]
    listener: ProgressListener
    restart: Callable[[StreamingQuery], StreamingQuery | None] = lambda query: None
    gate: BatchGate = field(default_factory=BatchGate)


def create_tables(spark: SparkSession, settings: Settings, topics: Sequence[str]) -> None:
    """Create the bronze, dead-letter and metrics tables that do not exist yet."""
    rules = ValidationRules.of(settings.ingest)
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
    """Start one ingest query per topic (default: ``ingest.topics``), each writing through the
    run's :class:`BatchGate` (a stop request holds its next batch before it writes).

    ``available_now`` processes what is in the topics when the query starts, in batches of at
    most ``max_offsets_per_trigger``, then stops; otherwise a processing-time trigger of
    ``trigger_interval`` runs until stopped.
    """
    topics = list(topics or settings.ingest.topics)
    rules = ValidationRules.of(settings.ingest)
    unknown = [t for t in topics if t not in settings.kafka.topics]
    if unknown:
        raise ValueError(f"topics not declared under kafka.topics: {', '.join(unknown)}")
    avro = avro_topics(settings, topics)
    registry = SchemaRegistry(settings.schema_registry) if avro else None
    # Fail before anything starts if a contract is not registered.
    first_writers = {topic: writer_schemas(registry, topic, settings.contract_for(topic)) for topic in avro}
    create_tables(spark, settings, topics)
    # A query stopped for a new writer schema is restarted below: not an error to log as one.
    listener = ProgressListener(spark, restart_markers=(NEW_WRITER_SCHEMA_MARKER,))
    metrics_table = settings.storage.stream_metrics_path if settings.ingest.metrics_enabled else None
    spark.streams.addListener(listener)
    topic_of: dict[str, str] = {}
    restarts: dict[str, int] = {}
    gate = BatchGate()

    def start(topic: str) -> StreamingQuery:
        contract = settings.contract_for(topic)
        writers = first_writers.pop(topic, None)  # fetched above for the first start, anew on a restart
        if writers is None:
            writers = writer_schemas(registry, topic, contract) if topic in avro else []
        handler = IngestBatchWriter(
            topic, contract, settings.kafka, settings.storage, settings.ingest.publish_dlq_topic,
            registry=registry,
        )
        name = f"ingest_{topic}"
        listener.register(name, IngestReporter(topic, handler, metrics_table))
        records = read_kafka_stream(spark, settings.kafka, topic, settings.ingest)
        writer = (
            bronze_stream(records, contract, rules, writers).writeStream.queryName(name)
            .foreachBatch(gate.wrap(handler))
            .option("checkpointLocation", checkpoint_location(spark, settings.storage.checkpoint_path("ingest", topic)))
        )
        query = with_trigger(writer, available_now, settings.ingest.trigger_interval).start()
        topic_of[query.id] = topic
        log.info(
            "ingesting %s -> %s (contract %s v%d, %s%s, trigger %s)", topic, settings.storage.bronze_path(topic),
            contract.name, contract.version, contract.format,
            f" writer schema ids {[w.schema_id for w in writers]}" if writers else "",
            "availableNow" if available_now else format_duration(settings.ingest.trigger_interval),
        )
        return query

    def restart(query: StreamingQuery) -> StreamingQuery | None:
        failure = query.exception()
        if failure is None or NEW_WRITER_SCHEMA_MARKER not in str(failure) or query.id not in topic_of:
            return None
        topic = topic_of.pop(query.id)
        restarts[topic] = restarts.get(topic, 0) + 1
        if restarts[topic] > MAX_SCHEMA_RESTARTS:
            log.error("%s: restarted %d times for new writer schemas; giving up", topic, MAX_SCHEMA_RESTARTS)
            return None
        log.info("%s: a new writer schema was registered; restarting its query to decode with it", topic)
        return start(topic)

    return IngestRun([start(topic) for topic in topics], listener, restart, gate)


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
        run_queries(run.queries, timeout, restart=run.restart, gate=run.gate)
        # Progress events reach the listener asynchronously: let it record the last batches.
        run.listener.drain(run.queries, timeout=30)
    finally:
        spark.streams.removeListener(run.listener)
    return 0
