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
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from confluent_kafka.admin import AdminClient

from pipelines.core.errors import PipelineError
from pipelines.core.settings import LocalPlatformSettings, local_registry_url
from pipelines.local.jars import fetch, fetch_registry

log = logging.getLogger(__name__)


def kraft_cluster_id(draw: Callable[[], bytes] = lambda: uuid.uuid4().bytes) -> str:
    """A KRaft cluster id: 16 random bytes in unpadded base64url (22 characters). Drawn again
    while it starts with ``-``, as Kafka's own ``Uuid.randomUuid`` does: the storage tool would
    read such an id as an option (``--cluster-id: expected one argument``), one start in 64."""
    while True:
        cluster_id = base64.urlsafe_b64encode(draw()).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class PlatformError(PipelineError):
    """A service of the local platform cannot be installed, started or reached."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    detail: str = ""

    def line(self) -> str:
        state = f"running (pid {self.pid})" if self.running else "stopped"
        return f"{self.name:<8} {state:<22} {self.address}  {self.detail}".rstrip()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as stopped.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def find_java() -> str:
    """``$JAVA_HOME/bin/java`` when set, else ``java`` on PATH (Java 17+ for Kafka 4)."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise PlatformError("no Java runtime found (set JAVA_HOME or put java on PATH)")
    return java


def java_version(java_home: Path) -> int | None:
    """The feature version (17, 21, 25, ...) of the JDK or JRE at ``java_home``; None if there is
    no runnable ``bin/java`` there."""
    java = java_home / "bin" / "java"
    if not java.exists():
        return None
    release = java_home / "release"
    text = release.read_text(errors="replace") if release.exists() else ""
    match = re.search(r'^JAVA_VERSION="(\d+)(?:\.(\d+))?', text, re.MULTILINE)
    if not match:
        result = subprocess.run([str(java), "-XshowSettings:properties", "-version"],
                                capture_output=True, text=True)
        match = re.search(r"java\.specification\.version = (\d+)(?:\.(\d+))?", result.stderr)
        if not match:
            return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major  # 1.8 -> 8


def find_jdk(minimum: int, configured: str | None = None) -> Path:
    """A Java home of version ``minimum`` or newer: ``configured`` if given (it must qualify),
    else the newest of ``$JAVA_HOME``, the ``java`` on PATH and the JDKs under ``/usr/lib/jvm``
    and ``/opt/java``. PlatformError naming what was found when none qualifies."""
    if configured:
        version = java_version(Path(configured))
        if version is None or version < minimum:
            raise PlatformError(
                f"local.registry_java_home: {configured} is Java {version or '(no bin/java)'}, need {minimum}+"
            )
        return Path(configured)
    candidates: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path).resolve().parent.parent)
    for folder in (Path("/usr/lib/jvm"), Path("/opt/java")):
        if folder.is_dir():
            candidates += sorted(p for p in folder.iterdir() if p.is_dir())
    found = {home.resolve(): java_version(home) for home in candidates}
    usable = sorted(((v, str(h)) for h, v in found.items() if v is not None and v >= minimum), reverse=True)
    if not usable:
        seen = ", ".join(f"Java {v} at {h}" for h, v in found.items() if v is not None) or "no JDK at all"
        raise PlatformError(
            f"the schema registry needs a Java {minimum}+ JDK; found {seen}. Install one (e.g. "
            f"`apt-get install openjdk-{minimum}-jdk-headless`) or set local.registry_java_home"
        )
    return Path(usable[0][1])


class _Service:
    """A process started by the platform, tracked by a pid file."""

    name = ""

    def __init__(self, root: Path):
        self.root = root
        self.pid_file = root / "service.pid"
        self.log_file = root / "service.out"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def _spawn(self, command: list[str], env: dict[str, str] | None = None) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env, cwd=self.root,
            )
        self.pid_file.write_text(str(process.pid))
        return process.pid

    def stop(self, timeout: float = 60.0) -> None:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        log.info("stopping %s (pid %d)", self.name, pid)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(pid):
            log.warning("%s did not stop within %.0fs: killing it", self.name, timeout)
            os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid):
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class KafkaBroker(_Service):
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
            find_java(), f"-Xmx{self.heap}", f"-Xms{min(256, _megabytes(self.heap))}m",
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
        if _port_open(self.port):
            raise PlatformError(f"port {self.port} is taken by another process: set local.kafka_port")
        fetch("kafka", self.jars_root)
        self._write_config()
        self._format_storage()
        pid = self._spawn(self._java("kafka.Kafka", str(self.properties)))
        log.info("kafka starting (pid %d) on %s", pid, self.bootstrap)

    def healthy(self) -> bool:
        """True once a metadata request to the broker succeeds."""
        if self.pid() is None or not _port_open(self.port):
            return False
        try:
            metadata = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=3)
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False
        return bool(metadata.brokers)


class RedisServer(_Service):
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
        if _port_open(self.port):
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


class SchemaRegistry(_Service):
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
        if _port_open(self.port):
            raise PlatformError(f"port {self.port} is taken by another process: set local.registry_port")
        if _port_open(self.management_port):
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
        if self.pid() is None or not _port_open(self.port):
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/subjects", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False


def ensure_redis_installed() -> str:
    """Path of ``redis-server``; installs Debian's package when missing (needs root)."""
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if binary:
        return binary
    if os.geteuid() != 0:
        raise PlatformError("redis-server is not installed: run `sudo apt-get install -y redis-server`")
    log.info("installing redis-server from Debian's packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise PlatformError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise PlatformError("redis-server still missing after apt-get install")
    return binary


def _megabytes(size: str) -> int:
    units = {"k": 1 / 1024, "m": 1, "g": 1024}
    return int(float(size[:-1]) * units[size[-1].lower()]) if size[-1].lower() in units else int(size) // 2**20


def wait_healthy(service, timeout: float) -> None:
    """Block until ``service`` answers; PlatformError (with its log's tail) if it exits or
    ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not service.healthy():
        if service.pid() is None:
            raise PlatformError(f"{service.name} exited during start-up:\n{service.tail()}")
        if time.monotonic() > deadline:
            raise PlatformError(f"{service.name} not healthy after {timeout:.0f}s:\n{service.tail()}")
        time.sleep(0.5)
    log.info("%s is up", service.name)


class LocalPlatform:
    """Kafka, Redis and the schema registry for local runs and tests, driven by
    :class:`LocalPlatformSettings`."""

    def __init__(self, settings: LocalPlatformSettings, jars_root: Path | None = None,
                 with_registry: bool | None = None):
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
        self.with_registry = settings.registry_enabled if with_registry is None else with_registry

    def up(self, timeout: float = 180.0) -> None:
        """Start what is not running and wait until each answers; idempotent. The registry
        starts once the broker answers (it keeps its schemas there)."""
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

    def down(self) -> None:
        """Stop every service (the registry first, the broker last) and wait for each to exit."""
        for service in (self.registry, self.redis, self.kafka):
            service.stop()

    def status(self) -> list[ServiceStatus]:
        statuses = []
        for service, address in ((self.kafka, self.kafka.bootstrap), (self.redis, self.redis.address),
                                 (self.registry, self.registry.url)):
            pid = service.pid()
            if service is self.registry and pid is None and not self.with_registry:
                continue
            statuses.append(ServiceStatus(service.name, pid is not None, pid, address,
                                          "healthy" if pid and service.healthy() else ""))
        return statuses
