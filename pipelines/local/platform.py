"""The embedded local platform: a real Apache Kafka broker (KRaft, single node), Redis and the
Apicurio schema registry on loopback.

Each runs as a plain process of its own, with their data, logs and pid files under one
folder (``local.root``, git-ignored). ``up`` is idempotent (what runs is left running, after a
health check), ``down`` stops every process it started and waits for it to exit, ``status``
says what runs where. Nothing here is a mock: the broker is ``kafka.Kafka`` from Maven Central,
the registry Apicurio's own distribution, keeping its schemas in the broker (``kafkasql``
storage), so that they survive a restart of the registry as Confluent's ``_schemas`` topic does.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from confluent_kafka.admin import AdminClient
from psycopg import sql

from pipelines.core.kafka_connect import debezium_postgres_config, snapshot_signal
from pipelines.core.settings import CdcSettings, LocalPlatformSettings, local_registry_url
from pipelines.local import appdb
from pipelines.local.connect import ConnectWorker
from pipelines.local.jars import fetch, fetch_registry
from pipelines.local.postgres import PostgresServer
from pipelines.local.services import (  # noqa: F401 - PlatformError and the JDK lookups are this module's API too
    PlatformError,
    Service,
    ServiceStatus,
    ensure_debian_package,
    find_java,
    find_jdk,
    java_version,
    megabytes,
    port_open,
    wait_healthy,
)

log = logging.getLogger(__name__)


def kraft_cluster_id(draw: Callable[[], bytes] = lambda: uuid.uuid4().bytes) -> str:
    """A KRaft cluster id: 16 random bytes in unpadded base64url (22 characters). Drawn again
    while it starts with ``-``, as Kafka's own ``Uuid.randomUuid`` does: the storage tool would
    read such an id as an option (``--cluster-id: expected one argument``), one start in 64."""
    while True:
        cluster_id = base64.urlsafe_b64encode(draw()).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def ensure_redis_installed() -> str:
    """Path of ``redis-server``; installs Debian's package when missing (needs root)."""
    return ensure_debian_package("redis-server", ["redis-server", "/usr/bin/redis-server"])


class KafkaBroker(Service):
    """Kafka 4.x in KRaft mode: one process is both broker and controller."""

    name = "kafka"

    def __init__(self, root: Path, port: int, controller_port: int, heap: str, jars_root: Path):
        super().__init__(root / "kafka")
        self.port = port
        self.controller_port = controller_port
        self.heap = heap
        self.jars_root = jars_root
        self.data_dir = self.root / "data"
        self.properties = self.root / "server.properties"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.properties.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={self.data_dir}",
                    # Topics are created by the project's admin code with explicit partitions.
                    "auto.create.topics.enable=false",
                    "num.partitions=4",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "log.retention.hours=-1",
                    "message.max.bytes=10485760",
                    "",
                ]
            )
        )
        (self.root / "log4j2.properties").write_text(
            "\n".join(
                [
                    "status = warn",
                    "appender.file.type = File",
                    "appender.file.name = file",
                    f"appender.file.fileName = {self.root / 'server.log'}",
                    "appender.file.layout.type = PatternLayout",
                    "appender.file.layout.pattern = [%d] %p %m (%c)%n",
                    "rootLogger.level = info",
                    "rootLogger.appenderRef.file.ref = file",
                    "logger.kafka.name = kafka",
                    "logger.kafka.level = info",
                    "logger.apache.name = org.apache.kafka",
                    "logger.apache.level = warn",
                    "",
                ]
            )
        )

    def _java(self, main_class: str, *args: str) -> list[str]:
        return [
            find_java(), f"-Xmx{self.heap}", f"-Xms{min(256, megabytes(self.heap))}m",
            "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
            "-cp", f"{self.jars_root / 'kafka'}/*", main_class, *args,
        ]

    def _format_storage(self) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = kraft_cluster_id()
        log.info("formatting KRaft storage in %s (cluster %s)", self.data_dir, cluster_id)
        result = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.properties)),
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise PlatformError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        if self.pid() is not None:
            return
        if port_open(self.port):
            raise PlatformError(f"port {self.port} is taken by another process: set local.kafka_port")
        fetch("kafka", self.jars_root)
        self._write_config()
        self._format_storage()
        pid = self._spawn(self._java("kafka.Kafka", str(self.properties)))
        log.info("kafka starting (pid %d) on %s", pid, self.bootstrap)

    def healthy(self) -> bool:
        """True once a metadata request to the broker succeeds."""
        if self.pid() is None or not port_open(self.port):
            return False
        try:
            metadata = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=3)
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False
        return bool(metadata.brokers)


