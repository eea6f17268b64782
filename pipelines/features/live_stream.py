"""The live path (``fp-live``): each valid event's effect on the online views in Redis within a
second, beside the durable path (bronze -> feature streams -> feature tables + Redis), which
stays the source of truth and restates Redis wherever it computes a row.

Two stages per source topic, in one process:

1. **Validation, in the JVM, continuously.** A Spark query in real-time mode (Spark 4.2,
   ``trigger(realTime=...)``: long-running tasks that process each record as it arrives, no
   micro-batch planning per record) reads the topic, validates every record with the ingest's
   own checks (:func:`pipelines.ingest.bronze.check_records`, pure Spark SQL: the same records
   are rejected; dead letters stay the ingest's job; Avro topics decoded with every version of
   their subject, :class:`ValidationStage`) and writes each valid event, every field of its
   contract as one JSON object, to the events topic ``{topic}{live.events_topic_suffix}``, same key,
   same partition. At least once: its offsets are checkpointed every
   ``live.checkpoint_interval``, and a restart validates what followed again.
2. **Redis, exactly once in effect.** A consumer in the driver
   (:class:`pipelines.online.live_consumer.LiveConsumer`) applies the events topic in small
   batches to one object per view, each updating its state and features inside Redis with
   atomic scripts, idempotently by event id:

   * trailing views: :class:`pipelines.online.live.LiveTrailingView`, the entity's features as
     of its latest event, written in the batch that reads it;
   * sliding and session views: :class:`pipelines.online.live_windows.LiveWindowView`, windows
     kept open until the watermark (latest event time read - ``allowed_lateness``) passes
     their end, then written in that same batch.

Why not one micro-batch query with ``foreachBatch``: on this machine each micro-batch costs
about a second of planning, Python hand-over and commits before any Redis work, so events
waited seconds in a busy machine (BENCHMARKS.md, "Event-to-Redis latency"). Real-time mode has
no ``foreachBatch`` and refuses Python in the query; its Kafka sink is JVM-only, so the Python
work moved behind a topic, where it costs per event, not per batch.

``--available-now`` (tests, catch-up): the validation stage runs as ``availableNow``
micro-batches instead, then the consumer applies the events topic up to its end and stops.

Each consumer also measures, per event, event time -> Redis write and Kafka append (of the
source record) -> Redis write, and per closed window, watermark passing its end -> Redis
write; every ``live.report_interval`` it logs one progress line and appends one row to
``ops/live_metrics`` (from a background thread, so a Delta commit never delays an event).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import re
import signal
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery
from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType, TimestampType

from pipelines.contracts.avro import WriterSchema
from pipelines.contracts.registry import SchemaRegistry, avro_topics, writer_schemas
from pipelines.contracts.spark_schema import spark_type
from pipelines.contracts.validation import ValidationRules
from pipelines.core.checkpoints import checkpoint_location
from pipelines.core.contract_spec import Contract
from pipelines.core.delta import ensure_delta_table
from pipelines.core.errors import ConfigError
from pipelines.core.kafka_admin import TopicSpec, ensure_topics, topic_offsets
from pipelines.core.progress import ProgressListener
from pipelines.core.settings import Settings, TopicSettings
from pipelines.core.view_spec import FeatureView
from pipelines.ingest.avro_records import UNRESOLVED
from pipelines.ingest.bronze import check_records
from pipelines.ingest.records import processing_time
from pipelines.ingest.sources import read_kafka_stream
from pipelines.ingest.stream import MAX_SCHEMA_RESTARTS
from pipelines.online.live_consumer import BatchLog, LiveConsumer, LiveViews
from pipelines.online.live_metrics import LiveMetrics
from pipelines.online.store import redis_client

log = logging.getLogger(__name__)

#: Stops a validation query at a record whose Avro schema id it cannot judge (followed by the id).
UNRESOLVED_ID_MARKER = "LIVE_UNRESOLVED_SCHEMA_ID"

LIVE_METRICS_SCHEMA = StructType([
    StructField("query_name", StringType(), False),
    StructField("interval_start", TimestampType(), False),
    StructField("interval_end", TimestampType(), False),
    StructField("batches", LongType(), False),
    StructField("events", LongType(), False),
    StructField("events_per_second", DoubleType(), False),
    StructField("event_to_redis_p50", DoubleType(), True),
    StructField("event_to_redis_p95", DoubleType(), True),
    StructField("event_to_redis_p99", DoubleType(), True),
    StructField("append_to_redis_p50", DoubleType(), True),
    StructField("append_to_redis_p95", DoubleType(), True),
    StructField("append_to_redis_p99", DoubleType(), True),
    # Of that, the validation stage's: source append -> valid event in the events topic.
    StructField("append_to_validated_p50", DoubleType(), True),
    StructField("append_to_validated_p95", DoubleType(), True),
    StructField("append_to_validated_p99", DoubleType(), True),
    StructField("events_added", LongType(), False),
    StructField("features_written", LongType(), False),
    # Sliding and session views: windows closed, events dropped behind the watermark, and the
    # time from the Kafka append of the first event that moved the watermark past a window's
    # end to the window's Redis write.
    StructField("windows_closed", LongType(), True),
    StructField("events_late", LongType(), True),
    StructField("watermark_to_redis_p50", DoubleType(), True),
    StructField("watermark_to_redis_p95", DoubleType(), True),
    StructField("watermark_to_redis_p99", DoubleType(), True),
    StructField("recorded_at", TimestampType(), False),
])


def live_views(settings: Settings, views: Sequence[FeatureView]) -> dict[str, list[FeatureView]]:
    """The views among ``views`` served online (``online.enabled``), by the topic they are
    computed from. Raises ConfigError when there is none, or when a view's event time is not
    its contract's (the live path orders every view of a topic by the contract's event time)."""
    by_topic: dict[str, list[FeatureView]] = {}
    for view in views:
        if not view.online.enabled:
            continue
        topic = settings.source_topic(view)
        contract = settings.contract_for(topic)
        if view.event_time != contract.event_time_field:
            raise ConfigError(f"live: view {view.name} orders by {view.event_time!r}, contract {contract.name} by "
                              f"{contract.event_time_field!r}; the live path uses the contract's event time")
        by_topic.setdefault(topic, []).append(view)
    if not by_topic:
        raise ConfigError("live: no view with online.enabled among the views asked for")
    return by_topic


def live_events(records: DataFrame, contract: Contract, rules: ValidationRules,
                writers: Sequence[WriterSchema] = (), unknown_ids: Collection[int] = ()) -> DataFrame:
    """Kafka records -> one row per valid record: ``_partition`` and ``_key`` (the record's),
    ``_append_micros`` (Kafka timestamp, µs), ``_event_micros``, ``_event_id`` (the id as a
    string) and every other field of the contract (the views' columns, and what a scoring job
    feeds a model). Invalid records are left out (the ingest dead-letters them); duplicates are kept (Redis drops
    them by event id). The time checks compare with the clock when each record is validated.

    Avro topics are decoded with ``writers`` (the versions of the topic's subject) as the
    ingest decodes them. A record whose schema id is none of them cannot be judged inside the
    query (the ingest asks the registry in its batch handler): unless the id is among
    ``unknown_ids`` (ids the registry was asked about and does not hold under the subject:
    dead letters for the ingest, left out here), the query fails with
    :data:`UNRESOLVED_ID_MARKER` and the id, and :func:`run_live` asks the registry and
    starts it again (:class:`ValidationStage`)."""
    checked = check_records(records, contract, rules, list(writers), batch_time=processing_time())
    columns = [f.name for f in contract.fields if f.name not in (contract.id_field, contract.event_time_field)]
    valid = F.col("error_class").isNull()
    if contract.format == "avro":
        schema_id = F.col("writer_schema_id")
        ask = (F.col("error_class") == UNRESOLVED) & ~schema_id.isin(sorted(unknown_ids) or [-1])
        # One CASE as the filter, so that the check cannot be skipped by reordering: a record
        # the query cannot judge stops it.
        valid = F.when(ask, F.raise_error(F.format_string(f"{UNRESOLVED_ID_MARKER} %d", schema_id))).otherwise(valid)
    return checked.filter(valid).select(
        F.col("kafka_partition").alias("_partition"),
        F.col("kafka_key").alias("_key"),
        F.unix_micros("kafka_timestamp").alias("_append_micros"),
        F.unix_micros(F.col(contract.event_time_field)).alias("_event_micros"),
        F.col(contract.id_field).cast("string").alias("_event_id"),
        *[F.col(c) for c in columns],
    )


def events_topic_rows(events: DataFrame) -> DataFrame:
    """:func:`live_events` rows -> Kafka sink rows for the events topic: the source record's
    key and partition, and as value a JSON object of the event's other columns (a null column
    is left out; the consumer reads it as null)."""
    fields = [c for c in events.columns if c not in ("_partition", "_key")]
    return events.select(F.col("_key").alias("key"), F.col("_partition").alias("partition"),
                         F.to_json(F.struct(*fields)).alias("value"))


class MetricsTableWriter(threading.Thread):
    """Appends queued metrics rows (``schema``'s) to an ops table (``ops/live_metrics`` by
    default) off the batch thread (best effort: a failed append is logged; the data path never
    waits for it).

    The first row is appended at once; after that, whatever has queued is appended together at
    most every ``every`` seconds, and what is left when ``stopping`` is set right away. A Delta
    append costs the driver's JVM about as much whether it carries one row or fifty (the log, the
    commit), and one a report interval (10 s) was a steady share of a core on this machine's two
    (BENCHMARKS.md "Streaming scoring"); the progress lines stay per interval."""

    def __init__(self, spark: SparkSession, path: str, rows: queue.Queue, schema: StructType = LIVE_METRICS_SCHEMA,
                 every: float = 60.0):
        super().__init__(name="metrics-table", daemon=True)
        self.spark, self.path, self.rows, self.schema, self.every = spark, path, rows, schema, every
        self.stopping = threading.Event()

    def run(self) -> None:
        last_append = -math.inf
        while not (self.stopping.is_set() and self.rows.empty()):
            try:
                pending = [self.rows.get(timeout=0.5)]
            except queue.Empty:
                continue
            self.stopping.wait(max(0.0, last_append + self.every - time.monotonic()))
            while True:
                try:
                    pending.append(self.rows.get_nowait())
                except queue.Empty:
                    break
            last_append = time.monotonic()
            try:
                self.spark.createDataFrame(pending, self.schema).write.format("delta").mode("append").save(self.path)
            except Exception as exc:  # noqa: BLE001 - metrics must never stop the live path
                log.warning("%d metrics rows not written to %s: %s", len(pending), self.path, exc)


#: Task slots beyond the real-time tasks': the live metrics rows' Delta appends run there. A
#: real-time task holds its slot for a whole batch (``live.checkpoint_interval``); without a spare
#: one, each append waited for the batch to end, and the appends queued by then went before the
#: next batch's tasks, a pause of seconds in validation at every checkpoint (BENCHMARKS.md).
SPARE_TASK_SLOTS = 1


def realtime_session_settings(master: str | None, partitions: int) -> dict[str, str]:
    """Session settings real-time mode needs: every task of its stage runs at once for the
    whole batch, one per Kafka partition, so a local master gets ``partitions`` threads plus
    :data:`SPARE_TASK_SLOTS` at least (threads, not cores: the tasks mostly wait on Kafka). A
    cluster must have the slots."""
    if master is None:
        return {}
    match = re.fullmatch(r"local(?:\[(\d+|\*)\])?", master)
    if match is None:
        return {}
    threads = match.group(1)
    slots = partitions + SPARE_TASK_SLOTS
    if threads is not None and threads != "*" and int(threads) >= slots:
        return {}
    return {"spark.master": f"local[{slots}]"}


def source_partitions(settings: Settings, topics: Sequence[str]) -> dict[str, int]:
    """Partitions of each source topic, as the broker has them."""
    props = settings.kafka.client_properties()
    return {topic: len(topic_offsets(props, topic)) for topic in topics}


def ensure_events_topics(settings: Settings, partitions: Mapping[str, int]) -> None:
    """Create each source topic's events topic when missing: same partitions, same replication."""
    ensure_topics(settings.kafka.client_properties(), [
        TopicSpec(settings.live.events_topic(topic), count, settings.kafka.topics[topic].replication_factor,
                  settings.kafka.topics[topic].min_insync_replicas)
        for topic, count in partitions.items()
    ])


