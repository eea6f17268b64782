"""Fixtures of the integration tests: the real local platform (Kafka KRaft and Redis; the Apicurio
registry, PostgreSQL and Kafka Connect for the tests that ask for them) started once per session
on free loopback ports with its data in a temporary folder, and isolated topics, lake and Redis
namespace per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import SparkSession

from pipelines.core.settings import PROJECT_ROOT, Settings, load_settings
from pipelines.local.jars import DEFAULT_ROOT as JARS_ROOT
from pipelines.local.jars import fetch
from pipelines.local.platform import LocalPlatform
from tests.support import cluster_overrides, isolation


@pytest.fixture(scope="session")
def platform(settings: Settings) -> Iterator[LocalPlatform]:
    """The real Kafka broker and Redis server, up for the whole test session (the schema
    registry is started by the ``registry`` fixture, for the tests that need it)."""
    fetch("kafka", JARS_ROOT)
    local = LocalPlatform(settings.local, jars_root=JARS_ROOT, with_registry=False, with_cdc=False)
    local.up()
    try:
        yield local
    finally:
        # Spark first: its Kafka clients would otherwise wait on a broker that is gone.
        active = SparkSession.getActiveSession()
        if active is not None:
            active.stop()
        local.down()  # the registry too, if a test started it


@pytest.fixture(scope="session")
def registry(platform: LocalPlatform) -> LocalPlatform:
    """The real Apicurio schema registry on the test broker (``schema_registry.url`` of the
    test settings points at it); started once, on first use."""
    platform.start_registry()
    return platform


@pytest.fixture(scope="session")
def cdc(platform: LocalPlatform, settings: Settings) -> LocalPlatform:
    """PostgreSQL with the application's tables, and the Kafka Connect worker with the session's
    Debezium connector (``settings.cdc``) registered and running; started once, on first use."""
    platform.with_cdc = True
    platform.start_cdc(settings.cdc)
    return platform


@pytest.fixture
def isolated(settings: Settings, base_overrides: dict[str, Any], platform: LocalPlatform, tmp_path: Path):
    """Isolated settings for one test (see :func:`tests.support.isolation`), under its ``tmp_path``."""
    return isolation(base_overrides, tmp_path)


@pytest.fixture(scope="module")
def isolated_module(settings: Settings, base_overrides: dict[str, Any], platform: LocalPlatform,
                    tmp_path_factory: pytest.TempPathFactory):
    """The same for data that several tests of one module share (built once per module)."""
    return isolation(base_overrides, tmp_path_factory.mktemp("module"))




@pytest.fixture(scope="module")
def cluster_overrides_module(base_overrides: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return cluster_overrides(base_overrides, tmp_path_factory.mktemp("cluster"))


@pytest.fixture(scope="module")
def cluster(cluster_overrides_module: dict[str, Any], platform: LocalPlatform) -> Iterator[LocalPlatform]:
    """The local platform in cluster mode (three Kafka nodes, a Redis Cluster of 3 masters and 3
    replicas, Spark standalone with 2 workers), beside the single-node one; started on first use,
    stopped after the module's last test (its dozen idle processes would take a tenth of a core
    from every test after it)."""
    settings = load_settings("local", PROJECT_ROOT / "conf", cluster_overrides_module)
    assert settings.local is not None and settings.local.clustered
    local = LocalPlatform(settings.local, jars_root=JARS_ROOT, with_registry=False, with_cdc=False)
    local.up()
    try:
        yield local
    finally:
        local.down()


@pytest.fixture
def isolated_cluster(cluster_overrides_module: dict[str, Any], cluster: LocalPlatform, tmp_path: Path):
    """:func:`isolated`, on the cluster: topics replicated on its three nodes, Redis Cluster,
    jobs run on its Spark master."""
    return isolation(cluster_overrides_module, tmp_path)