class RedisServer(Service):
    name = "redis"

    def __init__(self, root: Path, port: int):
        super().__init__(root / "redis")
        self.port = port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.pid() is not None:
            return
        if port_open(self.port):
            raise PlatformError(f"port {self.port} is taken by another process: set local.redis_port")
        binary = ensure_redis_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        pid = self._spawn(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.root),
             "--daemonize", "no", "--save", "", "--appendonly", "yes", "--protected-mode", "yes"]
        )
        log.info("redis starting (pid %d) on %s", pid, self.address)

    def healthy(self) -> bool:
        if self.pid() is None:
            return False
        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False


class SchemaRegistry(Service):
    """Apicurio Registry 3 with ``kafkasql`` storage on the local broker; clients use its
    Confluent-compatible API (:attr:`url`)."""

    name = "registry"
    #: Apicurio 3 is built for Java 21.
    MINIMUM_JAVA = 21

    def __init__(self, root: Path, port: int, management_port: int, heap: str, bootstrap: str,
                 jars_root: Path, java_home: str | None = None):
        super().__init__(root / "registry")
        self.port = port
        self.management_port = management_port
        self.heap = heap
        self.bootstrap = bootstrap
        self.jars_root = jars_root
        self.java_home = java_home

    @property
    def url(self) -> str:
        """The Confluent-compatible API, as ``schema_registry.url`` names it."""
        return local_registry_url(self.port)

    def start(self) -> None:
        if self.pid() is not None:
            return
        if port_open(self.port):
            raise PlatformError(f"port {self.port} is taken by another process: set local.registry_port")
        if port_open(self.management_port):
            raise PlatformError(f"port {self.management_port} is taken by another process: "
                                "set local.registry_management_port")
        java = find_jdk(self.MINIMUM_JAVA, self.java_home) / "bin" / "java"
        dist = fetch_registry(self.jars_root)
        env = {
            **os.environ,
            "APICURIO_STORAGE_KIND": "kafkasql",
            "APICURIO_KAFKASQL_BOOTSTRAP_SERVERS": self.bootstrap,
            "QUARKUS_HTTP_HOST": "127.0.0.1",
            "QUARKUS_HTTP_PORT": str(self.port),
            # Quarkus's management interface (health, metrics) is built in; by default it takes
            # port 9000 on every interface.
            "QUARKUS_MANAGEMENT_HOST": "127.0.0.1",
            "QUARKUS_MANAGEMENT_PORT": str(self.management_port),
        }
        pid = self._spawn([str(java), f"-Xmx{self.heap}", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
                           "-jar", str(dist / "quarkus-run.jar")], env=env)
        log.info("schema registry starting (pid %d, %s) on %s", pid, java, self.url)

    def healthy(self) -> bool:
        """True once the Confluent API lists subjects (storage loaded from Kafka)."""
        if self.pid() is None or not port_open(self.port):
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/subjects", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False