def validation_query_name(topic: str) -> str:
    return f"live_validation_{topic}"


def start_validation(spark: SparkSession, settings: Settings, topic: str,
                     realtime: bool, writers: Sequence[WriterSchema] = (), unknown_ids: Collection[int] = ()) -> StreamingQuery:
    """The validation stage of ``topic`` (checkpoint ``_checkpoints/live_validation/<topic>``):
    real-time mode, or ``availableNow`` micro-batches of ``live.max_offsets_per_trigger``.
    ``writers`` and ``unknown_ids``: an Avro topic's, see :func:`live_events`."""
    contract = settings.contract_for(topic)
    reading = dataclasses.replace(settings.ingest, starting_offsets=settings.live.starting_offsets,
                                  max_offsets_per_trigger=settings.live.max_offsets_per_trigger)
    records = read_kafka_stream(spark, settings.kafka, topic, reading, bounded=not realtime)
    events = live_events(records, contract, ValidationRules.of(settings.ingest), writers, unknown_ids)
    writer = (events_topic_rows(events).writeStream.queryName(validation_query_name(topic)).format("kafka")
              .option("topic", settings.live.events_topic(topic))
              .option("checkpointLocation",
                      checkpoint_location(spark, settings.storage.checkpoint_path("live_validation", topic))))
    for key, value in settings.kafka.spark_producer_options().items():
        writer = writer.option(key, value)
    if realtime:
        seconds = max(1, int(settings.live.checkpoint_interval.total_seconds()))
        writer = writer.outputMode("update").trigger(realTime=f"{seconds} seconds")
    else:
        writer = writer.trigger(availableNow=True)
    return writer.start()


