"""The local platform: idempotent up, truthful status, topics created with explicit partitions."""

from __future__ import annotations

from confluent_kafka.admin import AdminClient

from pipelines.kafka_admin import TopicSpec, ensure_topics


def test_up_twice_keeps_the_same_processes(platform):
    before = [s.pid for s in platform.status()]
    platform.up()
    assert [s.pid for s in platform.status()] == before


def test_status_reports_both_services_healthy(platform, settings):
    assert [(s.name, s.running, s.detail, s.address) for s in platform.status()] == [
        ("kafka", True, "healthy", f"127.0.0.1:{settings.local.kafka_port}"),
        ("redis", True, "healthy", f"127.0.0.1:{settings.local.redis_port}"),
    ]


def test_topics_are_created_with_their_partitions_and_not_twice(platform, settings):
    props = settings.kafka.client_properties()
    specs = [TopicSpec("platform_probe", 3, 1)]
    assert ensure_topics(props, specs) == ["platform_probe"]
    assert ensure_topics(props, specs) == []
    assert len(AdminClient(props).list_topics(timeout=10).topics["platform_probe"].partitions) == 3


def test_broker_does_not_auto_create_topics(platform, settings):
    from confluent_kafka import Producer

    producer = Producer({**settings.kafka.client_properties(), "message.timeout.ms": 4000})
    errors = []
    producer.produce("never_declared", b"x", on_delivery=lambda err, msg: errors.append(err))
    producer.flush(15)
    assert errors and errors[0] is not None
    assert "never_declared" not in AdminClient(settings.kafka.client_properties()).list_topics(timeout=10).topics
