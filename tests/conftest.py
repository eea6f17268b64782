"""Test session fixtures: one SparkSession, and the real local platform (Kafka + Redis) started
once on free loopback ports with its data in a temporary folder. Nothing here skips: a missing
jar, package or service is a failure of the set-up, reported as such."""

from __future__ import annotations

import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.config import PROJECT_ROOT, Settings, deep_merge, load_settings, read_yaml
from pipelines.jars import DEFAULT_ROOT as JARS_ROOT
from pipelines.jars import fetch
from pipelines.kafka_admin import TopicSpec, ensure_topics
from pipelines.local.platform import LocalPlatform


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open together while they are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="session")
def test_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("platform")


@pytest.fixture(scope="session")
def base_overrides(test_root: Path) -> dict[str, Any]:
    kafka_port, controller_port, redis_port, registry_port, management_port = _free_ports(5)
    return {
        "spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "2g",
                  "jars_dir": str(JARS_ROOT / "spark")},
        "kafka": {"bootstrap_servers": f"127.0.0.1:{kafka_port}"},
        "storage": {"root": str(test_root / "lake")},
        "ingest": {"trigger_interval": "1s"},
        "local": {"root": str(test_root / "services"), "kafka_port": kafka_port,
                  "kafka_controller_port": controller_port, "redis_port": redis_port,
                  "kafka_heap": "768m", "registry_port": registry_port,
                  "registry_management_port": management_port},
        "redis": {"port": redis_port},
        # Training-set builds are tracked in the test's own MLflow store, never the project's.
        "mlflow": {"tracking_uri": f"sqlite:///{test_root}/mlflow/mlflow.db",
                   "artifact_location": str(test_root / "mlflow" / "artifacts")},
    }


@pytest.fixture(scope="session")
def settings(base_overrides: dict[str, Any]) -> Settings:
    """The local settings, pointed at the test platform's ports and a temporary lake."""
    return load_settings("local", PROJECT_ROOT / "conf", base_overrides)


@pytest.fixture(scope="session")
def platform(settings: Settings) -> Iterator[LocalPlatform]:
    """The real Kafka broker and Redis server, up for the whole test session (the schema
    registry is started by the ``registry`` fixture, for the tests that need it)."""
    fetch("kafka", JARS_ROOT)
    local = LocalPlatform(settings.local, jars_root=JARS_ROOT, with_registry=False)
    local.up()
    try:
        yield local
    finally:
        local.down()  # the registry too, if a test started it


@pytest.fixture(scope="session")
def registry(platform: LocalPlatform) -> LocalPlatform:
    """The real Apicurio schema registry on the test broker (``schema_registry.url`` of the
    test settings points at it); started once, on first use."""
    platform.start_registry()
    return platform


@pytest.fixture(scope="session")
def spark(settings: Settings, platform: LocalPlatform):
    """The session-wide SparkSession (stopped before the platform, whose broker it talks to)."""
    from pipelines.session import build_session

    fetch("spark", JARS_ROOT)
    session = build_session(settings.spark)
    yield session
    session.stop()


def _isolation(base_overrides: dict[str, Any], folder: Path):
    """Build settings with fresh topics and a fresh lake under ``folder``.

    ``make(partitions=2, conf=None, **overrides)`` returns settings (from the ``conf`` folder,
    default the project's) whose ``transactions`` and ``labels`` topics are new, uniquely named topics (created, with their DLQ topics), whose storage root is
    ``folder/lake`` and whose Redis namespace is their own.
    """

    overrides_by_root: dict[str, tuple[Path, dict[str, Any]]] = {}

    def make(partitions: int = 2, conf: Path | None = None, **overrides: Any) -> Settings:
        suffix = uuid.uuid4().hex[:8]
        tx, lb = f"transactions_{suffix}", f"labels_{suffix}"
        tree = deep_merge(
            base_overrides,
            {
                "kafka": {"topics": {tx: {"contract": "transactions", "partitions": partitions,
                                          "replication_factor": 1},
                                     lb: {"contract": "labels", "partitions": partitions,
                                          "replication_factor": 1}}},
                "ingest": {"topics": [tx, lb]},
                "storage": {"root": str(folder / "lake")},
                # Tests share one Redis: each its own keys, so newer-wins never spans two tests.
                "redis": {"namespace": f"test-{suffix}"},
            },
        )
        tree = deep_merge(tree, overrides)
        conf = conf or PROJECT_ROOT / "conf"
        made = load_settings("local", conf, tree)
        overrides_by_root[made.storage.root] = (conf, tree)
        specs = []
        for name in (tx, lb):
            specs += [TopicSpec(name, partitions, 1), TopicSpec(made.kafka.dlq_topic_for(name), partitions, 1)]
        ensure_topics(made.kafka.client_properties(), specs)
        return made

    def conf_dir(made: Settings, dest: Path) -> Path:
        """A conf folder whose ``local`` environment is ``made``: for jobs run as subprocesses."""
        source, tree = overrides_by_root[made.storage.root]
        shutil.copytree(source, dest)
        local = deep_merge(read_yaml(dest / "local.yaml"), tree)
        (dest / "local.yaml").write_text(yaml.safe_dump(local))
        return dest

    make.conf_dir = conf_dir
    return make


@pytest.fixture
def isolated(settings: Settings, base_overrides: dict[str, Any], platform: LocalPlatform, tmp_path: Path):
    """Isolated settings for one test (see :func:`_isolation`), under the test's ``tmp_path``."""
    return _isolation(base_overrides, tmp_path)


@pytest.fixture(scope="module")
def isolated_module(settings: Settings, base_overrides: dict[str, Any], platform: LocalPlatform,
                    tmp_path_factory: pytest.TempPathFactory):
    """The same for data that several tests of one module share (built once per module)."""
    return _isolation(base_overrides, tmp_path_factory.mktemp("module"))


def topic_names(settings: Settings) -> dict[str, str]:
    """Logical generator topic -> the isolated test topic."""
    tx, lb = settings.ingest.topics
    return {"transactions": tx, "labels": lb}
