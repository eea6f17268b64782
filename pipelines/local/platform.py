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
import importlib.util
import json
import logging
import os
import re
import subprocess
import time
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
    stop_together,
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
    """Kafka 4.x in KRaft mode: one process is both broker and controller; alone (single mode)
    or one node of a cluster whose controllers form the quorum (``voters``)."""

    name = "kafka"

    def __init__(self, root: Path, port: int, controller_port: int, heap: str, jars_root: Path,
                 node_id: int = 1, voters: Sequence[tuple[int, int]] = (), folder: str = "kafka"):
        super().__init__(root / folder)
        self.name = folder
        self.port = port
        self.controller_port = controller_port
        self.heap = heap
        self.jars_root = jars_root
        self.node_id = node_id
        #: (node id, controller port) of every node of the quorum; alone: this node's.
        self.voters = tuple(voters) or ((node_id, controller_port),)
        self.data_dir = self.root / "data"
        self.properties = self.root / "server.properties"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # A cluster replicates every internal topic on all its nodes and acknowledges a write of
        # acks=all once two have it (one node may be down); alone, there is one copy of each.
        replicas = len(self.voters)
        min_insync = min(2, replicas)
        voters = ",".join(f"{node}@127.0.0.1:{port}" for node, port in self.voters)
        self.properties.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    f"node.id={self.node_id}",
                    f"controller.quorum.voters={voters}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={self.data_dir}",
                    # Topics are created by the project's admin code with explicit partitions.
                    "auto.create.topics.enable=false",
                    "num.partitions=4",
                    f"default.replication.factor={replicas}",
                    f"min.insync.replicas={min_insync}",
                    # A replica that was out of sync never becomes leader: no acknowledged write lost.
                    "unclean.leader.election.enable=false",
                    f"offsets.topic.replication.factor={replicas}",
                    f"transaction.state.log.replication.factor={replicas}",
                    f"transaction.state.log.min.isr={min_insync}",
                    f"share.coordinator.state.topic.replication.factor={replicas}",
                    f"share.coordinator.state.topic.min.isr={min_insync}",
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

    def cluster_id(self) -> str | None:
        """The KRaft cluster id this node's storage was formatted with; None before it was."""
        meta = self.data_dir / "meta.properties"
        if not meta.exists():
            return None
        match = re.search(r"^cluster\.id=(.+)$", meta.read_text(), re.MULTILINE)
        return match.group(1).strip() if match else None

    def _format_storage(self, cluster_id: str) -> None:
        if self.cluster_id() is not None:
            return
        log.info("formatting KRaft storage in %s (cluster %s)", self.data_dir, cluster_id)
        result = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.properties)),
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise PlatformError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def start(self, cluster_id: str | None = None) -> None:
        """Start the node (formatting its storage first with ``cluster_id``, a new one if None,
        when it has none); nothing if it runs."""
        if self.pid() is not None:
            return
        if port_open(self.port):
            raise PlatformError(f"port {self.port} is taken by another process: set local.kafka_port "
                                "(cluster mode: local.cluster_kafka_ports)")
        fetch("kafka", self.jars_root)
        self._write_config()
        self._format_storage(cluster_id or self.cluster_id() or kraft_cluster_id())
        pid = self._spawn(self._java("kafka.Kafka", str(self.properties)))
        log.info("%s starting (pid %d) on %s", self.name, pid, self.bootstrap)

    def healthy(self) -> bool:
        """True once a metadata request to this node succeeds and names it among the brokers."""
        return self.node_id in self.brokers()

    def brokers(self) -> set[int]:
        """The node ids of the brokers this node knows to be up; empty if it does not answer."""
        if self.pid() is None or not port_open(self.port):
            return set()
        try:
            metadata = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=3)
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return set()
        return set(metadata.brokers)


def kafka_cluster_id(nodes: Sequence[KafkaBroker]) -> str:
    """The cluster id every node must be formatted with: the one a node already has (they agree,
    or the platform's data is from two clusters), else a new one."""
    found = {node.cluster_id() for node in nodes} - {None}
    if len(found) > 1:
        raise PlatformError(f"the Kafka nodes' storage belongs to different clusters ({', '.join(sorted(found))}): "
                            "`python -m pipelines.local reset` deletes it")
    return found.pop() if found else kraft_cluster_id()


