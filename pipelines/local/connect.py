"""The local platform's Kafka Connect worker: distributed mode with one worker, its configs,
offsets and status in the local broker (``_connect-*`` topics), Debezium's PostgreSQL connector
as a plugin beside it.

Distributed rather than standalone: the offsets live in Kafka next to the data they describe
(wiping one without the other cannot happen by accident), connectors are managed over the same
REST API as a production Connect cluster, and exactly-once source delivery (KIP-618) exists only
in this mode. The worker resolves ``${env:...}`` in connector configs from its own environment
(``EnvVarConfigProvider``): the database password is handed to it that way, never written to a
config Connect stores.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipelines.core.kafka_connect import ConnectClient
from pipelines.core.settings import local_connect_url
from pipelines.local.jars import bundle_folder, fetch
from pipelines.local.services import PlatformError, Service, find_java, megabytes, port_open

log = logging.getLogger(__name__)


class ConnectWorker(Service):
    """``org.apache.kafka.connect.cli.ConnectDistributed`` on loopback, with Debezium's plugin."""

    name = "connect"

    def __init__(self, root: Path, port: int, heap: str, bootstrap: str, jars_root: Path):
        super().__init__(root / "connect")
        self.port = port
        self.heap = heap
        self.bootstrap = bootstrap
        self.jars_root = jars_root
        self.properties = self.root / "worker.properties"
        #: Environment variables the worker gets besides the platform's own (secrets that
        #: connector configs name as ``${env:...}``).
        self.secrets: dict[str, str] = {}

    @property
    def url(self) -> str:
        return local_connect_url(self.port)

    def client(self) -> ConnectClient:
        return ConnectClient(self.url)

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        plugins = bundle_folder("debezium-postgres", self.jars_root).parent
        self.properties.write_text("\n".join([
            f"bootstrap.servers={self.bootstrap}",
            "group.id=fp-local-connect",
            f"listeners=http://127.0.0.1:{self.port}",
            "rest.advertised.host.name=127.0.0.1",
            f"plugin.path={plugins}",
            # Debezium ships service manifests: no reflective scan of every jar (40 s -> 3-17 s).
            "plugin.discovery=service_load",
            "key.converter=org.apache.kafka.connect.json.JsonConverter",
            "value.converter=org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable=false",
            "value.converter.schemas.enable=false",
            "config.storage.topic=_connect-configs",
            "offset.storage.topic=_connect-offsets",
            "status.storage.topic=_connect-status",
            "config.storage.replication.factor=1",
            "offset.storage.replication.factor=1",
            "status.storage.replication.factor=1",
            "offset.storage.partitions=1",
            "status.storage.partitions=1",
            # How much is replayed after a crash without exactly-once, and how soon PostgreSQL
            # may recycle WAL (Debezium confirms a position to its slot after the offset commit).
            "offset.flush.interval.ms=5000",
            "topic.creation.enable=true",
            "exactly.once.source.support=enabled",
            "config.providers=env",
            "config.providers.env.class=org.apache.kafka.common.config.provider.EnvVarConfigProvider",
            "",
        ]))
        (self.root / "log4j2.properties").write_text("\n".join([
            "status = warn",
            "appender.file.type = File",
            "appender.file.name = file",
            f"appender.file.fileName = {self.root / 'connect.log'}",
            "appender.file.layout.type = PatternLayout",
            "appender.file.layout.pattern = [%d] %p %m (%c)%n",
            "rootLogger.level = info",
            "rootLogger.appenderRef.file.ref = file",
            "logger.apache.name = org.apache.kafka",
            "logger.apache.level = warn",
            "logger.connect.name = org.apache.kafka.connect.runtime",
            "logger.connect.level = info",
            "",
        ]))

    def start(self) -> None:
        if self.pid() is not None:
            return
        if port_open(self.port):
            raise PlatformError(f"port {self.port} is taken by another process: set local.connect_port")
        fetch("connect", self.jars_root)
        fetch("debezium-postgres", self.jars_root)
        self._write_config()
        command = [
            find_java(), f"-Xmx{self.heap}", f"-Xms{min(128, megabytes(self.heap))}m", "-XX:+UseG1GC",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
            "-cp", f"{self.jars_root / 'connect'}/*", "org.apache.kafka.connect.cli.ConnectDistributed",
            str(self.properties),
        ]
        pid = self._spawn(command, env={**os.environ, **self.secrets})
        log.info("kafka connect starting (pid %d) on %s", pid, self.url)

    def healthy(self) -> bool:
        """True once the REST API lists connectors (the worker has joined its group)."""
        return self.pid() is not None and port_open(self.port) and self.client().ready()
