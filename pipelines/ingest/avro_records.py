"""Avro topics into the bronze layer: Confluent-framed records decoded in Spark, checked against
the contract, with an error class for every record that cannot land.

:func:`decode_avro_records` is the Avro counterpart of :func:`pipelines.ingest.json_records.validate_records`
and returns the same columns (so the duplicate filter and the bronze / dead-letter writers are
shared) plus ``writer_schema_id`` and ``writer_schema_version``. It is pure: the writer schemas
(every version of the topic's subject, fetched when the query starts) are an argument. Each
record is decoded with ``from_avro`` using the schema its id names as the writer schema and the
contract's Avro schema as the reader schema (Spark's ``avroSchema`` option), so a record written
with an older compatible version gets the fields it lacks from Avro's own resolution: defaults,
never guesses.

Error classes, in the order they are decided:

============================== =============================================================
avro_truncated_header          shorter than the 5-byte header (magic byte + schema id)
avro_wrong_magic_byte          first byte is not 0
avro_unknown_schema_id         the id is not in the registry (decided in the batch handler)
avro_subject_mismatch          the id is registered, under other subjects only (ditto)
avro_corrupt_payload           the body does not decode with its writer schema
null_field                     a required field decoded as null (an incompatible writer)
wrong_type                     a double that is NaN or infinite (JSON cannot carry these)
negative_value                 a ``non_negative`` field below zero
future_event_time              as for JSON: beyond ``future_tolerance`` ahead of the batch
stale_event_time               as for JSON: beyond ``max_event_age`` behind the batch
============================== =============================================================

An id that is not among the writer schemas known when the query started is first marked
:data:`UNRESOLVED`; :func:`resolve_unknown_ids` asks the registry in the batch handler. An id
registered under the topic's subject after the query started raises
:class:`NewWriterSchema` (the query restarts and decodes it); only ids the registry does not
have, or has under other subjects, are dead-lettered. A registry that cannot be reached fails
the batch: good records are never dead-lettered for an outage.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Mapping, Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.avro.functions import from_avro
from pyspark.sql.types import IntegerType, LongType

from pipelines.contracts.avro import (
    CORRUPT_PAYLOAD,
    HEADER_BYTES,
    MAGIC_BYTE,
    SUBJECT_MISMATCH,
    TRUNCATED_HEADER,
    UNKNOWN_SCHEMA_ID,
    WRONG_MAGIC_BYTE,
    WriterSchema,
    avro_schema,
)
from pipelines.contracts.registry import IdLookup, SchemaRegistry
from pipelines.contracts.spark_schema import spark_type
from pipelines.contracts.validation import ValidationRules
from pipelines.core.contract_spec import Contract
from pipelines.core.times import SECOND, describe_duration, spark_interval
from pipelines.ingest.records import kafka_records

#: Provisional class of an id not known when the query started; never written.
UNRESOLVED = "avro_unresolved_schema_id"
#: A marker in the exception text, found again in the StreamingQueryException that wraps it.
NEW_WRITER_SCHEMA_MARKER = "NEW_WRITER_SCHEMA"


class NewWriterSchema(RuntimeError):
    """Records carry a schema id registered under the subject after the query planned its
    decoders: the batch must be decoded by a restarted query."""


def _fmt_ts(column: Column) -> Column:
    return F.date_format(column, "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX")


def _first_error(checks: Sequence[tuple[Column, Column | str, Column]]) -> tuple[Column, Column]:
    """(error_class, error_reason) of the first check whose condition holds; nulls if none."""
    error_class, reason = F.lit(None).cast("string"), F.lit(None).cast("string")
    for condition, name, message in reversed(checks):
        error_class = F.when(condition, name if isinstance(name, Column) else F.lit(name)).otherwise(error_class)
        reason = F.when(condition, message).otherwise(reason)
    return error_class, reason


def _any(conditions: Sequence[Column]) -> Column:
    """True where any condition is true (a null condition counts as false)."""
    return functools.reduce(operator.or_, [F.coalesce(c, F.lit(False)) for c in conditions], F.lit(False))


def _joined(parts: Sequence[tuple[Column, Column]]) -> Column:
    """The messages of the parts whose condition holds, joined with "; " (null if none)."""
    return F.concat_ws("; ", *[F.when(cond, msg) for cond, msg in parts])


def wire_header(value: Column) -> Column:
    """A struct of ``schema_id`` (long), ``body`` (binary) and ``error_class`` / ``error_reason``
    for a binary column of framed values, computed in Spark (no Python per row). For a value
    that cannot be framed, ``schema_id`` and ``body`` are null and the error says why, as
    :func:`pipelines.contracts.avro.decode_wire` would."""
    size = F.coalesce(F.octet_length(value), F.lit(0))
    magic = F.conv(F.hex(F.substring(value, 1, 1)), 16, 10).cast("int")
    truncated = size < HEADER_BYTES
    wrong_magic = ~truncated & (magic != MAGIC_BYTE)
    framed = ~truncated & ~wrong_magic
    return F.struct(
        F.when(framed, F.conv(F.hex(F.substring(value, 2, 4)), 16, 10).cast("long")).alias("schema_id"),
        F.when(framed, F.substring(value, HEADER_BYTES + 1, 2**31 - 1)).alias("body"),
        F.when(truncated, F.lit(TRUNCATED_HEADER)).when(wrong_magic, F.lit(WRONG_MAGIC_BYTE)).alias("error_class"),
        F.when(truncated, F.format_string(
            "%d bytes: shorter than the 5-byte header (magic byte + schema id)", size))
        .when(wrong_magic, F.format_string("magic byte %d, expected 0", magic)).alias("error_reason"),
    )


def decode_avro_records(
    records: DataFrame,
    contract: Contract,
    rules: ValidationRules,
    writers: Sequence[WriterSchema],
    batch_time: Column | None = None,
) -> DataFrame:
    """Kafka-shaped rows of Confluent-framed Avro -> one row per record with the contract's
    typed fields and its verdict (the columns of :func:`pipelines.ingest.json_records.validate_records`),
    plus ``writer_schema_id`` (null when there is no header) and ``writer_schema_version``
    (null unless the id is one of ``writers``). ``kafka_value`` is kept for invalid records
    only. No record is dropped."""
    with_time = kafka_records(records, batch_time)
    wire = with_time.withColumn("_wire", wire_header(F.col("kafka_value")))
    schema_id = F.col("_wire.schema_id")
    reader = json.dumps(avro_schema(contract))

    # One decoder per writer schema; CASE evaluates only the branch a record's id selects.
    decoded = F.lit(None)
    version = F.lit(None).cast(IntegerType())
    for writer in sorted(writers, key=lambda w: w.schema_id, reverse=True):
        decoder = from_avro(F.col("_wire.body"), writer.schema, {"mode": "PERMISSIVE", "avroSchema": reader})
        decoded = F.when(schema_id == writer.schema_id, decoder).otherwise(decoded)
        version = F.when(schema_id == writer.schema_id, F.lit(writer.version)).otherwise(version)
    if not writers:  # still the reader's struct type, so that the columns below resolve
        decoded = from_avro(F.lit(None).cast("binary"), reader, {"mode": "PERMISSIVE"})
    framed = wire.withColumn("_decoded", decoded).withColumn("_version", version)

    field = {f.name: F.col(f"_decoded.{f.name}") for f in contract.fields}
    header_error = F.col("_wire.error_class").isNotNull()
    known = F.col("_version").isNotNull()
    # PERMISSIVE decoding gives all-null fields for a body that does not decode; the id field
    # is required, so a decoded record always has it.
    corrupt = field[contract.id_field].isNull()
    required = [f.name for f in contract.fields if f.required]
    doubles = [f.name for f in contract.fields if f.type == "double"]
    non_negative = [f.name for f in contract.fields if f.non_negative]
    event_time = field[contract.event_time_field]
    now = F.col("validated_at")
    future_limit = now + F.expr(f"INTERVAL {spark_interval(rules.future_tolerance)}")
    stale_limit = now - F.expr(f"INTERVAL {spark_interval(rules.max_event_age)}")

    def nan_or_inf(name: str) -> Column:
        return F.isnan(field[name]) | F.abs(field[name]).eqNullSafe(float("inf"))

    event_name = contract.event_time_field
    error_class, reason = _first_error([
        (header_error, F.col("_wire.error_class"), F.col("_wire.error_reason")),
        (~known, UNRESOLVED, F.format_string("schema id %d is not a version of the subject known to this query",
                                             schema_id)),
        (corrupt, CORRUPT_PAYLOAD, F.format_string(
            "the %d-byte Avro body does not decode with schema id %d (version %d): truncated or corrupt",
            F.octet_length(F.col("_wire.body")), schema_id, F.col("_version"))),
        (_any([field[n].isNull() for n in required]), "null_field",
         _joined([(field[n].isNull(), F.lit(f"required field {n!r} is null")) for n in required])),
        (_any([nan_or_inf(n) for n in doubles]), "wrong_type",
         _joined([(nan_or_inf(n), F.format_string(f"field {n!r} must be a finite number, got %s",
                                                  field[n].cast("string"))) for n in doubles])),
        (_any([field[n] < 0 for n in non_negative]), "negative_value",
         _joined([(field[n] < 0, F.format_string(f"field {n!r} must not be negative, got %s",
                                                 field[n].cast("string"))) for n in non_negative])),
        (event_time > future_limit, "future_event_time", F.format_string(
            f"{event_name} %s is more than {describe_duration(rules.future_tolerance, SECOND)} ahead of the batch time %s",
            _fmt_ts(event_time), _fmt_ts(now))),
        (event_time < stale_limit, "stale_event_time", F.format_string(
            f"{event_name} %s is more than {describe_duration(rules.max_event_age, SECOND)} behind the batch time %s",
            _fmt_ts(event_time), _fmt_ts(now))),
    ])
    checked = framed.withColumn("error_class", error_class).withColumn("error_reason", reason)
    valid = F.col("error_class").isNull()
    return checked.select(
        *[F.col(c) for c in with_time.columns if c != "kafka_value"],
        F.when(~valid, F.col("kafka_value")).alias("kafka_value"),
        *[F.when(valid, field[f.name]).cast(spark_type(f)).alias(f.name) for f in contract.fields],
        "error_class",
        "error_reason",
        schema_id.cast(LongType()).alias("writer_schema_id"),
        F.col("_version").alias("writer_schema_version"),
    )


def resolve_unknown_ids(checked: DataFrame, lookups: Mapping[int, IdLookup], subject: str) -> DataFrame:
    """Replace the provisional :data:`UNRESOLVED` class by what the registry says of each id
    (``lookups``: id -> what the registry knows of it): unknown ids become
    ``avro_unknown_schema_id``, ids registered under other subjects ``avro_subject_mismatch``.
    Raises :class:`NewWriterSchema` for an id registered under ``subject`` itself."""
    fresh = sorted(i for i, lookup in lookups.items() if lookup.version_in(subject) is not None)
    if fresh:
        raise NewWriterSchema(
            f"{NEW_WRITER_SCHEMA_MARKER}: schema id(s) {', '.join(map(str, fresh))} were registered under "
            f"{subject} after the query planned its decoders; the query restarts to decode them"
        )
    error_class, reason = F.col("error_class"), F.col("error_reason")
    unresolved = F.col("error_class") == UNRESOLVED
    for schema_id, lookup in sorted(lookups.items()):
        this = unresolved & (F.col("writer_schema_id") == schema_id)
        if lookup.schema is None:
            cls = UNKNOWN_SCHEMA_ID
            why = f"schema id {schema_id} is not in the schema registry"
        else:
            cls = SUBJECT_MISMATCH
            others = ", ".join(f"{s} v{v}" for s, v in lookup.versions) or "no subject"
            why = f"schema id {schema_id} is registered under {others}, not {subject}"
        error_class = F.when(this, F.lit(cls)).otherwise(error_class)
        reason = F.when(this, F.lit(why)).otherwise(reason)
    # One projection: both expressions must see the provisional class.
    return checked.withColumns({"error_class": error_class, "error_reason": reason})


def unresolved_ids(checked: DataFrame) -> list[int]:
    """The distinct schema ids of a (static) batch marked :data:`UNRESOLVED`."""
    rows = checked.filter(F.col("error_class") == UNRESOLVED).select("writer_schema_id").distinct().collect()
    return sorted(r[0] for r in rows)


def resolve_with_registry(checked: DataFrame, registry: SchemaRegistry, subject: str) -> DataFrame:
    """:func:`resolve_unknown_ids` with the answers of ``registry`` for the batch's unresolved ids; the batch
    itself when it has none. Raises ``RegistryUnavailable`` if the registry cannot be asked."""
    ids = unresolved_ids(checked)
    if not ids:
        return checked
    return resolve_unknown_ids(checked, {schema_id: registry.lookup_id(schema_id) for schema_id in ids}, subject)