class RedisServer(Service):
    """A Redis server; alone, or a node of a Redis Cluster (``cluster_node_timeout_ms``: how long
    the others wait on it before its replica takes over)."""

    name = "redis"

    def __init__(self, root: Path, port: int, folder: str = "redis", cluster_node_timeout_ms: int | None = None):
        super().__init__(root / folder)
        self.name = folder
        self.port = port
        self.cluster_node_timeout_ms = cluster_node_timeout_ms

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def bus_port(self) -> int:
        """A cluster node's port for the other nodes (Redis's fixed offset)."""
        return self.port + 10000

    def start(self) -> None:
        if self.pid() is not None:
            return
        # A cluster node also listens on its cluster bus port, its port + 10000.
        for port in (self.port, *((self.bus_port,) if self.cluster_node_timeout_ms is not None else ())):
            if port_open(port):
                raise PlatformError(f"port {port} is taken by another process: set local.redis_port "
                                    "(cluster mode: local.cluster_redis_ports, each port and port + 10000 free)")
        binary = ensure_redis_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        command = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.root),
                   "--daemonize", "no", "--save", "", "--appendonly", "yes", "--protected-mode", "yes"]
        if self.cluster_node_timeout_ms is not None:
            # nodes.conf (in --dir) keeps the node's id and view of the cluster across restarts.
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(self.cluster_node_timeout_ms),
                        # A replica's first sync starts at once, not after Redis's 5 s default delay.
                        "--repl-diskless-sync-delay", "0"]
        pid = self._spawn(command)
        log.info("%s starting (pid %d) on %s", self.name, pid, self.address)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def healthy(self) -> bool:
        if self.pid() is None:
            return False
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def cluster_info(self) -> dict[str, str]:
        """``CLUSTER INFO`` of this node (cluster_state, cluster_slots_assigned, ...)."""
        return {k: str(v) for k, v in self.client().cluster("INFO").items()}

    def role(self) -> str:
        """``master`` or ``slave``, as the node says of itself."""
        return self.client().execute_command("ROLE")[0].decode()


