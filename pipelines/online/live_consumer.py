"""The live path's second half: the validated events of one topic, from its events topic into
every live view in Redis, in small batches, as soon as they arrive.

The first half (:mod:`pipelines.features.live_stream`) validates each record of a source topic
in the JVM and writes the valid ones, one JSON object each, to the events topic
``{topic}{live.events_topic_suffix}`` (partition for partition). That half is at least once: a
restart re-validates from its last checkpoint and writes some events again. This half makes it
exact: every view drops an event whose id it holds, so a repeated event changes nothing.

Batches are what one poll returns: the first event that arrives, with every event already
fetched behind it (up to ``max_events``), so a batch is small when the stream is quiet and
grows under load. Each batch is planned in Redis before it is applied (:class:`BatchLog`:
its id and, per partition, the offsets before and after it) and marked done after. A batch
planned but not done (the process died while applying it) is read again on restart, exactly the
same offsets under the same id: a windowed view judges it by the watermark its first attempt
had (:meth:`pipelines.online.live_windows.LiveWindowView.watermarks`), so late drops do not
depend on where a crash fell. The position lives in Redis with the state it guards: without a
log (a first start, or the live keys cleared) the consumer reads everything the events topic
retains. The consumer group ``fp-live.<events topic>`` gets the position committed after each
batch, for lag monitoring only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Message, TopicPartition

from pipelines.core.errors import ConfigError
from pipelines.core.view_spec import FeatureView
from pipelines.online.live import LiveResult, LiveTrailingView
from pipelines.online.live_metrics import LiveMetrics, close_lags
from pipelines.online.live_windows import LiveWindowView, WindowResult
from pipelines.online.store import retry_transient

log = logging.getLogger(__name__)

#: Fields every event of an events topic carries beside the views' columns.
EVENT_FIELDS = ("_append_micros", "_event_micros", "_event_id")
#: Beside them, from each message itself: its timestamp in µs (when the validation produced it),
#: or None when the message has none.
VALIDATED_FIELD = "_validated_micros"


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of the log: its id, and per partition the offset before and after it."""

    id: int
    starts: dict[int, int]
    ends: dict[int, int]
    done: bool


class BatchLog:
    """The consumer's position and its batch in flight, in Redis (``{namespace}:~live-log:{topic}``)."""

    def __init__(self, client: redis.Redis, namespace: str, events_topic: str, attempts: int = 8, backoff: float = 0.25):
        self.client = client
        self.key = f"{namespace}:~live-log:{events_topic}"
        self.attempts, self.backoff = attempts, backoff

    def read(self) -> PlannedBatch | None:
        stored = self._retry(lambda: self.client.hmget(self.key, "id", "starts", "ends", "done"), "read")
        if stored[0] is None:
            return None
        starts, ends = (({int(p): int(o) for p, o in json.loads(v).items()}) for v in stored[1:3])
        return PlannedBatch(int(stored[0]), starts, ends, stored[3] == b"1")

    def plan(self, batch: PlannedBatch) -> None:
        mapping = {"id": batch.id, "starts": json.dumps(batch.starts), "ends": json.dumps(batch.ends), "done": 0}
        self._retry(lambda: self.client.hset(self.key, mapping=mapping), "plan")

    def done(self, batch: PlannedBatch) -> None:
        self._retry(lambda: self.client.hset(self.key, "done", 1), "done")

    def _retry(self, action: Callable[[], Any], what: str) -> Any:
        return retry_transient(action, f"live batch log {what} ({self.key})", self.attempts, self.backoff)


@dataclass(frozen=True)
class BatchResult:
    events: int
    added: int
    written: int
    closed: int
    late: int


class LiveViews:
    """Applies a batch of one topic's valid events to each of its live views, one thread per
    view (one view's scripts run in Redis while the next view's are packed)."""

    def __init__(self, client: redis.Redis, namespace: str, views: Sequence[FeatureView],
                 column_types: Mapping[str, str], metrics: LiveMetrics,
                 served_retention: timedelta = timedelta(minutes=10)):
        self.views: list[LiveTrailingView | LiveWindowView] = [
            LiveTrailingView(client, namespace, v, column_types, served_retention=served_retention)
            if v.kind == "trailing"
            else LiveWindowView(client, namespace, v, column_types)
            for v in views
        ]
        self.columns = sorted({c for live in self.views for c in [live.view.entity, *live.columns]})
        self.pool = ThreadPoolExecutor(max_workers=len(self.views), thread_name_prefix="live-redis")
        self.metrics = metrics

    def apply(self, batch_id: int, data: Mapping[str, Sequence[Any]]) -> BatchResult:
        """Apply one batch: ``data`` maps :data:`EVENT_FIELDS` and every column the views use
        (and, for the metrics, :data:`VALIDATED_FIELD` when known) to equally long lists (one
        item per event)."""
        count = len(data["_event_id"])
        if count == 0:
            return BatchResult(0, 0, 0, 0, 0)
        topic_max = max(data["_event_micros"])

        def apply(live: LiveTrailingView | LiveWindowView) -> LiveResult | WindowResult:
            view = live.view
            events = zip(data[view.entity], data["_event_id"], data["_event_micros"], *[data[c] for c in live.columns])
            return live.apply(events) if isinstance(live, LiveTrailingView) else live.apply(batch_id, events, topic_max)

        added = written = closed = late = 0
        closed_ends: list[tuple[int, int]] = []
        for live, result in zip(self.views, self.pool.map(apply, self.views)):
            if isinstance(result, WindowResult):
                closed, late = closed + result.closed, late + result.late
                closed_ends += [(end, live.lateness) for _, end in result.closed_ends]
            added += result.added
            written += result.written
        done = time.time_ns() // 1000
        self.metrics.record([(done - t) / 1e6 for t in data["_event_micros"]],
                            [(done - t) / 1e6 for t in data["_append_micros"]], added, written, closed, late,
                            close_lags(data["_event_micros"], data["_append_micros"], closed_ends, done),
                            [(v - a) / 1e6 for v, a in zip(data.get(VALIDATED_FIELD, ()), data["_append_micros"]) if v is not None])
        return BatchResult(count, added, written, closed, late)


