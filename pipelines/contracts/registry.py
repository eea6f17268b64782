"""The schema registry at the edges: look-ups for the ingest, and the contract gate
(``fp-contracts check|register``).

Any registry speaking the Confluent API works (``schema_registry.url``; the local platform runs
Apicurio's). Subjects follow the TopicNameStrategy: the values of topic ``t`` are registered
under ``t-value``. The gate checks each Avro contract against what its subject holds, with the
subject's compatibility level from conf (default FULL), explains any break field by field
(:mod:`pipelines.contracts.compat`), asks the registry too, and registers only what passes both.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from pipelines.contracts.avro import WriterSchema, avro_schema
from pipelines.contracts.compat import Problem, field_changes, problems_against
from pipelines.core.contract_spec import Contract
from pipelines.core.errors import ConfigError, PipelineError
from pipelines.core.settings import SchemaRegistrySettings, Settings, TopicSettings

log = logging.getLogger(__name__)


class RegistryUnavailable(PipelineError):
    """The registry could not be asked (connection refused, timeout, 5xx): never a verdict on data."""

    exit_code = 3


@dataclass(frozen=True)
class RegisteredSchema:
    """One version of a subject."""

    schema_id: int
    subject: str
    version: int
    schema: str

    @property
    def parsed(self) -> dict[str, Any]:
        return json.loads(self.schema)


@dataclass(frozen=True)
class IdLookup:
    """What the registry knows of a schema id: its schema and the (subject, version) pairs
    registered with it (empty when the id is unknown)."""

    schema_id: int
    schema: str | None
    versions: tuple[tuple[str, int], ...] = ()

    def version_in(self, subject: str) -> int | None:
        return next((v for s, v in self.versions if s == subject), None)


class SchemaRegistry:
    """A thin client over confluent-kafka's ``SchemaRegistryClient``. Network failures and
    server errors raise :class:`RegistryUnavailable`."""

    def __init__(self, settings: SchemaRegistrySettings):
        self.settings = settings
        self.url = settings.url
        self.client = SchemaRegistryClient(settings.client_config())
        self._schemas: dict[int, str] = {}
        self._lock = threading.Lock()

    def _call(self, what: str, fn, *args, not_found: Any = ..., **kwargs):
        try:
            return fn(*args, **kwargs)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404 and not_found is not ...:
                return not_found
            if exc.http_status_code >= 500 or exc.http_status_code < 0:
                raise RegistryUnavailable(f"schema registry {self.url}: {what} failed: {exc}") from exc
            raise
        except Exception as exc:  # noqa: BLE001 - httpx transport errors and the like
            raise RegistryUnavailable(f"schema registry {self.url} unreachable ({what}): {exc!r}") from exc

    def subjects(self) -> list[str]:
        return self._call("listing subjects", self.client.get_subjects)

    def versions(self, subject: str) -> list[RegisteredSchema]:
        """Every version of ``subject``, oldest first (empty for an unknown subject)."""
        numbers = self._call(f"versions of {subject}", self.client.get_versions, subject, not_found=[])
        found = []
        for number in sorted(numbers):
            registered = self._call(f"{subject} version {number}", self.client.get_version, subject, number)
            found.append(RegisteredSchema(registered.schema_id, subject, registered.version,
                                          registered.schema.schema_str))
        return found

    def lookup_id(self, schema_id: int) -> IdLookup:
        """The schema and the subjects of ``schema_id`` (an unknown id gives an empty lookup).
        The schema text of an id never changes and is cached; its subjects can grow (the same
        schema registered under another subject shares the id) and are asked every time."""
        with self._lock:
            schema = self._schemas.get(schema_id)
        if schema is None:
            found = self._call(f"schema id {schema_id}", self.client.get_schema, schema_id, not_found=None)
            if found is None:
                return IdLookup(schema_id, None)
            schema = found.schema_str
            with self._lock:
                self._schemas[schema_id] = schema
        listed = self._call(f"subjects of schema id {schema_id}", self.client.get_schema_versions,
                            schema_id, not_found=[])
        return IdLookup(schema_id, schema, tuple((v.subject, v.version) for v in listed))

    def compatibility(self, subject: str) -> str | None:
        """The level the registry applies to ``subject`` (its own or the global one)."""
        return self._call(f"compatibility of {subject}", self.client.get_compatibility, subject, not_found=None)

    def set_compatibility(self, subject: str, level: str) -> None:
        self._call(f"setting compatibility of {subject}", self.client.set_compatibility, subject, level)

    def is_compatible(self, subject: str, schema: str) -> bool:
        return self._call(f"compatibility test of {subject}", self.client.test_compatibility, subject,
                          Schema(schema, "AVRO"))

    def register(self, subject: str, schema: str) -> RegisteredSchema:
        """Register ``schema`` under ``subject`` (idempotent: a schema already registered keeps
        its id and version); the registry enforces the subject's compatibility level."""
        schema_id = self._call(f"registering {subject}", self.client.register_schema, subject, Schema(schema, "AVRO"))
        lookup = self._call(f"looking up {subject}", self.client.lookup_schema, subject, Schema(schema, "AVRO"))
        return RegisteredSchema(schema_id, subject, lookup.version, schema)