def form_redis_cluster(nodes: Sequence[RedisServer], timeout: float = 60.0) -> None:
    """Make ``nodes`` (running, cluster-enabled) one Redis Cluster, half of them masters with a
    replica each (``redis-cli --cluster create``), unless they already are one (a restart keeps
    it, in each node's nodes.conf); then wait until every node says the cluster is ok and every
    master has its replica."""
    first = nodes[0]
    if int(first.cluster_info().get("cluster_slots_assigned", 0)) == 0:
        cli = ensure_debian_package("redis-tools", ["redis-cli", "/usr/bin/redis-cli"])
        command = [cli, "--cluster", "create", *(node.address for node in nodes), "--cluster-replicas", "1",
                   "--cluster-yes"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise PlatformError(f"creating the Redis Cluster failed:\n{result.stdout}{result.stderr}")
        log.info("Redis Cluster formed of %s", ", ".join(node.address for node in nodes))
    deadline = time.monotonic() + timeout
    while not redis_cluster_ready(nodes):
        if time.monotonic() > deadline:
            raise PlatformError("the Redis Cluster is not ok after %.0fs: %s" % (
                timeout, "; ".join(f"{n.address} {n.cluster_info().get('cluster_state')}" for n in nodes)))
        time.sleep(0.5)


def redis_cluster_ready(nodes: Sequence[RedisServer]) -> bool:
    """Every node says ``cluster_state:ok`` with every slot served and knows every other; half
    of them are masters and each other one a replica whose link to its master is up."""
    try:
        masters = 0
        for node in nodes:
            info = node.cluster_info()
            if (info.get("cluster_state"), info.get("cluster_slots_ok"), info.get("cluster_known_nodes")) != \
                    ("ok", "16384", str(len(nodes))):
                return False
            if node.role() == "master":
                masters += 1
            elif node.client().info("replication").get("master_link_status") != "up":
                return False
        return masters * 2 == len(nodes)
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


def spark_home() -> Path:
    """The pip-installed pyspark's folder: it holds ``bin/spark-class`` and Spark's jars (found
    without importing pyspark: the platform's command loads no Spark)."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or spec.origin is None:
        raise PlatformError("pyspark is not installed: cluster mode runs Spark's master and workers from it")
    return Path(spec.origin).resolve().parent


class SparkMaster(Service):
    """Spark standalone's master (``spark://127.0.0.1:<port>``), its web UI's JSON on ``ui_port``."""

    name = "spark-master"

    def __init__(self, root: Path, port: int, ui_port: int):
        super().__init__(root / "spark-master")
        self.port = port
        self.ui_port = ui_port

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def _env(self, root: Path) -> dict[str, str]:
        """The environment of the master and of each worker (``root``: its folder), and so of the
        executors a worker starts: loopback only (without SPARK_LOCAL_IP they listen on every
        interface and name the machine's address), scratch space and logs in ``root``, warnings
        and errors only, no REST submission server (it takes port 6066, or the next free one)."""
        conf = self.root.parent / "spark-conf"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "log4j2.properties").write_text(
            "rootLogger.level = warn\nrootLogger.appenderRef.stdout.ref = console\n"
            "appender.console.type = Console\nappender.console.name = console\nappender.console.target = SYSTEM_ERR\n"
            "appender.console.layout.type = PatternLayout\n"
            "appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex\n")
        (root / "local").mkdir(parents=True, exist_ok=True)
        return {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_CONF_DIR": str(conf),
                "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOCAL_DIRS": str(root / "local"),
                "SPARK_LOG_DIR": str(root), "SPARK_NO_DAEMONIZE": "1",
                "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false"}

    def start(self) -> None:
        if self.pid() is not None:
            return
        for port, key in ((self.port, "spark_master_port"), (self.ui_port, "spark_master_ui_port")):
            if port_open(port):
                raise PlatformError(f"port {port} is taken by another process: set local.{key}")
        pid = self._spawn([str(spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master",
                           "--host", "127.0.0.1", "--port", str(self.port), "--webui-port", str(self.ui_port)],
                          env=self._env(self.root))
        log.info("spark master starting (pid %d) on %s", pid, self.url)

    def state(self) -> dict:
        """The master's state as its web UI's JSON has it (workers, applications); {} if it does
        not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=2) as response:
                return json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    def alive_workers(self) -> int:
        return sum(worker.get("state") == "ALIVE" for worker in self.state().get("workers", []))

    def healthy(self) -> bool:
        return self.pid() is not None and self.state().get("status") == "ALIVE"


class SparkWorker(Service):
    """A Spark standalone worker of ``master``: runs the executors the master gives it."""

    def __init__(self, root: Path, index: int, master: SparkMaster, ui_port: int, cores: int, memory: str):
        super().__init__(root / f"spark-worker-{index}")
        self.name = f"spark-worker-{index}"
        self.master = master
        self.ui_port = ui_port
        self.cores = cores
        self.memory = memory

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    def start(self) -> None:
        if self.pid() is not None:
            return
        if port_open(self.ui_port):
            raise PlatformError(f"port {self.ui_port} is taken by another process: set local.spark_worker_ui_port")
        work = self.root / "work"
        work.mkdir(parents=True, exist_ok=True)
        pid = self._spawn([str(spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.worker.Worker",
                           self.master.url, "--host", "127.0.0.1", "--cores", str(self.cores), "--memory", self.memory,
                           "--webui-port", str(self.ui_port), "--work-dir", str(work)],
                          env=self.master._env(self.root))
        log.info("%s starting (pid %d): %d cores, %s", self.name, pid, self.cores, self.memory)

    def healthy(self) -> bool:
        """True once the master lists this worker (by its web UI port) as alive."""
        if self.pid() is None:
            return False
        return any(w.get("state") == "ALIVE" and w.get("webuiaddress", "").endswith(f":{self.ui_port}")
                   for w in self.master.state().get("workers", []))


class LocalPlatform:
    """Kafka, Redis and the schema registry for local runs and tests, with PostgreSQL and a Kafka
    Connect worker for change data capture, driven by :class:`LocalPlatformSettings`."""

    def __init__(self, settings: LocalPlatformSettings, jars_root: Path | None = None,
                 with_registry: bool | None = None, with_cdc: bool | None = None):
        root = Path(settings.root)
        self.root = root
        self.clustered = settings.clustered
        jars_root = jars_root or root / "jars"
        if self.clustered:
            voters = [(i + 1, port) for i, port in enumerate(settings.cluster_kafka_controller_ports)]
            self.kafka_nodes = [
                KafkaBroker(root, port, controller, settings.cluster_kafka_heap, jars_root, node_id=node,
                            voters=voters, folder=f"kafka-{node}")
                for (node, controller), port in zip(voters, settings.cluster_kafka_ports)
            ]
            timeout_ms = int(settings.cluster_redis_node_timeout.total_seconds() * 1000)
            self.redis_nodes = [RedisServer(root, port, folder=f"redis-{i + 1}", cluster_node_timeout_ms=timeout_ms)
                                for i, port in enumerate(settings.cluster_redis_ports)]
            master = SparkMaster(root, settings.spark_master_port, settings.spark_master_ui_port)
            self.spark_master: SparkMaster | None = master if settings.spark_workers else None
            self.spark_workers = [
                SparkWorker(root, i + 1, master, settings.spark_worker_ui_port + i,
                            settings.spark_worker_cores, settings.spark_worker_memory)
                for i in range(settings.spark_workers)
            ]
        else:
            self.kafka_nodes = [KafkaBroker(root, settings.kafka_port, settings.kafka_controller_port,
                                            settings.kafka_heap, jars_root)]
            self.redis_nodes = [RedisServer(root, settings.redis_port)]
            self.spark_master, self.spark_workers = None, []
        #: The first node of each (the only one in single mode).
        self.kafka, self.redis = self.kafka_nodes[0], self.redis_nodes[0]
        self.bootstrap = ",".join(node.bootstrap for node in self.kafka_nodes)
        self.registry = SchemaRegistry(root, settings.registry_port, settings.registry_management_port,
                                       settings.registry_heap,
                                       self.bootstrap, jars_root, settings.registry_java_home)
        self.postgres = PostgresServer(Path(settings.postgres_dir) if settings.postgres_dir else root / "postgres",
                                       settings.postgres_port)
        self.connect = ConnectWorker(root, settings.connect_port, settings.connect_heap, self.bootstrap, jars_root)
        self.with_registry = settings.registry_enabled if with_registry is None else with_registry
        self.with_cdc = settings.cdc_enabled if with_cdc is None else with_cdc

    @property
    def core_services(self) -> list[Service]:
        """What ``up`` starts: the Kafka nodes, the Redis nodes, and in cluster mode Spark's
        master and workers."""
        spark = [self.spark_master, *self.spark_workers] if self.spark_master else []
        return [*self.kafka_nodes, *self.redis_nodes, *spark]

    def up(self, timeout: float = 180.0) -> None:
        """Start what is not running and wait until each answers; idempotent. The registry
        starts once the broker answers (it keeps its schemas there). Change data capture is
        started apart (:meth:`start_cdc`): it needs the ``cdc`` settings. In cluster mode, the
        Kafka nodes (formatted with one cluster id) must all be registered brokers and the
        Redis nodes one cluster before it returns; Spark's workers start once the master answers."""
        cluster_id = kafka_cluster_id(self.kafka_nodes)
        for node in self.kafka_nodes:
            node.start(cluster_id)
        for service in self.redis_nodes:
            service.start()
        if self.spark_master is not None:
            self.spark_master.start()
        for service in [*self.kafka_nodes, *self.redis_nodes]:
            wait_healthy(service, timeout)
        if self.clustered:
            self.wait_kafka_brokers(timeout)
            form_redis_cluster(self.redis_nodes, timeout)
        if self.spark_master is not None:
            wait_healthy(self.spark_master, timeout)
            for worker in self.spark_workers:
                worker.start()
            for worker in self.spark_workers:
                wait_healthy(worker, timeout)
        if self.with_registry:
            self.start_registry(timeout)

    def wait_kafka_brokers(self, timeout: float = 180.0) -> None:
        """Block until every Kafka node is a broker the others know (a topic replicated on all of
        them can be created)."""
        wanted = {node.node_id for node in self.kafka_nodes}
        deadline = time.monotonic() + timeout
        while not all(node.brokers() >= wanted for node in self.kafka_nodes):
            if time.monotonic() > deadline:
                raise PlatformError(f"the Kafka nodes do not all see each other after {timeout:.0f}s: "
                                    + "; ".join(f"{n.name} sees {sorted(n.brokers())}" for n in self.kafka_nodes))
            time.sleep(0.5)

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
        its offsets), Spark's workers before its master, the brokers after the services that
        use them, PostgreSQL last."""
        for group in ([self.connect], [self.registry], self.spark_workers,
                      [self.spark_master] if self.spark_master else [], self.redis_nodes, self.kafka_nodes, [self.postgres]):
            stop_together(group)

    @property
    def all_services(self) -> list[Service]:
        return [*self.core_services, self.registry, self.postgres, self.connect]

    def status(self) -> list[ServiceStatus]:
        statuses = []
        addresses: list[tuple[Service, str, bool]] = [
            *((node, node.bootstrap, True) for node in self.kafka_nodes),
            *((node, node.address, True) for node in self.redis_nodes),
        ]
        if self.spark_master is not None:
            addresses += [(self.spark_master, self.spark_master.url, True),
                          *((worker, worker.address, True) for worker in self.spark_workers)]
        addresses += [(self.registry, self.registry.url, self.with_registry),
                      (self.postgres, self.postgres.address, self.with_cdc), (self.connect, self.connect.url, self.with_cdc)]
        for service, address, wanted in addresses:
            pid = service.pid()
            if pid is None and not wanted:
                continue
            statuses.append(ServiceStatus(service.name, pid is not None, pid, address,
                                          "healthy" if pid and service.healthy() else ""))
        return statuses