class LiveConsumer:
    """Reads one events topic and applies it, batch by batch, to :class:`LiveViews`."""

    def __init__(self, client_properties: Mapping[str, str], events_topic: str, views: LiveViews, log_: BatchLog,
                 max_events: int = 5000, replay_timeout: float = 120.0):
        self.topic = events_topic
        self.views = views
        self.log = log_
        self.max_events = max_events
        self.replay_timeout = replay_timeout
        self.consumer = Consumer({
            **client_properties, "group.id": f"fp-live.{events_topic}", "enable.auto.commit": False,
            "enable.auto.offset.store": False, "auto.offset.reset": "earliest", "fetch.wait.max.ms": 50,
            "enable.partition.eof": False,
        })
        self.batches = 0

    def partitions(self, timeout: float = 30.0) -> list[int]:
        metadata = self.consumer.list_topics(self.topic, timeout=timeout)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise ConfigError(f"live: events topic {self.topic!r} does not exist ({topic.error if topic else 'missing'})")
        return sorted(topic.partitions)

    def start(self) -> tuple[int, dict[int, int]]:
        """The next batch id and the position to read from, after replaying a batch the log
        holds as planned but not done."""
        planned = self.log.read()
        partitions = self.partitions()
        if planned is None:  # a first start, or the state was cleared: everything the topic retains
            position = {p: self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30)[0]
                        for p in partitions}
            log.info("live %s: no batch log, starting at the earliest offsets %s", self.topic, position)
            return 0, position
        if not planned.done:
            log.info("live %s: batch %d was planned, not done: applying it again", self.topic, planned.id)
            self.views.apply(planned.id, self.read_range(planned.starts, planned.ends))
            self.log.done(planned)
        position = dict(planned.ends)
        for p in partitions:  # partitions added since
            position.setdefault(p, self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30)[0])
        return planned.id + 1, position

    def read_range(self, starts: Mapping[int, int], ends: Mapping[int, int]) -> dict[str, list[Any]]:
        """Exactly the events at offsets ``[starts[p], ends[p])`` of each partition."""
        wanted = {p: end for p, end in ends.items() if end > starts.get(p, end)}
        self.consumer.assign([TopicPartition(self.topic, p, starts[p]) for p in wanted])
        messages: list[Message] = []
        deadline = time.monotonic() + self.replay_timeout
        try:
            while wanted:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"live {self.topic}: offsets {dict(wanted)} not readable within "
                                       f"{self.replay_timeout:.0f}s (deleted by retention?)")
                for message in self._consume(timeout=0.5):
                    p = message.partition()
                    if p in wanted and message.offset() < wanted[p]:
                        messages.append(message)
                        if message.offset() == wanted[p] - 1:
                            del wanted[p]
        finally:
            self.consumer.unassign()
        return decode_events(messages, self.views.columns)

    def run(self, stop: threading.Event, until: Mapping[int, int] | None = None) -> int:
        """Apply batches until ``stop`` is set or, with ``until``, every partition's position
        reaches it (a drain). Returns the number of batches applied."""
        batch_id, position = self.start()
        self.consumer.assign([TopicPartition(self.topic, p, o) for p, o in position.items()])
        try:
            while not stop.is_set():
                if until is not None and all(position.get(p, 0) >= end for p, end in until.items()):
                    break
                first = self._consume(timeout=0.2, count=1)
                if not first:
                    self.views.metrics.flush_if_due()
                    continue
                messages = first + (self._consume(timeout=0, count=self.max_events - 1) if self.max_events > 1 else [])
                ends = dict(position)
                for message in messages:
                    ends[message.partition()] = max(ends.get(message.partition(), 0), message.offset() + 1)
                batch = PlannedBatch(batch_id, position, ends, False)
                self.log.plan(batch)
                self.views.apply(batch_id, decode_events(messages, self.views.columns))
                self.log.done(batch)
                self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in ends.items()],
                                     asynchronous=True)
                position, batch_id = ends, batch_id + 1
                self.batches += 1
        finally:
            self.consumer.close()
        return self.batches

    def _consume(self, timeout: float, count: int | None = None) -> list[Message]:
        messages = self.consumer.consume(self.max_events if count is None else count, timeout=timeout)
        good = []
        for message in messages:
            error = message.error()
            if error is None:
                good.append(message)
            elif error.fatal() or error.code() != KafkaError._PARTITION_EOF:
                raise KafkaException(error)
        return good


def decode_events(messages: Sequence[Message], columns: Sequence[str]) -> dict[str, list[Any]]:
    """Events-topic messages -> :data:`EVENT_FIELDS`, ``columns`` and :data:`VALIDATED_FIELD`,
    each a list in message order."""
    data: dict[str, list[Any]] = {name: [] for name in (*EVENT_FIELDS, *columns)}
    validated: list[int | None] = []
    for message in messages:
        event = json.loads(message.value())
        for name, values in data.items():
            values.append(event.get(name))
        kind, millis = message.timestamp()
        validated.append(None if kind == TIMESTAMP_NOT_AVAILABLE else millis * 1000)
    data[VALIDATED_FIELD] = validated
    return data
