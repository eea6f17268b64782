"""Kafka Connect's REST API, and the Debezium PostgreSQL connector the platform registers there.

The connector is registered by the project's code (``PUT /connectors/<name>/config``, an
idempotent upsert: the same call creates it, changes it, or leaves it as it is), never by hand.
Its offsets (how far into the write-ahead log it has published) are kept by Connect in Kafka
under its name, so a restart of the worker, of the database or of the connector resumes where it
stopped. The password is never in the config Connect stores: ``${env:<variable>}``, resolved by
the worker's ``EnvVarConfigProvider`` from its own environment.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from typing import Any

from pipelines.core.errors import ConfigError, PipelineError
from pipelines.core.settings import CdcSettings

log = logging.getLogger(__name__)

#: The connector class of Debezium's PostgreSQL connector.
POSTGRES_CONNECTOR = "io.debezium.connector.postgresql.PostgresConnector"


class ConnectError(PipelineError):
    """Kafka Connect refused a request, or a connector failed."""


def snapshot_signal(cdc: CdcSettings, tables: Sequence[str]) -> tuple[str, str, str]:
    """The signalling-table row (``id``, ``type``, ``data``) that asks the connector for a
    **blocking** ad-hoc snapshot of ``tables`` (each one of ``cdc.tables``): streaming pauses, each
    row of the tables is read (``op`` ``r``, with the LSN streaming paused at, above every change
    before it), then streaming resumes. Chosen over an incremental snapshot, whose reads carry no
    LSN, so that a read could not be ordered against the key's changes. Raises ConfigError for a
    table the connector does not capture."""
    unknown = [t for t in tables if t not in cdc.tables]
    if unknown or not tables:
        raise ConfigError(f"snapshot: {', '.join(unknown) or 'no table'}: not among cdc.tables ({', '.join(cdc.tables)})")
    data = json.dumps({"data-collections": list(tables), "type": "blocking"})
    return f"snapshot-{uuid.uuid4()}", "execute-snapshot", data


def debezium_postgres_config(cdc: CdcSettings) -> dict[str, str]:
    """The connector's config for ``cdc`` (every value a string, as Connect stores them).

    * ``pgoutput`` (built into PostgreSQL 10+), the publication created by the table owner
      (``publication.autocreate.mode=disabled``: the connector's role cannot create it);
    * an initial snapshot (``op`` ``r``) of each table when the connector has no offsets yet;
    * schemaless JSON keys and values; ``decimal.handling.mode=double`` (a ``numeric`` as a JSON
      number, as the contracts' ``double`` takes it; the default, precise, would be base64 bytes
      in schemaless JSON) and microsecond times;
    * a tombstone after each delete, so that a compacted topic forgets the key;
    * exactly-once delivery (``exactly.once.support=required``, one Kafka transaction per poll):
      a crash of the worker neither loses nor repeats a change for a ``read_committed`` reader;
    * the database's restarts retried by the connector itself, every 2 s;
    * signals read from ``cdc.signal_table`` (:func:`snapshot_signal`).
    """
    if cdc.database.port is None:
        raise PipelineError("cdc.database.port: not set (and no local platform to take it from)")
    return {
        "connector.class": POSTGRES_CONNECTOR,
        "tasks.max": "1",
        "database.hostname": cdc.database.host,
        "database.port": str(cdc.database.port),
        "database.user": cdc.database.user,
        "database.password": f"${{env:{cdc.database.password_env}}}",
        "database.dbname": cdc.database.dbname,
        "topic.prefix": cdc.topic_prefix,
        "plugin.name": "pgoutput",
        "publication.name": cdc.publication,
        "publication.autocreate.mode": "disabled",
        "slot.name": cdc.slot,
        "table.include.list": ",".join(cdc.tables),
        "snapshot.mode": "initial",
        "decimal.handling.mode": "double",
        "time.precision.mode": "adaptive_time_microseconds",
        "tombstones.on.delete": "true",
        "poll.interval.ms": str(int(cdc.poll_interval.total_seconds() * 1000)),
        "heartbeat.interval.ms": str(int(cdc.heartbeat_interval.total_seconds() * 1000)),
        "retriable.restart.connector.wait.ms": "2000",
        # Ad-hoc snapshots on request: a row in the signalling table, read from the WAL.
        "signal.enabled.channels": "source",
        "signal.data.collection": cdc.signal_table,
        "exactly.once.support": "required",
        "transaction.boundary": "poll",
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "false",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter.schemas.enable": "false",
        # The change topics are declared under kafka.topics and created by the project; Connect
        # creates only what is not (the heartbeat topic).
        "topic.creation.default.replication.factor": "-1",
        "topic.creation.default.partitions": "1",
    }


class ConnectClient:
    """A Kafka Connect worker's (or cluster's) REST API at ``url``."""

    def __init__(self, url: str, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, text

    def _ok(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self._request(method, path, body)
        if status >= 300:
            message = payload.get("message") if isinstance(payload, dict) else payload
            raise ConnectError(f"Kafka Connect {method} {path}: HTTP {status}: {message}")
        return payload

    def ready(self) -> bool:
        """True once the worker answers and has joined its group (it lists connectors)."""
        try:
            status, _ = self._request("GET", "/connectors")
        except (urllib.error.URLError, OSError):
            return False
        return status == 200

    def put_config(self, name: str, config: dict[str, str]) -> None:
        """Creates connector ``name`` with ``config``, or changes it (its offsets are kept)."""
        self._ok("PUT", f"/connectors/{name}/config", config)

    def status(self, name: str) -> dict[str, Any] | None:
        status, payload = self._request("GET", f"/connectors/{name}/status")
        if status == 404:
            return None
        if status >= 300:
            raise ConnectError(f"Kafka Connect GET /connectors/{name}/status: HTTP {status}: {payload}")
        return payload

    def wait_running(self, name: str, timeout: float = 120.0) -> None:
        """Blocks until connector ``name`` and each of its tasks are RUNNING; ConnectError with
        the task's trace if one FAILED, or when ``timeout`` passes. (RUNNING is Connect's view:
        after a crash of the worker it can show the dead worker's state for a few seconds.)"""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(name)
            if status is not None:
                states = [status["connector"]["state"], *(t["state"] for t in status.get("tasks", []))]
                failed = [t for t in [status["connector"], *status.get("tasks", [])] if t["state"] == "FAILED"]
                if failed:
                    raise ConnectError(f"connector {name} FAILED: {failed[0].get('trace', '')[:4000]}")
                if status.get("tasks") and all(state == "RUNNING" for state in states):
                    return
            if time.monotonic() > deadline:
                raise ConnectError(f"connector {name} not RUNNING after {timeout:.0f}s: {status}")
            time.sleep(0.25)

    def delete(self, name: str) -> None:
        status, payload = self._request("DELETE", f"/connectors/{name}")
        if status >= 300 and status != 404:
            raise ConnectError(f"Kafka Connect DELETE /connectors/{name}: HTTP {status}: {payload}")

    def restart(self, name: str) -> None:
        """Restarts the connector and its failed tasks."""
        self._ok("POST", f"/connectors/{name}/restart?includeTasks=true&onlyFailed=true")

    def reset_offsets(self, name: str) -> None:
        """Forgets connector ``name``'s offsets (stop, delete the offsets, resume): it snapshots
        its tables again from the start (KIP-875)."""
        self._ok("PUT", f"/connectors/{name}/stop")
        deadline = time.monotonic() + 60
        while (self.status(name) or {}).get("connector", {}).get("state") != "STOPPED":
            if time.monotonic() > deadline:
                raise ConnectError(f"connector {name} did not stop within 60s")
            time.sleep(0.25)
        self._ok("DELETE", f"/connectors/{name}/offsets")
        self._ok("PUT", f"/connectors/{name}/resume")