def unresolved_id(failure: BaseException | None) -> int | None:
    """The schema id a validation query stopped for (:data:`UNRESOLVED_ID_MARKER`), or None."""
    found = re.search(rf"{UNRESOLVED_ID_MARKER} (\d+)", str(failure or ""))
    return int(found.group(1)) if found else None


class ValidationStage:
    """The validation query of one topic, started again when it stops for a schema id it could
    not judge: the registry is asked about the id; registered under the topic's subject, the
    query restarts with the subject's versions as they are now (the ingest's rule: a new writer
    schema is decoded, never dead-lettered); otherwise (unknown, or another subject's) the id
    joins the ids the query leaves out, as the ingest dead-letters them. The restarted query
    resumes from its checkpoint: nothing is skipped. Raises after ``max_restarts`` restarts
    for new versions of the subject (a registry answering inconsistently)."""

    def __init__(self, spark: SparkSession, settings: Settings, topic: str,
                 realtime: bool, registry: SchemaRegistry | None, max_restarts: int = MAX_SCHEMA_RESTARTS):
        self.spark, self.settings, self.topic, self.realtime = spark, settings, topic, realtime
        self.contract = settings.contract_for(topic)
        self.registry = registry
        self.subject = TopicSettings.subject(topic)
        self.unknown_ids: set[int] = set()
        self.max_restarts = max_restarts
        self.schema_restarts = 0
        if self.contract.format == "avro" and registry is None:
            raise ValueError(f"live: Avro topic {topic} needs the schema registry")
        # Fetched before any query starts: an unregistered contract fails the job at once.
        self.writers = self._writers()
        self.query = self._start()

    def _writers(self) -> list[WriterSchema]:
        if self.contract.format != "avro":
            return []
        return writer_schemas(self.registry, self.topic, self.contract)

    def _start(self) -> StreamingQuery:
        if self.writers:
            log.info("live %s: decoding with writer schema ids %s%s", self.topic, [w.schema_id for w in self.writers],
                     f", leaving out ids {sorted(self.unknown_ids)}" if self.unknown_ids else "")
        return start_validation(self.spark, self.settings, self.topic, self.realtime, self.writers,
                                self.unknown_ids)

    def check(self) -> bool:
        """True while the query runs (or ran to its end without failing); restarts it when it
        stopped for an unresolved schema id; raises any other failure."""
        if self.query.isActive:
            return True
        failure = self.query.exception()
        schema_id = unresolved_id(failure)
        if schema_id is None or self.registry is None:
            if failure is not None:
                raise failure
            return False
        lookup = self.registry.lookup_id(schema_id)
        if lookup.version_in(self.subject) is not None:
            self.schema_restarts += 1
            if self.schema_restarts > self.max_restarts:
                raise RuntimeError(f"live {self.topic}: restarted {self.max_restarts} times for new writer schemas; "
                                   f"giving up (schema id {schema_id})") from failure
            log.info("live %s: schema id %d is a new version of %s: restarting the validation to decode it",
                     self.topic, schema_id, self.subject)
            self.writers = self._writers()
        else:
            known = (f"is registered under {', '.join(f'{s} v{v}' for s, v in lookup.versions)}, not {self.subject}"
                     if lookup.versions else "is not in the schema registry")
            log.info("live %s: schema id %d %s: its records are the ingest's dead letters; restarting the "
                     "validation without them", self.topic, schema_id, known)
            self.unknown_ids.add(schema_id)
        self.query = self._start()
        return True


