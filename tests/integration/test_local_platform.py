"""The local platform: idempotent up, truthful status, topics created with explicit partitions."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.local.platform import PlatformError, find_jdk, java_version


def test_up_twice_keeps_the_same_processes(platform):
    before = [s.pid for s in platform.status()]
    platform.up()
    assert [s.pid for s in platform.status()] == before


def test_status_reports_every_service_healthy(registry, settings):
    assert [(s.name, s.running, s.detail, s.address) for s in registry.status()
            if s.name in ("kafka", "redis", "registry")] == [
        ("kafka", True, "healthy", f"127.0.0.1:{settings.local.kafka_port}"),
        ("redis", True, "healthy", f"127.0.0.1:{settings.local.redis_port}"),
        ("registry", True, "healthy", f"http://127.0.0.1:{settings.local.registry_port}/apis/ccompat/v7"),
    ]
    assert settings.schema_registry.url == registry.registry.url


def fake_java_home(folder: Path, version: str) -> Path:
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "java").write_text("#!/bin/sh\n")
    (folder / "release").write_text(f'JAVA_VERSION="{version}"\n')
    return folder


def test_java_versions_are_read_from_the_release_file(tmp_path):
    assert java_version(fake_java_home(tmp_path / "jdk25", "25.0.3")) == 25
    assert java_version(fake_java_home(tmp_path / "jdk8", "1.8.0_392")) == 8
    assert java_version(tmp_path / "nothing") is None


def test_a_configured_jdk_older_than_21_is_refused_by_name(tmp_path):
    home = fake_java_home(tmp_path / "jdk17", "17.0.13")
    with pytest.raises(PlatformError, match=f"local.registry_java_home: {home} is Java 17, need 21\\+"):
        find_jdk(21, str(home))


def test_the_newest_jdk_21_or_later_on_the_machine_is_found():
    home = find_jdk(21)
    assert java_version(home) >= 21


def test_topics_are_created_with_their_partitions_and_not_twice(platform, settings):
    props = settings.kafka.client_properties()
    specs = [TopicSpec("platform_probe", 3, 1)]
    assert ensure_topics(props, specs) == ["platform_probe"]
    assert ensure_topics(props, specs) == []
    assert len(AdminClient(props).list_topics(timeout=10).topics["platform_probe"].partitions) == 3


def test_broker_does_not_auto_create_topics(platform, settings):
    producer = Producer({**settings.kafka.client_properties(), "message.timeout.ms": 4000})
    errors = []
    producer.produce("never_declared", b"x", on_delivery=lambda err, msg: errors.append(err))
    producer.flush(15)
    assert errors and errors[0] is not None
    assert "never_declared" not in AdminClient(settings.kafka.client_properties()).list_topics(timeout=10).topics
