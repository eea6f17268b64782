"""Contracts as Avro, and the Confluent wire format.

A contract is the one source of truth: :func:`avro_schema` derives its Avro record schema
(required fields plain, optional ones a union with null defaulting to null, timestamps as
``timestamp-micros``), and Spark derives its own schema from that Avro schema when it decodes
(``from_avro``), which a test checks equals the contract's Spark schema.

Confluent wire format: byte 0 is the magic byte ``0``, bytes 1-4 the schema id (big-endian
unsigned 32-bit), the rest the Avro binary body. :func:`encode_wire` / :func:`decode_wire` frame
and split Python bytes (the generator, tests), with an error class for values that cannot be a
framed record; :func:`pipelines.ingest.avro_records.wire_header` does the same in Spark.
Nothing here imports Spark: producers and the contract gate use it without a JVM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pipelines.core.contract_spec import Contract

MAGIC_BYTE = 0
HEADER_BYTES = 5
NAMESPACE = "feature_platform.contracts"

#: Contract type -> Avro type.
AVRO_TYPES: dict[str, Any] = {
    "string": "string",
    "double": "double",
    "long": "long",
    "boolean": "boolean",
    "timestamp": {"type": "long", "logicalType": "timestamp-micros"},
}

#: Dead-letter ``error_class`` values of Avro topics (see :mod:`pipelines.ingest.avro_records`).
TRUNCATED_HEADER = "avro_truncated_header"
WRONG_MAGIC_BYTE = "avro_wrong_magic_byte"
UNKNOWN_SCHEMA_ID = "avro_unknown_schema_id"
SUBJECT_MISMATCH = "avro_subject_mismatch"
CORRUPT_PAYLOAD = "avro_corrupt_payload"
#: The classes Avro topics have and JSON topics do not.
AVRO_ERROR_CLASSES = (TRUNCATED_HEADER, WRONG_MAGIC_BYTE, UNKNOWN_SCHEMA_ID, SUBJECT_MISMATCH, CORRUPT_PAYLOAD)


def avro_schema(contract: Contract) -> dict[str, Any]:
    """The contract's Avro record schema (a JSON-ready dict): one field per contract field, in
    order, with the contract's descriptions as ``doc``."""
    fields = []
    for spec in contract.fields:
        avro_type = AVRO_TYPES[spec.type]
        field: dict[str, Any] = {"name": spec.name}
        if spec.required:
            field["type"] = avro_type
        else:
            field["type"] = ["null", avro_type]
            field["default"] = None
        if spec.description:
            field["doc"] = spec.description
        fields.append(field)
    record: dict[str, Any] = {"type": "record", "name": contract.name, "namespace": NAMESPACE, "fields": fields}
    if contract.description:
        record["doc"] = contract.description
    return record


@dataclass(frozen=True)
class WriterSchema:
    """A version of a topic's subject: records framed with ``schema_id`` were written with it."""

    schema_id: int
    version: int
    schema: str


class WireFormatError(ValueError):
    """Bytes that are not a Confluent-framed record; ``error_class`` says how."""

    def __init__(self, error_class: str, reason: str):
        super().__init__(reason)
        self.error_class = error_class


@dataclass(frozen=True)
class Framed:
    schema_id: int
    body: bytes


def encode_wire(schema_id: int, body: bytes) -> bytes:
    """Magic byte, 4-byte big-endian schema id, body."""
    if not 0 <= schema_id < 2**32:
        raise ValueError(f"schema id {schema_id} does not fit 4 unsigned bytes")
    return struct.pack(">bI", MAGIC_BYTE, schema_id) + body


def decode_wire(value: bytes | None) -> Framed:
    """Split a framed value; WireFormatError for a value shorter than the header or a magic byte
    other than 0. The body is not checked here (Avro decoding does that)."""
    if value is None or len(value) < HEADER_BYTES:
        size = 0 if value is None else len(value)
        raise WireFormatError(TRUNCATED_HEADER, f"{size} bytes: shorter than the 5-byte header (magic byte + schema id)")
    if value[0] != MAGIC_BYTE:
        raise WireFormatError(WRONG_MAGIC_BYTE, f"magic byte {value[0]}, expected {MAGIC_BYTE}")
    (schema_id,) = struct.unpack(">I", value[1:HEADER_BYTES])
    return Framed(schema_id, value[HEADER_BYTES:])