class ConsumerThread(threading.Thread):
    """Runs one :class:`LiveConsumer` until ``stop``; keeps its failure for the supervisor."""

    def __init__(self, consumer: LiveConsumer, stop: threading.Event):
        super().__init__(name=f"live-{consumer.topic}", daemon=True)
        self.consumer, self.stop = consumer, stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.consumer.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the supervising thread
            self.error = exc


class ValidationProgress:
    """The validation stage's batches in the job's log (no table: the live figures that matter
    are :class:`pipelines.online.live_metrics.LiveMetrics`'). In real-time mode a batch lasts
    ``live.checkpoint_interval`` and the stage pauses between two: the line gives the
    batch's records and where its time went (planning, offsets, the commit), so the pause is
    visible."""

    table = None
    schema = StructType([])

    def row(self, progress: Any) -> dict[str, Any]:
        return {"query_name": progress.name, "query_id": str(progress.id), "batch_id": int(progress.batchId),
                "started": progress.timestamp, "records": int(progress.numInputRows),
                "durations_ms": dict(progress.durationMs or {})}

    def line(self, row: Mapping[str, Any]) -> str:
        durations = ", ".join(f"{k} {v:,}" for k, v in sorted(row["durations_ms"].items()))
        return (f"{row['query_name']}: batch {row['batch_id']} (started {row['started']}) validated "
                f"{row['records']:,} records; ms: {durations}")