def schema_text(contract: Contract) -> str:
    """The canonical JSON text of a contract's Avro schema (what is registered)."""
    return json.dumps(avro_schema(contract), separators=(",", ":"))


@dataclass
class SubjectCheck:
    """The verdict on one subject: what would change and why it is (in)compatible."""

    topic: str
    subject: str
    contract: str
    level: str
    latest: RegisteredSchema | None
    #: The contract's schema as it would be registered (canonical JSON).
    new_schema: str
    changes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    registry_compatible: bool | None = None
    registry_level: str | None = None
    registered: RegisteredSchema | None = None
    refused: str | None = None

    @property
    def unchanged(self) -> bool:
        return self.latest is not None and self.latest.parsed == json.loads(self.new_schema)

    @property
    def compatible(self) -> bool:
        return not self.problems and self.registry_compatible is not False and self.refused is None

    def report(self) -> str:
        where = f"{self.subject} (topic {self.topic}, contract {self.contract}, {self.level})"
        if self.latest is None:
            head = f"{where}: new subject, nothing registered yet"
        elif self.unchanged:
            head = f"{where}: unchanged, version {self.latest.version} (id {self.latest.schema_id})"
        else:
            verdict = "compatible" if self.compatible else "INCOMPATIBLE"
            head = f"{where}: {verdict} with version {self.latest.version} (id {self.latest.schema_id})"
        lines = [head, *(f"    {c}" for c in self.changes)]
        lines += [f"  x {p}" for p in self.problems]
        if self.registry_compatible is False:
            lines.append("  x the registry refuses it too" if self.problems else
                         "  x the registry refuses it (no field-level reason found here: see its rules)")
        if self.registry_level and self.registry_level != self.level:
            lines.append(f"  ! the registry applies {self.registry_level} to this subject; "
                         f"`register` sets {self.level} first")
        if self.refused:
            lines.append(f"  x registration refused: {self.refused}")
        if self.registered is not None:
            lines.append(f"  registered: version {self.registered.version} (id {self.registered.schema_id})")
        return "\n".join(lines)


def avro_topics(settings: Settings, topics: Iterable[str] | None = None) -> list[str]:
    """The topics (of ``topics``, default all under kafka.topics) whose contract is Avro."""
    names = list(topics) if topics is not None else list(settings.kafka.topics)
    return [t for t in names if settings.contract_for(t).format == "avro"]


def check_subject(registry: SchemaRegistry, settings: Settings, topic: str) -> SubjectCheck:
    """Compare topic's contract with what its subject holds, without changing anything."""
    contract = settings.contract_for(topic)
    subject = TopicSettings.subject(topic)
    level = settings.schema_registry.compatibility_for(subject)
    new = schema_text(contract)
    history = registry.versions(subject)
    check = SubjectCheck(topic, subject, contract.name, level, history[-1] if history else None, new)
    if not history:
        return check
    latest = history[-1]
    check.changes = field_changes(latest.parsed, json.loads(new))
    if check.unchanged:
        return check
    check.problems = problems_against([(h.version, h.parsed) for h in history], json.loads(new), level)
    check.registry_level = registry.compatibility(subject)
    if check.registry_level == level:
        check.registry_compatible = registry.is_compatible(subject, new)
    return check


def register_subject(registry: SchemaRegistry, settings: Settings, topic: str) -> SubjectCheck:
    """Set the subject's compatibility level from conf, check, and register if compatible
    (the registry checks again on registration and may still refuse: ``refused`` says why)."""
    subject = TopicSettings.subject(topic)
    registry.set_compatibility(subject, settings.schema_registry.compatibility_for(subject))
    check = check_subject(registry, settings, topic)
    if not check.compatible or check.unchanged:
        return check
    try:
        check.registered = registry.register(subject, check.new_schema)
    except SchemaRegistryError as exc:
        check.refused = str(exc)
    return check


def writer_schemas(registry: SchemaRegistry, topic: str, contract: Contract) -> list[WriterSchema]:
    """Every version of the topic's subject, to decode with. The contract's own schema must be
    one of them: an ingest never reads with a schema that did not pass the registry's gate."""
    subject = TopicSettings.subject(topic)
    versions = registry.versions(subject)
    mine = avro_schema(contract)
    if not any(v.parsed == mine for v in versions):
        raise ConfigError(
            f"contract {contract.name!r} (format avro) is not registered under {subject} "
            f"({len(versions)} version(s) there): run `fp-contracts register` before deploying it"
        )
    return [WriterSchema(v.schema_id, v.version, v.schema) for v in versions]
