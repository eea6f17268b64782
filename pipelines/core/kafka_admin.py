"""Topic administration: the platform's topics are created here, with explicit partitions."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pipelines.core.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    #: The topic's ``min.insync.replicas``; None: the broker's default.
    min_insync_replicas: int | None = None

    def config(self) -> dict[str, str]:
        return {} if self.min_insync_replicas is None else {"min.insync.replicas": str(self.min_insync_replicas)}


def platform_topics(kafka: KafkaSettings) -> list[TopicSpec]:
    """Every configured topic and its dead-letter topic (same partitions and replication)."""
    specs = []
    for name, topic in kafka.topics.items():
        for topic_name in (name, kafka.dlq_topic_for(name)):
            specs.append(TopicSpec(topic_name, topic.partitions, topic.replication_factor, topic.min_insync_replicas))
    return specs


def ensure_topics(client_properties: Mapping[str, str], specs: list[TopicSpec], timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist; returns the names created.

    An existing topic with fewer partitions than declared is an error (keys would map to
    different partitions than the contract expects); more partitions are accepted as is.
    Returns once every created topic's partitions have a leader and all their replicas in sync,
    as the brokers' metadata says: the controller acknowledges a creation before the brokers
    know of it, and a producer or reader started in between sees an unknown topic (or, in a
    cluster, partitions without replicas yet). A topic not ready within ``timeout`` is an error.
    """
    admin = AdminClient(dict(client_properties))
    existing = admin.list_topics(timeout=timeout).topics
    for spec in specs:
        if spec.name in existing and len(existing[spec.name].partitions) < spec.partitions:
            raise RuntimeError(
                f"topic {spec.name!r} has {len(existing[spec.name].partitions)} partitions, "
                f"the configuration declares {spec.partitions}"
            )
    missing = [s for s in specs if s.name not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication_factor, config=s.config())
         for s in missing],
        operation_timeout=timeout,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    _wait_ready(admin, [s for s in missing if s.name in created], timeout)
    log.info("created topics: %s", ", ".join(created) or "none")
    return created


def _wait_ready(admin: AdminClient, specs: list[TopicSpec], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = {s.name: s for s in specs}
    while pending:
        for name in list(pending):
            topic = admin.list_topics(name, timeout=max(1.0, deadline - time.monotonic())).topics.get(name)
            if topic is None or topic.error is not None:
                continue
            partitions = topic.partitions.values()
            if len(partitions) >= pending[name].partitions and all(
                    p.leader >= 0 and len(p.replicas) == pending[name].replication_factor
                    and len(p.isrs) == len(p.replicas) for p in partitions):
                del pending[name]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"topics not ready {timeout:.0f} s after their creation (no leader or replicas "
                               f"out of sync): {', '.join(sorted(pending))}")
        if pending:
            time.sleep(0.1)


def topic_offsets(client_properties: Mapping[str, str], topic: str, timeout: float = 30.0) -> dict[int, tuple[int, int]]:
    """Partition -> (earliest, latest) offset of ``topic``: latest - earliest records are readable."""
    consumer = Consumer({**client_properties, "group.id": "feature-platform-offsets", "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            raise RuntimeError(f"topic {topic!r} does not exist")
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            for p in sorted(metadata.topics[topic].partitions)
        }
    finally:
        consumer.close()


def offsets_for_times(client_properties: Mapping[str, str], topic: str, timestamps_ms: Mapping[int, int],
                      timeout: float = 30.0) -> dict[int, int]:
    """Partition -> the first offset whose record timestamp is at or after that partition's
    timestamp in ``timestamps_ms`` (-1 where no record is that recent)."""
    consumer = Consumer({**client_properties, "group.id": "feature-platform-offsets", "enable.auto.commit": False})
    try:
        wanted = [TopicPartition(topic, p, millis) for p, millis in sorted(timestamps_ms.items())]
        return {tp.partition: tp.offset for tp in consumer.offsets_for_times(wanted, timeout=timeout)}
    finally:
        consumer.close()