class LocalPlatform:
    """Kafka, Redis and the schema registry for local runs and tests, with PostgreSQL and a Kafka
    Connect worker for change data capture, driven by :class:`LocalPlatformSettings`."""

    def __init__(self, settings: LocalPlatformSettings, jars_root: Path | None = None,
                 with_registry: bool | None = None, with_cdc: bool | None = None):
        root = Path(settings.root)
        self.root = root
        jars_root = jars_root or root / "jars"
        self.kafka = KafkaBroker(
            root, settings.kafka_port, settings.kafka_controller_port, settings.kafka_heap, jars_root,
        )
        self.redis = RedisServer(root, settings.redis_port)
        self.registry = SchemaRegistry(root, settings.registry_port, settings.registry_management_port,
                                       settings.registry_heap,
                                       self.kafka.bootstrap, jars_root, settings.registry_java_home)
        self.postgres = PostgresServer(Path(settings.postgres_dir) if settings.postgres_dir else root / "postgres",
                                       settings.postgres_port)
        self.connect = ConnectWorker(root, settings.connect_port, settings.connect_heap, self.kafka.bootstrap,
                                     jars_root)
        self.with_registry = settings.registry_enabled if with_registry is None else with_registry
        self.with_cdc = settings.cdc_enabled if with_cdc is None else with_cdc

    def up(self, timeout: float = 180.0) -> None:
        """Start what is not running and wait until each answers; idempotent. The registry
        starts once the broker answers (it keeps its schemas there). Change data capture is
        started apart (:meth:`start_cdc`): it needs the ``cdc`` settings."""
        for service in (self.kafka, self.redis):
            service.start()
        for service in (self.kafka, self.redis):
            wait_healthy(service, timeout)
        if self.with_registry:
            self.start_registry(timeout)

    def start_registry(self, timeout: float = 180.0) -> None:
        """Start the schema registry (the broker must be up) and wait until it answers."""
        self.registry.start()
        wait_healthy(self.registry, timeout)

    def start_cdc(self, cdc: CdcSettings, timeout: float = 180.0) -> None:
        """PostgreSQL with the application's tables, the connector's role and the publication;
        the Connect worker (the broker must be up); the connector registered (idempotent: an
        existing one keeps its offsets) and RUNNING."""
        self.postgres.start()
        wait_healthy(self.postgres, timeout)
        password = self.postgres.cdc_password(cdc.database.password_env)
        self.postgres.bootstrap(cdc.database.dbname, appdb.APP_ROLE, cdc.database.user, password,
                                appdb.ddl(cdc.signal_table),
                                cdc.tables, cdc.publication, cdc.signal_table)
        self.connect.secrets = {cdc.database.password_env: password}
        self.connect.start()
        wait_healthy(self.connect, timeout)
        client = self.connect.client()
        client.put_config(cdc.connector, debezium_postgres_config(cdc))
        client.wait_running(cdc.connector, timeout)
        log.info("connector %s running: %s -> %s.*", cdc.connector, ", ".join(cdc.tables), cdc.topic_prefix)

    def request_snapshot(self, cdc: CdcSettings, tables: Sequence[str]) -> str:
        """Ask the connector for a blocking snapshot of ``tables`` (a row in the signalling
        table, as the application's role); returns the signal's id."""
        signal_id, kind, data = snapshot_signal(cdc, tables)
        with self.postgres.connect(cdc.database.dbname, appdb.APP_ROLE, autocommit=True) as conn:
            conn.execute(sql.SQL("insert into {} (id, type, data) values (%s, %s, %s)").format(
                sql.Identifier(*cdc.signal_table.split(".", 1))), [signal_id, kind, data])
        log.info("snapshot of %s requested from connector %s (signal %s)", ", ".join(tables), cdc.connector, signal_id)
        return signal_id

    def down(self) -> None:
        """Stop every service and wait for each to exit: the Connect worker first (it commits
        its offsets), the broker after the services that use it, PostgreSQL last."""
        for service in (self.connect, self.registry, self.redis, self.kafka, self.postgres):
            service.stop()

    def status(self) -> list[ServiceStatus]:
        statuses = []
        for service, address, wanted in (
            (self.kafka, self.kafka.bootstrap, True), (self.redis, self.redis.address, True),
            (self.registry, self.registry.url, self.with_registry),
            (self.postgres, self.postgres.address, self.with_cdc), (self.connect, self.connect.url, self.with_cdc),
        ):
            pid = service.pid()
            if pid is None and not wanted:
                continue
            statuses.append(ServiceStatus(service.name, pid is not None, pid, address,
                                          "healthy" if pid and service.healthy() else ""))
        return statuses