def run_live(spark: SparkSession, settings: Settings, views: Sequence[FeatureView], timeout: float | None = None,
             available_now: bool = False) -> int:
    """Run the live path for the online ``views`` until ``timeout`` seconds pass or SIGTERM/SIGINT
    (the consumers finish their batch; the validation queries stop wherever they are: what they
    validate again on restart is dropped by event id). ``available_now``: validate what the
    topics hold now, apply it, stop. Raises the first failure of a query or consumer."""
    by_topic = live_views(settings, views)
    partitions = source_partitions(settings, list(by_topic))
    ensure_events_topics(settings, partitions)
    ensure_delta_table(spark, settings.storage.live_metrics_path, LIVE_METRICS_SCHEMA)
    client = redis_client(settings.redis)
    namespace = settings.redis.namespace
    rows: queue.Queue = queue.Queue()
    consumers: list[LiveConsumer] = []
    for topic, topic_views in by_topic.items():
        contract = settings.contract_for(topic)
        types = {f.name: spark_type(f).simpleString() for f in contract.fields}
        metrics = LiveMetrics(f"live_{topic}", settings.live.report_interval.total_seconds(), rows)
        # Built before any query starts: a view the live path cannot serve fails here.
        live = LiveViews(client, namespace, topic_views, types, metrics, settings.live.served_retention)
        events_topic = settings.live.events_topic(topic)
        consumers.append(LiveConsumer(settings.kafka.client_properties(), events_topic, live,
                                      BatchLog(client, namespace, events_topic), settings.live.max_batch_events))
        log.info("live %s -> %s -> %s", topic, events_topic, ", ".join(v.name for v in topic_views))
    table_writer = MetricsTableWriter(spark, settings.storage.live_metrics_path, rows)
    table_writer.start()
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda signum, _frame: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    # A validation query stopped for a schema id it could not judge is restarted: not an error.
    progress = ProgressListener(spark, restart_markers=(UNRESOLVED_ID_MARKER,))
    for topic in by_topic:
        progress.register(validation_query_name(topic), ValidationProgress())
    spark.streams.addListener(progress)
    registry = SchemaRegistry(settings.schema_registry) if avro_topics(settings, list(by_topic)) else None
    stages: list[ValidationStage] = []
    threads: list[ConsumerThread] = []
    try:
        for topic in by_topic:
            stages.append(ValidationStage(spark, settings, topic, not available_now, registry))
        if available_now:
            for stage in stages:
                while True:
                    try:
                        stage.query.awaitTermination()
                    except Exception:  # noqa: BLE001 - judged (restarted or raised) by check()
                        pass
                    if not stage.check():
                        break
            for consumer in consumers:
                ends = {p: end for p, (_, end) in topic_offsets(settings.kafka.client_properties(), consumer.topic).items()}
                consumer.run(stop, until=ends)
            return 0
        threads = [ConsumerThread(consumer, stop) for consumer in consumers]
        for thread in threads:
            thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not stop.wait(0.5):
            for stage in stages:
                if not stage.check():
                    raise RuntimeError(f"live: query {stage.query.name} stopped")
            broken = next((t for t in threads if not t.is_alive()), None)
            if broken is not None:
                raise broken.error or RuntimeError(f"live: consumer {broken.name} stopped")
            if deadline is not None and time.monotonic() >= deadline:
                break
        log.info("live: stopping")
        return 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        for stage in stages:
            if stage.query.isActive:
                stage.query.stop()
        for consumer in consumers:
            consumer.views.metrics.flush()
        table_writer.stopping.set()
        table_writer.join(timeout=60)
        spark.streams.removeListener(progress)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
