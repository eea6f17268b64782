"""Fixtures every test shares: one SparkSession for the whole run (Delta, the Kafka and Avro
jars, UTC, 2 shuffle partitions) and the test settings (a temporary lake, free loopback ports for
the services). Nothing here starts a service: the unit tests in ``tests/unit`` run with no
broker, Redis or registry. ``tests/integration/conftest.py`` starts the real ones. Nothing
skips: a missing jar or package is a failure of the set-up, reported as such. Helpers that
tests import live in :mod:`tests.support`."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import SparkSession

from pipelines.core.session import build_session
from pipelines.core.settings import PROJECT_ROOT, Settings, load_settings
from pipelines.local.jars import DEFAULT_ROOT as JARS_ROOT
from pipelines.local.jars import fetch
from tests.support import free_ports


@pytest.fixture(scope="session")
def test_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("platform")


@pytest.fixture(scope="session")
def postgres_dir() -> Iterator[Path]:
    """PostgreSQL's folder: outside pytest's temporary root, which only its owner may enter (as
    root, the platform runs PostgreSQL as the postgres user)."""
    folder = Path(tempfile.mkdtemp(prefix="fp-test-postgres-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def base_overrides(test_root: Path, postgres_dir: Path) -> dict[str, Any]:
    kafka_port, controller_port, redis_port, registry_port, management_port, postgres_port, connect_port = free_ports(7)
    return {
        "spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "2g",
                  "jars_dir": str(JARS_ROOT / "spark")},
        "kafka": {"bootstrap_servers": f"127.0.0.1:{kafka_port}"},
        "storage": {"root": str(test_root / "lake")},
        "ingest": {"trigger_interval": "1s"},
        "local": {"root": str(test_root / "services"), "kafka_port": kafka_port,
                  "kafka_controller_port": controller_port, "redis_port": redis_port,
                  "kafka_heap": "768m", "registry_port": registry_port,
                  "registry_management_port": management_port, "postgres_port": postgres_port,
                  "connect_port": connect_port, "postgres_dir": str(postgres_dir)},
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
def spark(settings: Settings) -> Iterator[SparkSession]:
    """The session-wide SparkSession (the integration tests' platform stops it before the broker
    it talks to)."""
    fetch("spark", JARS_ROOT)
    session = build_session(settings.spark)
    yield session
    session.stop()
