"""The live path (``fp-live``): each valid event's effect on the online views in Redis within a
second, beside the durable path (bronze -> feature streams -> feature tables + Redis), which
stays the source of truth and restates Redis wherever it computes a row.

One micro-batch query per source topic reads Kafka directly, validates every record with the
ingest's own checks (:func:`pipelines.ingest.bronze.check_records`: the same records are
rejected; dead letters stay the ingest's job), and hands the valid events to one object per
view, each updating its state and features inside Redis with atomic scripts, idempotently by
event id (a replayed batch changes nothing):

* trailing views: :class:`pipelines.online.live.LiveTrailingView`, the entity's features as of
  its latest event, written in the batch that reads it;
* sliding and session views: :class:`pipelines.online.live_windows.LiveWindowView`, windows
  kept open until the query's watermark (latest event time read - ``allowed_lateness``)
  passes their end, then written in that same batch.

No Delta write, no shuffle, no Spark state: the checkpoint holds only Kafka offsets (the
watermark of each windowed view lives in Redis with its windows, per batch id, so a replayed
batch is judged as its first attempt was).

Each handler also measures, per event, event time -> Redis write and Kafka append -> Redis
write, and per closed window, watermark passing its end -> Redis write; every
``live.report_interval`` it logs one progress line and appends one row to ``ops/live_metrics``
(from a background thread, so a Delta commit never delays a batch).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery
from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType, TimestampType

from pipelines.contracts.spark_schema import spark_type
from pipelines.contracts.validation import ValidationRules
from pipelines.core.contract_spec import Contract
from pipelines.core.delta import ensure_delta_table
from pipelines.core.errors import ConfigError
from pipelines.core.runner import BatchGate, run_queries, with_trigger
from pipelines.core.settings import Settings
from pipelines.core.times import micros
from pipelines.core.view_spec import FeatureView
from pipelines.ingest.bronze import check_records
from pipelines.ingest.sources import read_kafka_stream
from pipelines.online.live import LiveResult, LiveTrailingView
from pipelines.online.live_windows import LiveWindowView, WindowResult
from pipelines.online.store import redis_client

log = logging.getLogger(__name__)

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
                views: Sequence[FeatureView]) -> DataFrame:
    """Kafka records -> one row per valid record: ``_append_micros`` (Kafka timestamp, µs),
    ``_event_micros``, the id and every entity and aggregated column of ``views``. Invalid
    records are left out (the ingest dead-letters them); duplicates are kept (Redis drops
    them by event id). Raises ConfigError for an Avro topic (its writer schemas are resolved
    by the ingest's batch handler only)."""
    if contract.format != "json":
        raise ConfigError(f"live: contract {contract.name!r} is {contract.format}; the live path reads JSON topics")
    checked = check_records(records, contract, rules)
    columns: list[str] = []
    for view in views:
        for name in [view.entity, *[a.column for a in view.aggregations if a.column != "*"],
                     *[by.column for by in view.count_by]]:
            if name not in columns:
                columns.append(name)
    return checked.filter(F.col("error_class").isNull()).select(
        F.unix_micros("kafka_timestamp").alias("_append_micros"),
        F.unix_micros(F.col(contract.event_time_field)).alias("_event_micros"),
        F.col(contract.id_field).cast("string").alias("_event_id"),
        *[F.col(c) for c in columns],
    )


def _percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile of an ascending list (None when empty)."""
    if not ordered:
        return None
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


@dataclass
class LiveMetrics:
    """Latencies and counts of one query, reported every ``interval`` seconds."""

    query_name: str
    interval: float
    rows: queue.Queue = field(default_factory=queue.Queue)
    started: float = field(default_factory=time.time)
    batches: int = 0
    added: int = 0
    written: int = 0
    closed: int = 0
    late: int = 0
    event_lags: list[float] = field(default_factory=list)
    append_lags: list[float] = field(default_factory=list)
    close_lags: list[float] = field(default_factory=list)

    def record(self, event_lags: list[float], append_lags: list[float], added: int, written: int,
               closed: int = 0, late: int = 0, close_lags: Sequence[float] = ()) -> None:
        self.batches += 1
        self.added += added
        self.written += written
        self.closed += closed
        self.late += late
        self.event_lags += event_lags
        self.append_lags += append_lags
        self.close_lags += close_lags
        if time.time() - self.started >= self.interval:
            self.flush()

    def flush(self) -> dict[str, Any] | None:
        """Log the interval's line, queue its row, start the next interval."""
        now = time.time()
        if not self.batches:
            self.started = now
            return None
        seconds = max(now - self.started, 1e-6)
        event_lags, append_lags, close_lags = sorted(self.event_lags), sorted(self.append_lags), sorted(self.close_lags)
        row = {
            "query_name": self.query_name,
            "interval_start": datetime.fromtimestamp(self.started, timezone.utc),
            "interval_end": datetime.fromtimestamp(now, timezone.utc),
            "batches": self.batches, "events": len(event_lags),
            "events_per_second": round(len(event_lags) / seconds, 1),
            **{f"event_to_redis_p{q}": _percentile(event_lags, q / 100) for q in (50, 95, 99)},
            **{f"append_to_redis_p{q}": _percentile(append_lags, q / 100) for q in (50, 95, 99)},
            "events_added": self.added, "features_written": self.written,
            "windows_closed": self.closed, "events_late": self.late,
            **{f"watermark_to_redis_p{q}": _percentile(close_lags, q / 100) for q in (50, 95, 99)},
            "recorded_at": datetime.now(timezone.utc),
        }
        log.info(format_live_progress(row))
        self.rows.put(row)
        self.started, self.batches, self.added, self.written, self.closed, self.late = now, 0, 0, 0, 0, 0
        self.event_lags, self.append_lags, self.close_lags = [], [], []
        return row


def format_live_progress(row: dict[str, Any]) -> str:
    def s(key: str) -> str:
        value = row[key]
        return "-" if value is None else f"{value:.2f}s"

    return (f"{row['query_name']}: {row['events']:,} events in {row['batches']} batches "
            f"({row['events_per_second']:,.0f}/s), event->redis p50 {s('event_to_redis_p50')} "
            f"p95 {s('event_to_redis_p95')} p99 {s('event_to_redis_p99')}, append->redis p50 "
            f"{s('append_to_redis_p50')} p99 {s('append_to_redis_p99')}, {row['events_added']:,} new events, "
            f"{row['features_written']:,} feature hashes written"
            + (f", {row['windows_closed']:,} windows closed, watermark->redis p50 {s('watermark_to_redis_p50')} "
               f"p99 {s('watermark_to_redis_p99')}, {row['events_late']:,} late events dropped"
               if row.get("windows_closed") or row.get("events_late") else ""))


class MetricsTableWriter(threading.Thread):
    """Appends queued metrics rows to ``ops/live_metrics`` off the batch thread (best effort: a
    failed append is logged; the data path never waits for it)."""

    def __init__(self, spark: SparkSession, path: str, rows: queue.Queue):
        super().__init__(name="live-metrics", daemon=True)
        self.spark, self.path, self.rows = spark, path, rows
        self.stopping = threading.Event()

    def run(self) -> None:
        while not (self.stopping.is_set() and self.rows.empty()):
            try:
                row = self.rows.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.spark.createDataFrame([row], LIVE_METRICS_SCHEMA).write.format("delta").mode("append").save(self.path)
            except Exception as exc:  # noqa: BLE001 - metrics must never stop the live path
                log.warning("live metrics row not written to %s: %s", self.path, exc)


class LiveBatchWriter:
    """``foreachBatch`` handler of one topic: its valid events into every live view, in Redis."""

    def __init__(self, settings: Settings, contract: Contract, views: Sequence[FeatureView], metrics: LiveMetrics):
        types = {f.name: spark_type(f).simpleString() for f in contract.fields}
        client = redis_client(settings.redis)
        namespace = settings.redis.namespace
        self.views: list[LiveTrailingView | LiveWindowView] = [
            LiveTrailingView(client, namespace, v, types) if v.kind == "trailing" else LiveWindowView(client, namespace, v, types)
            for v in views
        ]
        self.pool = ThreadPoolExecutor(max_workers=len(self.views), thread_name_prefix="live-redis")
        self.metrics = metrics

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        table = batch.toArrow()
        if table.num_rows == 0:
            return
        data = table.to_pydict()
        read = time.monotonic()
        topic_max = max(data["_event_micros"])
        added = written = closed = late = 0
        closed_ends: list[tuple[int, int]] = []

        def apply(live: LiveTrailingView | LiveWindowView) -> LiveResult | WindowResult:
            view = live.view
            events = zip(data[view.entity], data["_event_id"], data["_event_micros"], *[data[c] for c in live.columns])
            return live.apply(events) if isinstance(live, LiveTrailingView) else live.apply(batch_id, events, topic_max)

        # The views at once: one view's scripts run in Redis while the next view's are packed.
        for live, result in zip(self.views, self.pool.map(apply, self.views)):
            if isinstance(result, WindowResult):
                closed, late = closed + result.closed, late + result.late
                closed_ends += [(end, live.lateness) for _, end in result.closed_ends]
            added += result.added
            written += result.written
        done = time.time_ns() // 1000
        log.debug("%s batch %d: %d events, read+validate %.3fs, redis %.3fs", self.metrics.query_name, batch_id,
                  table.num_rows, read - started, time.monotonic() - read)
        self.metrics.record([(done - t) / 1e6 for t in data["_event_micros"]],
                            [(done - t) / 1e6 for t in data["_append_micros"]], added, written, closed, late,
                            close_lags(data["_event_micros"], data["_append_micros"], closed_ends, done))


def close_lags(event_micros: Sequence[int], append_micros: Sequence[int], closed: Sequence[tuple[int, int]],
               done: int) -> list[float]:
    """Seconds from the moment each closed window's end was passed by the watermark (the Kafka
    append of the batch's first event at or after ``end + lateness``) to ``done``; windows
    whose watermark moved in an earlier batch are left out."""
    if not closed:
        return []
    ordered = sorted(zip(event_micros, append_micros))
    times = [t for t, _ in ordered]
    earliest_from = [0] * len(ordered)  # the earliest append among events at index i and later
    best = None
    for i in range(len(ordered) - 1, -1, -1):
        best = ordered[i][1] if best is None else min(best, ordered[i][1])
        earliest_from[i] = best
    lags = []
    for end, lateness in closed:
        i = bisect.bisect_left(times, end + lateness)
        if i < len(times):
            lags.append((done - earliest_from[i]) / 1e6)
    return lags


def start_live(spark: SparkSession, settings: Settings, views: Sequence[FeatureView], gate: BatchGate | None = None,
               available_now: bool = False) -> tuple[list[StreamingQuery], list[LiveMetrics], MetricsTableWriter]:
    """One query per source topic of the trailing ``views`` (checkpoint ``_checkpoints/live/<topic>``);
    ``available_now``: what the topics hold now, in ``max_offsets_per_trigger`` batches, then stop."""
    ensure_delta_table(spark, settings.storage.live_metrics_path, LIVE_METRICS_SCHEMA)
    rows: queue.Queue = queue.Queue()
    table_writer = MetricsTableWriter(spark, settings.storage.live_metrics_path, rows)
    table_writer.start()
    rules = ValidationRules.of(settings.ingest)
    queries, all_metrics = [], []
    for topic, topic_views in live_views(settings, views).items():
        contract = settings.contract_for(topic)
        name = f"live_{topic}"
        metrics = LiveMetrics(name, settings.live.report_interval.total_seconds(), rows)
        handler = LiveBatchWriter(settings, contract, topic_views, metrics)
        # The ingest's reader, with the live path's own starting point and batch bound.
        reading = dataclasses.replace(settings.ingest, starting_offsets=settings.live.starting_offsets,
                                      max_offsets_per_trigger=settings.live.max_offsets_per_trigger)
        events = live_events(read_kafka_stream(spark, settings.kafka, topic, reading), contract, rules, topic_views)
        writer = (events.writeStream.queryName(name)
                  .foreachBatch(gate.wrap(handler) if gate else handler)
                  .option("checkpointLocation", settings.storage.checkpoint_path("live", topic)))
        queries.append(with_trigger(writer, available_now, settings.live.trigger_interval).start())
        all_metrics.append(metrics)
        log.info("live %s -> %s (%s)", topic, ", ".join(v.name for v in topic_views),
                 f"trigger {micros(settings.live.trigger_interval) // 1000} ms")
    return queries, all_metrics, table_writer


def run_live(spark: SparkSession, settings: Settings, views: Sequence[FeatureView], timeout: float | None = None,
             available_now: bool = False) -> int:
    """Run the live queries until they end (``available_now``), ``timeout`` or SIGTERM/SIGINT
    (which stop them between batches)."""
    gate = BatchGate()
    queries, all_metrics, table_writer = start_live(spark, settings, views, gate, available_now)
    try:
        run_queries(queries, timeout, gate=gate)
    finally:
        for metrics in all_metrics:
            metrics.flush()
        table_writer.stopping.set()
        table_writer.join(timeout=60)
    return 0
