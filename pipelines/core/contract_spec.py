"""Event contracts: declared once in ``conf/contracts/*.yaml``, loaded and checked here.

A contract names a topic's fields with their types and rules, and the topic's ``format``:
``json`` values are checked field by field at ingest (:mod:`pipelines.contracts.validation`);
``avro`` values are in the Confluent wire format, with the Avro schema derived from the contract
(:mod:`pipelines.contracts.avro`). The Spark schema of a contract is
:func:`pipelines.contracts.spark_schema.contract_schema`. ``required: true`` means the key
must be present and its value non-null; ``required: false`` means it may be absent or null.
``strict: true`` rejects keys the contract does not declare. Field types and what JSON they
accept (nothing is coerced: a number in quotes is a string, not a number):

========== =================================================== ================
type       JSON accepted                                       Spark type
========== =================================================== ================
string     a string                                            string
double     a number (integer or fractional, finite)            double
long       an integer within 64 bits                           bigint
boolean    true / false                                        boolean
timestamp  an ISO-8601 string with a UTC offset or ``Z``       timestamp (UTC)
========== =================================================== ================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.config import build, read_yaml
from pipelines.core.errors import ConfigError

#: Field types, and the Spark SQL type name of each (``long`` is Spark's ``bigint``).
FIELD_TYPES: Mapping[str, str] = {
    "string": "string",
    "double": "double",
    "long": "bigint",
    "boolean": "boolean",
    "timestamp": "timestamp",
}

FORMATS = ("json", "avro", "debezium")

#: Columns the bronze layer adds beside a contract's fields; no field may take these names
#: (nor any name starting with ``kafka_``).
RESERVED_COLUMNS = frozenset(
    {"cdc_op", "cdc_lsn", "cdc_tx_id", "cdc_commit_time", "cdc_snapshot", "cdc_deleted", "validated_at", "error_class", "error_reason", "event_date", "ingested_at", "failed_at",
     "failed_date", "contract_name", "contract_version", "_watermark_time", "_dedupe_key", "_verdict",
     "schema_id", "writer_schema_id", "writer_schema_version", "_wire"}
)


@dataclass(frozen=True)
class ContractField:
    name: str
    type: str
    required: bool = True
    #: Reject values below zero (amounts, balances).
    non_negative: bool = False
    description: str = ""

    @property
    def sql_type(self) -> str:
        """The Spark SQL name of the field's type (``bigint`` for ``long``)."""
        return FIELD_TYPES[self.type]


@dataclass(frozen=True)
class Contract:
    """The agreed shape of one topic's events, or (``format: debezium``) of one table's rows
    whose changes the topic carries."""

    name: str
    version: int
    #: Field whose value is the Kafka message key (the entity the topic is partitioned by; for
    #: a table, its primary key).
    key_field: str
    fields: tuple[ContractField, ...] = ()
    #: Field that identifies an event: the same id delivered twice is one event. Events only:
    #: a change is identified by its LSN and key.
    id_field: str | None = None
    #: Field holding the event time the watermark, horizons and features use. Events only: a
    #: change's time is its commit time, from the envelope.
    event_time_field: str | None = None
    strict: bool = True
    description: str = ""
    #: How the topic's values are encoded: ``json`` (checked field by field at ingest),
    #: ``avro`` (Confluent wire format; the Avro schema is derived from this contract and
    #: registered under ``<topic>-value``), or ``debezium``: Debezium's change events as
    #: schemaless JSON, ``fields`` being the table's columns (:mod:`pipelines.cdc`).
    format: str = "json"

    @property
    def is_changes(self) -> bool:
        """Whether the topic carries a table's change events (``format: debezium``)."""
        return self.format == "debezium"

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> ContractField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def parse_contract(data: Mapping, source: str) -> Contract:
    """Build and check one contract; errors name ``source`` and the offending key."""
    contract = build(Contract, data, f"{source}:")
    if contract.format not in FORMATS:
        raise ConfigError(f"{source}: format: {contract.format!r} is not one of {', '.join(FORMATS)}")
    seen = set()
    for i, f in enumerate(contract.fields):
        if f.type not in FIELD_TYPES:
            raise ConfigError(
                f"{source}: fields[{i}].type: {f.type!r} is not one of {', '.join(FIELD_TYPES)}"
            )
        if f.name in RESERVED_COLUMNS or f.name.startswith("kafka_"):
            raise ConfigError(f"{source}: fields[{i}].name: {f.name!r} is reserved for bronze metadata")
        if f.name in seen:
            raise ConfigError(f"{source}: fields[{i}].name: {f.name!r} is declared twice")
        if f.non_negative and f.type not in ("double", "long"):
            raise ConfigError(f"{source}: fields[{i}].non_negative: only for double/long fields")
        seen.add(f.name)
    if not contract.fields:
        raise ConfigError(f"{source}: fields: at least one field must be declared")
    roles = ["key_field"]
    for role in ("id_field", "event_time_field"):
        if contract.is_changes and getattr(contract, role) is not None:
            raise ConfigError(f"{source}: {role}: not for format debezium (a change is identified by its LSN and "
                              "key, and its time is its commit time)")
        if not contract.is_changes:
            if getattr(contract, role) is None:
                raise ConfigError(f"{source}: {role}: required for format {contract.format}")
            roles.append(role)
    for role in roles:
        name = getattr(contract, role)
        if name not in seen:
            raise ConfigError(f"{source}: {role}: {name!r} is not a declared field")
        if not contract.field(name).required:
            raise ConfigError(f"{source}: {role}: {name!r} must be a required field")
    if contract.event_time_field is not None and contract.field(contract.event_time_field).type != "timestamp":
        raise ConfigError(f"{source}: event_time_field: {contract.event_time_field!r} must be a timestamp")
    return contract


def load_contracts(folder: Path) -> dict[str, Contract]:
    """Every ``*.yaml`` contract in ``folder``, by name."""
    contracts: dict[str, Contract] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        contract = parse_contract(read_yaml(path), str(path))
        if contract.name in contracts:
            raise ConfigError(f"{path}: name: contract {contract.name!r} is declared twice")
        contracts[contract.name] = contract
    return contracts
