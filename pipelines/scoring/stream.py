"""``fp-score``'s loop: the valid events of a topic, scored with their fresh features, one
prediction per event id to the predictions topic, exactly once.

Input: the topic's live events topic (``{topic}.live``), which ``fp-live`` fills with the valid
events only (the ingest's own checks, in the JVM: an invalid event is never scored) and applies
to the live views in Redis. A batch is the first event that arrives plus whatever is already
fetched (up to ``scoring.max_batch_events``). For each event the scorer waits until ``fp-live``
has applied it (its served row is in Redis, or the live consumer's log is past its offset), reads
its vector (:class:`pipelines.scoring.features.FeatureReader`), and the batch is scored in one
model call.

**Exactly once, in Kafka.** Each batch is one Kafka transaction of a producer whose
``transactional.id`` is fixed per deployment and topic (``fp-score.<deployment>.<topic>.live``,
:func:`pipelines.scoring.model.deployment_key`; a zombie is fenced): its predictions and the
consumer group's offsets after it. A ``read_committed`` reader sees each batch whole or not at
all; a crash before the commit aborts it, and the restart scores the same events again.

**One prediction per event id.** The events topic repeats events (a source duplicate, or the
validation's replay after a restart). Before its transaction commits, a batch marks each event
it scores in Redis with the message it scored it from (:class:`ScoreLog`). A mark counts only
once the committed offsets are past its message, i.e. its batch committed; an event with a mark
that counts is a duplicate: left out, its offset still committed.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import mlflow
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from pyspark.sql import SparkSession
from pyspark.sql.streaming import StreamingQuery

from pipelines.core.delta import ensure_delta_table
from pipelines.core.errors import ConfigError
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.prometheus import observe_latency
from pipelines.core.settings import Settings
from pipelines.core.times import from_epoch_micros, micros
from pipelines.features.live_stream import MetricsTableWriter
from pipelines.online.live_consumer import BatchLog
from pipelines.online.live_metrics import percentile
from pipelines.online.store import retry_transient
from pipelines.scoring.features import FeatureReader, ScoredEvent, servable_features
from pipelines.scoring.model import (
    ServableFeature,
    ServingModel,
    deployment_key,
    limit_model_threads,
    load_model,
    model_frame,
    resolve,
)
from pipelines.scoring.sinks import SCORING_METRICS_SCHEMA, start_predictions_table

log = logging.getLogger(__name__)

#: ``iso``'s text of each whole second seen lately (a batch's times share a few seconds).
_ISO_SECONDS: dict[int, str] = {}


def iso(micros_: int) -> str:
    """``micros_`` (µs since the epoch) as ISO-8601 UTC text, as ``datetime.isoformat`` gives it
    with ``Z`` for ``+00:00``: no fraction when it is a whole second, else six digits. The
    second's text is cached: formatting four times per prediction was a tenth of the scorer's CPU."""
    seconds, fraction = divmod(micros_, 1_000_000)
    text = _ISO_SECONDS.get(seconds)
    if text is None:
        if len(_ISO_SECONDS) >= 4096:
            _ISO_SECONDS.clear()
        text = _ISO_SECONDS[seconds] = from_epoch_micros(seconds * 1_000_000).isoformat()[:-len("+00:00")]
    return f"{text}.{fraction:06d}Z" if fraction else f"{text}Z"


#: Trims the marks of the oldest listed append minute at or before ARGV[1]: pops up to ARGV[2]
#: ids from that minute's list and deletes each one's mark unless it was rewritten since for a
#: later minute (a value ``partition:offset:minute``). KEYS: the marks hash, the minutes' sorted
#: set, the minute's list. Returns the ids popped.
_TRIM = """
local last = tonumber(ARGV[1])
local ids = redis.call('LPOP', KEYS[3], tonumber(ARGV[2]))
if ids then
  for _, id in ipairs(ids) do
    local mark = redis.call('HGET', KEYS[1], id)
    if mark then
      local minute = tonumber(string.match(mark, ':(-?%d+)$'))
      if minute and minute <= last then redis.call('HDEL', KEYS[1], id) end
    end
  end
end
if redis.call('LLEN', KEYS[3]) == 0 then redis.call('ZREM', KEYS[2], ARGV[3]) end
return ids and #ids or 0
"""


class ScoreLog:
    """The scorer's duplicate marks and its batch in flight in Redis, under
    ``{namespace}:~score:{<deployment>:<events topic>}`` (one hash slot).

    A mark says which message of the events topic an event id was scored from: the hash
    ``marks`` (event id -> ``partition:offset:minute``, the minute of the source record's Kafka
    append time), with each minute's ids listed (``ids:<minute>``, and the minutes in the sorted
    set ``minutes``) to delete them later. A mark counts once the consumer group's committed
    offset of its partition is past its offset: its batch committed (offsets only move with a
    committed transaction). A mark of a batch that died in flight, or of a fenced old instance
    that wrote it after its replacement started, is past the committed offsets and does not
    count; the event is scored again, and its mark rewritten. Looking an event up is one field
    of one hash, whatever the window.

    Kept by append time, not by the clock: ``fp-live``'s replay after a restart re-emits an event
    with its source record's append time, so after an outage of any length the replayed event
    still finds its mark. A minute's marks are deleted once the newest append time the scorer has
    seen is ``dedupe_window`` and a minute past it (a few thousand ids per batch, off the lookup's
    path); a source duplicate appended later than that after the original gets a second
    prediction.
    """

    #: Marks deleted per trimming call (one call per batch while minutes are due).
    TRIM_CHUNK = 5000

    def __init__(self, client: redis.Redis, namespace: str, deployment: str, topic: str, dedupe_window_s: float):
        self.client = client
        self.prefix = f"{namespace}:~score:{{{deployment}:{topic}}}"
        self.marks_key, self.minutes_key = f"{self.prefix}:marks", f"{self.prefix}:minutes"
        self.window_minutes = int(dedupe_window_s // 60) + 1
        self.newest_minute: int | None = None
        #: The last minute trimmed through with nothing left (no call until the window moves on).
        self.clean_through: int | None = None
        self._trim = client.register_script(_TRIM)

    @property
    def in_flight_key(self) -> str:
        return f"{self.prefix}:inflight"

    def start(self, committed: Mapping[int, int]) -> dict[int, int] | None:
        """At a start: the offsets the last batch of an earlier run was to commit, if it did
        not (its Kafka transaction is aborted by this start, its marks never count)."""
        raw = self.client.get(self.in_flight_key)
        if raw is None:
            return None
        ends = {int(p): int(o) for p, o in json.loads(raw)["ends"].items()}
        if all(committed.get(p, 0) >= o for p, o in ends.items()):
            return None
        log.info("scoring: the batch up to offsets %s was in flight at the last stop (committed: %s): "
                 "aborted, its events are scored again", ends, dict(committed))
        return ends

    @staticmethod
    def _minute(event: ScoredEvent) -> int:
        return event.append_micros // 60_000_000

    def scored(self, events: Sequence[ScoredEvent], committed: Mapping[int, int]) -> set[str]:
        """The ids among ``events`` already scored from a message below the committed offsets."""
        if not events:
            return set()
        ids = [e.event_id for e in events]
        found = set()
        for event_id, value in zip(ids, self.client.hmget(self.marks_key, ids)):
            if value is not None:
                partition, offset, _ = (value.decode() if isinstance(value, bytes) else value).split(":")
                if int(offset) < committed.get(int(partition), 0):
                    found.add(event_id)
        return found

    def mark(self, events: Sequence[ScoredEvent], ends: Mapping[int, int]) -> None:
        """Marks ``events`` as scored from their messages and records the batch's ``ends`` as in
        flight (one round trip); then deletes one chunk of the marks behind the window, if due."""
        by_minute: dict[int, list[str]] = {}
        marks = {}
        for event in events:
            minute = self._minute(event)
            by_minute.setdefault(minute, []).append(event.event_id)
            marks[event.event_id] = f"{event.partition}:{event.offset}:{minute}"
        pipe = self.client.pipeline(transaction=False)
        if marks:
            pipe.hset(self.marks_key, mapping=marks)
            for minute, ids in by_minute.items():
                pipe.rpush(f"{self.prefix}:ids:{minute}", *ids)
            pipe.zadd(self.minutes_key, {str(m): m for m in by_minute})
        pipe.set(self.in_flight_key, json.dumps({"ends": {str(p): o for p, o in ends.items()}}))
        pipe.execute()
        newest = max(by_minute, default=self.newest_minute)
        if newest is not None and (self.newest_minute is None or newest > self.newest_minute):
            self.newest_minute = newest
        if self.newest_minute is not None:
            last = self.newest_minute - self.window_minutes - 1
            if last != self.clean_through and self.trim(last) == 0:
                self.clean_through = last

    def trim(self, last_minute: int) -> int:
        """Deletes up to :attr:`TRIM_CHUNK` marks of the oldest minute at or before
        ``last_minute``; returns how many ids it looked at (0: nothing is due)."""
        due = self.client.zrangebyscore(self.minutes_key, "-inf", last_minute, start=0, num=1)
        if not due:
            return 0
        minute = int(due[0])
        return int(self._trim(keys=[self.marks_key, self.minutes_key, f"{self.prefix}:ids:{minute}"],
                              args=[last_minute, self.TRIM_CHUNK, str(minute)]))


@dataclass
class ScoringMetrics:
    """Event -> prediction latencies per interval; a p99 over the objective is an error line."""

    interval: float
    slo_p99_s: float
    started: float = field(default_factory=time.time)
    scored: int = 0
    duplicates: int = 0
    #: Events scored without their own row of a trailing view on their topic (its features
    #: missing: None to the model): the scorer fell further behind fp-live than the retention.
    without_rows: int = 0
    batches: int = 0
    latencies: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    #: Per step of a batch (:data:`BATCH_STEPS`), each batch's seconds in it: where the time goes.
    steps: dict[str, list[float]] = field(default_factory=dict)
    breaches: int = 0
    #: Every interval's row, for ``ops/scoring_metrics`` (drained by a writer off the data path).
    rows: queue.Queue = field(default_factory=queue.Queue)

    def record(self, latencies: Sequence[float], duplicates: int, wait_s: float, without_rows: int = 0,
               steps: Mapping[str, float] | None = None) -> None:
        self.batches += 1
        for step, seconds in (steps or {}).items():
            self.steps.setdefault(step, []).append(seconds)
        self.scored += len(latencies)
        self.duplicates += duplicates
        self.without_rows += without_rows
        self.latencies += latencies
        self.waits.append(wait_s)

    def flush_if_due(self, model: ServingModel) -> dict[str, Any] | None:
        if time.time() - self.started < self.interval:
            return None
        return self.flush(model)

    def flush(self, model: ServingModel) -> dict[str, Any] | None:
        now = time.time()
        if self.batches == 0 and now - self.started < self.interval:
            return None
        ordered = sorted(self.latencies)
        row = {
            "interval_start": datetime.fromtimestamp(self.started, timezone.utc),
            "interval_end": datetime.fromtimestamp(now, timezone.utc),
            "model_name": model.label, "model_version": model.ref.version, "deployment": model.ref.uri,
            "scored": self.scored, "duplicates": self.duplicates, "without_rows": self.without_rows,
            "batches": self.batches,
            "events_per_second": self.scored / max(now - self.started, 1e-9),
            "p50_s": percentile(ordered, 0.50), "p95_s": percentile(ordered, 0.95), "p99_s": percentile(ordered, 0.99),
            "max_feature_wait_s": max(self.waits, default=0.0),
            "slo_p99_s": self.slo_p99_s,
        }
        row["slo_breached"] = row["p99_s"] is not None and row["p99_s"] > self.slo_p99_s
        observe_latency("score", row["p99_s"])
        text = (f"scoring {model.label} v{model.ref.version or '-'}: {row['scored']} scored "
                f"({row['events_per_second']:.0f}/s), {row['duplicates']} duplicates left out, event->prediction "
                + (f"p50 {row['p50_s']:.3f}s p95 {row['p95_s']:.3f}s p99 {row['p99_s']:.3f}s" if ordered else "-"))
        if self.steps:
            text += "; per batch (ms, p50/max): " + " ".join(
                f"{step} {percentile(sorted(values), 0.5) * 1000:.0f}/{max(values) * 1000:.0f}"
                for step, values in self.steps.items())
        if row["slo_breached"]:
            self.breaches += 1
            log.error("%s: OVER THE LATENCY OBJECTIVE (p99 %.3fs > %.3fs)", text, row["p99_s"], self.slo_p99_s)
        elif self.without_rows:
            log.warning("%s; %d scored WITHOUT THEIR OWN ROW (features missing: the scorer is further behind "
                        "fp-live than live.served_retention)", text, self.without_rows)
        else:
            log.info(text)
        self.rows.put(row)
        self.started, self.scored, self.duplicates, self.without_rows, self.batches = now, 0, 0, 0, 0
        self.latencies, self.waits, self.steps = [], [], {}
        return row


class ModelWatcher:
    """The serving model, reloaded between batches when its alias moves (checked every
    ``refresh_s``). A new version that fails to load or whose inputs the job cannot serve is
    logged as an error and not taken: the old one keeps scoring."""

    def __init__(self, client: mlflow.MlflowClient, uri: str, servable: Mapping[str, ServableFeature], refresh_s: float,
                 threads: int = 1):
        self.client, self.uri, self.servable, self.refresh_s, self.threads = client, uri, servable, refresh_s, threads
        self.model = load_model(client, uri, servable)
        limit_model_threads(threads)
        self.checked = time.monotonic()

    def current(self) -> ServingModel:
        if self.model.ref.alias is None or time.monotonic() - self.checked < self.refresh_s:
            return self.model
        self.checked = time.monotonic()
        try:
            ref = resolve(self.client, self.uri)
            if ref.version != self.model.ref.version:
                model = load_model(self.client, self.uri, self.servable)
                limit_model_threads(self.threads)
                log.info("scoring: %s moved to version %s (was %s): scoring with it from the next batch",
                         self.uri, model.ref.version, self.model.ref.version)
                self.model = model
        except Exception as exc:  # noqa: BLE001 - a bad new version must not stop scoring
            log.error("scoring: %s could not be refreshed, still scoring with version %s: %s",
                      self.uri, self.model.ref.version, exc)
        return self.model


class Scorer:
    """Scores the events of one live events topic (see the module docstring)."""

    #: The longest pause between two looks at fp-live's progress while a batch waits for it.
    MAX_WAIT_PAUSE_S = 0.008
    #: A batch's Redis work is retried this often, pausing from 0.2 s doubling up to 8 s
    #: (about 30 s in all: a Redis Cluster's failover, a restarted server loading its data).
    REDIS_ATTEMPTS, REDIS_BACKOFF_S, REDIS_MAX_PAUSE_S = 9, 0.2, 8.0

    def __init__(self, settings: Settings, client: redis.Redis, watcher: ModelWatcher, reader: FeatureReader,
                 events_topic: str, key_field: str, predictions_topic: str, feature_wait_s: float = 300.0):
        scoring = settings.scoring
        self.settings, self.client, self.watcher, self.reader = settings, client, watcher, reader
        self.events_topic, self.key_field, self.predictions_topic = events_topic, key_field, predictions_topic
        self.max_events = scoring.max_batch_events
        self.linger_s = scoring.batch_linger.total_seconds()
        self.feature_wait_s = feature_wait_s
        self.deployment = deployment_key(watcher.uri)
        self.group = f"fp-score.{self.deployment}.{events_topic}"
        props = settings.kafka.client_properties()
        self.consumer = Consumer({**props, "group.id": self.group, "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                                  "fetch.wait.max.ms": 20, "enable.partition.eof": False})
        self.producer = Producer({**settings.kafka.producer_properties(), "transactional.id": self.group,
                                  "linger.ms": 2, "compression.type": "lz4"})
        self.log = ScoreLog(client, settings.redis.namespace, self.deployment, events_topic,
                            micros(scoring.dedupe_window) / 1e6)
        self.live_log = BatchLog(client, settings.redis.namespace, events_topic)
        self.metrics = ScoringMetrics(scoring.report_interval.total_seconds(), scoring.latency_slo_p99.total_seconds())
        #: Per partition of the events topic, the committed offset (the next to score).
        self.committed: dict[int, int] = {}
        #: At a start: the ends of the batch an earlier run had in flight, if it did not commit.
        self.aborted: dict[int, int] | None = None
        self.batches = 0
        #: Batches that found an event's own row not yet written and waited for fp-live.
        self.waited_batches = 0
        #: Called about once a second between batches: raises to stop the scoring (a failed
        #: predictions-table query).
        self.health: Callable[[], None] = lambda: None

    def partitions(self) -> list[int]:
        topic = self.consumer.list_topics(self.events_topic, timeout=30).topics.get(self.events_topic)
        if topic is None or topic.error is not None:
            raise ConfigError(f"scoring: events topic {self.events_topic!r} does not exist: start fp-live for its topic first")
        return sorted(topic.partitions)

    def start(self) -> dict[int, int]:
        """The position to read from: the committed offsets, else the earliest. Fences an
        earlier instance of the same deployment first (``init_transactions`` aborts its
        transaction in flight; a later commit of it fails)."""
        self.producer.init_transactions(30)
        partitions = self.partitions()
        committed = self.consumer.committed([TopicPartition(self.events_topic, p) for p in partitions], timeout=30)
        position = {}
        for tp in committed:
            if tp.offset >= 0:
                position[tp.partition] = tp.offset
            else:
                position[tp.partition] = self.consumer.get_watermark_offsets(tp, timeout=30)[0]
        self.committed = dict(position)
        self.aborted = self.log.start(position)
        log.info("scoring %s (%s): from offsets %s", self.events_topic, self.deployment, position)
        return position

    def run(self, stop: threading.Event, until: Mapping[int, int] | None = None) -> int:
        """Score batches until ``stop`` is set or, with ``until``, every partition's position
        reaches it. Returns the number of batches."""
        position = self.start()
        self.consumer.assign([TopicPartition(self.events_topic, p, o) for p, o in position.items()])
        checked = time.monotonic()
        try:
            while not stop.is_set():
                if time.monotonic() - checked >= 1.0:
                    self.health()
                    checked = time.monotonic()
                if until is not None and all(position.get(p, 0) >= end for p, end in until.items()):
                    break
                first = self._consume(timeout=0.2, count=1)
                if not first:
                    self.metrics.flush_if_due(self.watcher.model)
                    continue
                # consume(n, timeout) returns once n messages are there or the timeout passed.
                messages = first + (self._consume(timeout=self.linger_s, count=self.max_events - 1)
                                    if self.max_events > 1 else [])
                ends = dict(position)
                for message in messages:
                    ends[message.partition()] = max(ends.get(message.partition(), 0), message.offset() + 1)
                try:
                    self.score_batch(messages, ends, stop)
                except InterruptedError:  # stopped while waiting for fp-live: the batch was not committed
                    break
                position = ends
                self.metrics.flush_if_due(self.watcher.model)
        finally:
            self.metrics.flush(self.watcher.model)
            self.consumer.close()
            self.producer.flush(30)
        return self.batches

    def score_batch(self, messages: Sequence[Message], ends: Mapping[int, int], stop: threading.Event) -> None:
        clock = [time.perf_counter()]

        def lap() -> float:
            clock.append(time.perf_counter())
            return clock[-1] - clock[-2]

        model = self.watcher.current()
        if not {i.name for i in model.inputs} <= set(self.reader.names):  # a new version with new inputs
            self.reader = FeatureReader(self.client, self.settings, self.reader.topic, self.watcher.servable,
                                        [i.name for i in model.inputs])
        # Everything before the Kafka transaction only reads Redis, or writes marks that count
        # once the transaction commits: on a Redis error (a master failing over, a server
        # restarting) it is all done again, as a restart would, without leaving the process.
        steps: dict[str, float] = {}
        records, latencies, vectors, duplicates = retry_transient(
            lambda: self._prepare(model, messages, ends, stop, lap, steps), "scoring a batch (Redis)",
            self.REDIS_ATTEMPTS, self.REDIS_BACKOFF_S, max_pause=self.REDIS_MAX_PAUSE_S)
        wait_s = steps["wait"]
        self.producer.begin_transaction()
        for key, value in records:
            self.producer.produce(self.predictions_topic, value=value.encode(), key=None if key is None else str(key).encode())
        offsets = [TopicPartition(self.events_topic, p, o) for p, o in ends.items()]
        self.producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 30)
        self.producer.commit_transaction(60)
        self.committed = dict(ends)
        steps["commit"] = lap()
        self.batches += 1
        without_rows = sum(1 for v in vectors if any(v.rows.get(n) == (None, None) for n in self.reader.own))
        self.metrics.record(latencies, duplicates, wait_s, without_rows, steps)

    def _prepare(self, model: ServingModel, messages: Sequence[Message], ends: Mapping[int, int],
                 stop: threading.Event, lap: Callable[[], float], steps: dict[str, float],
                 ) -> tuple[list[tuple[str | None, str]], list[float], list[Any], int]:
        """The batch's predictions (key, JSON value) and latencies, its events' vectors and how
        many of its messages were duplicates; the events scored are marked (:class:`ScoreLog`)."""
        events, first_seen = [], set()
        for message in messages:
            event = decode_event(message)
            if event.event_id not in first_seen:
                first_seen.add(event.event_id)
                events.append(event)
        done = self.log.scored(events, self.committed)
        fresh = [e for e in events if e.event_id not in done]
        duplicates = len(messages) - len(fresh)
        steps["dedupe"] = lap()
        own = self.wait_for_own_rows(fresh, stop)
        steps["wait"] = lap()
        vectors = self.reader.vectors(fresh, own, datetime.now(timezone.utc))
        steps["read"] = lap()
        records: list[tuple[str | None, str]] = []
        latencies: list[float] = []
        if fresh:
            frame = model_frame(model.inputs, {i.name: [v.values.get(i.name) for v in vectors] for i in model.inputs})
            scores = model.score(frame)
            scored_micros = time.time_ns() // 1000
            for event, vector, score in zip(fresh, vectors, scores):
                ready = [vector.rows[n][1] for n in self.reader.own if vector.rows.get(n, (None, None))[1] is not None]
                record = {
                    "event_id": event.event_id,
                    "entity": event.fields.get(self.key_field),
                    "score": float(score),
                    "model_name": model.label,
                    "model_version": model.ref.version,
                    "deployment": self.watcher.uri,
                    "event_time": iso(event.event_micros),
                    "append_time": iso(event.append_micros),
                    "features_ready_time": iso(max(ready) * 1000 if ready else event.event_micros),
                    "scored_time": iso(scored_micros),
                    "latency_ms": (scored_micros - event.event_micros) / 1000,
                    "view_times": json.dumps(vector.rows, separators=(",", ":")),
                    "features": json.dumps({i.name: json_value(vector.values.get(i.name)) for i in model.inputs},
                                           separators=(",", ":")),
                }
                records.append((record["entity"], json.dumps(record, separators=(",", ":"))))
                latencies.append((scored_micros - event.event_micros) / 1e6)
        steps["model"] = lap()
        self.log.mark(fresh, ends)
        steps["mark"] = lap()
        return records, latencies, vectors, duplicates

    def wait_for_own_rows(self, events: Sequence[ScoredEvent], stop: threading.Event) -> dict[str, list[Any]]:
        """The own views' rows of ``events``, once ``fp-live`` has applied each event. An event
        the live consumer passed without a row for it (older than every window when it came,
        or forgotten since) gets its entity's latest row at or before its time instead.

        While it waits it looks at the live consumer's log every few ms (one Redis read) and
        reads rows again only for the events of the batch the log has planned: ``fp-live``
        plans a batch before it writes a row of it, so an event past the plan has none yet."""
        rows = self.reader.own_rows(events)
        deadline = time.monotonic() + self.feature_wait_s
        pause = 0.001
        if any(row is None for column in rows.values() for row in column):
            self.waited_batches += 1
        while True:
            missing = [i for i in range(len(events)) if any(rows[n][i] is None for n in rows)]
            if not missing:
                return rows
            # The live consumer's log first, then the rows again: a row written between the
            # first read and this look is not taken for a row that will never come.
            planned = self.live_log.read()
            applied = {} if planned is None else dict(planned.ends if planned.done else planned.starts)
            planned_ends = {} if planned is None else planned.ends
            due = [i for i in missing if planned_ends.get(events[i].partition, 0) > events[i].offset]
            self._refetch(events, due, rows)
            missing = [i for i in missing if any(rows[n][i] is None for n in rows)]
            waiting = [i for i in missing if applied.get(events[i].partition, 0) <= events[i].offset]
            for i in set(missing) - set(waiting):  # applied, yet no row: as the entity's features stand
                for name in rows:
                    if rows[name][i] is None:
                        view = self.reader.views[name]
                        [rows[name][i]] = self.reader.trailing[name].served_as_of(
                            [(events[i].fields.get(view.entity), events[i].event_micros)])
            if not waiting:
                return rows
            if stop.is_set():
                raise InterruptedError("scoring stopped while waiting for fp-live")
            if time.monotonic() > deadline:
                raise RuntimeError(f"scoring: fp-live has not applied {self.events_topic} offsets "
                                   f"{sorted({(events[i].partition, events[i].offset) for i in waiting})[:5]} within "
                                   f"{self.feature_wait_s:.0f}s: is fp-live running?")
            # A look costs one read of the log while fp-live has not reached the batch: a short
            # pause keeps the time between fp-live's write and the scorer seeing it to a few ms.
            time.sleep(pause)
            pause = min(pause * 2, self.MAX_WAIT_PAUSE_S)

    def _refetch(self, events: Sequence[ScoredEvent], which: Sequence[int], rows: dict[str, list[Any]]) -> None:
        if not which:
            return
        fetched = self.reader.own_rows([events[i] for i in which])
        for name in rows:
            for j, i in enumerate(which):
                if rows[name][i] is None:
                    rows[name][i] = fetched[name][j]

    def _consume(self, timeout: float, count: int) -> list[Message]:
        good = []
        for message in self.consumer.consume(count, timeout=timeout):
            error = message.error()
            if error is None:
                good.append(message)
            elif error.fatal() or error.code() != KafkaError._PARTITION_EOF:
                raise KafkaException(error)
        return good


def json_value(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def decode_event(message: Message) -> ScoredEvent:
    """An events-topic message -> the event to score."""
    event = json.loads(message.value())
    return ScoredEvent(str(event["_event_id"]), int(event["_event_micros"]), int(event["_append_micros"]),
                       message.partition(), message.offset(), event)


def ensure_predictions_topic(settings: Settings, partitions: int) -> None:
    source = settings.kafka.topics[settings.scoring.topic]
    ensure_topics(settings.kafka.client_properties(), [
        TopicSpec(settings.scoring.predictions_topic, partitions, source.replication_factor, source.min_insync_replicas)])


def run_scoring(settings: Settings, client: redis.Redis, tracking_uri: str | None, model_uri: str | None = None,
                timeout: float | None = None, until_end: bool = False,
                stop: threading.Event | None = None, on_ready: Callable[[Scorer], None] | None = None,
                spark: SparkSession | None = None) -> int:
    """Score ``scoring.topic``'s valid events with ``model_uri`` (default ``scoring.model``)
    until ``stop``, ``timeout`` seconds, or (``until_end``) the events topic's end at start.
    With ``spark``, the predictions table (:mod:`pipelines.scoring.sinks`) is kept beside
    (``until_end``: brought up to the topic's end after the scoring). Returns 0."""
    scoring = settings.scoring
    uri = model_uri or scoring.model
    if not uri:
        raise ConfigError("scoring.model: not set, and no --model given")
    topic = scoring.topic
    servable = servable_features(settings, topic)
    watcher = ModelWatcher(mlflow.MlflowClient(tracking_uri), uri, servable, scoring.model_refresh.total_seconds(),
                           scoring.model_threads)
    reader = FeatureReader(client, settings, topic, servable, [i.name for i in watcher.model.inputs])
    events_topic = settings.live.events_topic(topic)
    contract = settings.contract_for(topic)
    scorer = Scorer(settings, client, watcher, reader, events_topic, contract.key_field, scoring.predictions_topic)
    ensure_predictions_topic(settings, len(scorer.partitions()))
    stop = stop or threading.Event()
    until = None
    if until_end:
        until = {p: scorer.consumer.get_watermark_offsets(TopicPartition(events_topic, p), timeout=30)[1]
                 for p in scorer.partitions()}
    timer = threading.Timer(timeout, stop.set) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    if on_ready:
        on_ready(scorer)
    label = watcher.model.label
    table = None
    metrics_writer = None
    if spark is not None:
        ensure_delta_table(spark, settings.storage.scoring_metrics_path, SCORING_METRICS_SCHEMA)
        metrics_writer = MetricsTableWriter(spark, settings.storage.scoring_metrics_path, scorer.metrics.rows,
                                            SCORING_METRICS_SCHEMA)
        metrics_writer.start()
    if spark is not None and not until_end:
        table = start_predictions_table(spark, settings, label, uri, available_now=False,
                                        interval=scoring.table_trigger_interval)
        scorer.health = lambda: _raise_if_failed(table)
    try:
        scorer.run(stop, until)
    finally:
        if timer:
            timer.cancel()
        if table is not None and table.isActive:
            table.stop()
        if metrics_writer is not None:
            metrics_writer.stopping.set()
            metrics_writer.join(timeout=60)
    if table is not None:
        _raise_if_failed(table)
    if spark is not None and until_end:
        table = start_predictions_table(spark, settings, label, uri, available_now=True)
        table.awaitTermination()
        _raise_if_failed(table)
    return 0


def _raise_if_failed(query: StreamingQuery) -> None:
    failure = query.exception()
    if failure is not None:
        raise RuntimeError(f"scoring: the predictions table's query failed: {failure}")

