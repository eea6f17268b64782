"""Avro schema compatibility, field by field, in words a producer team can act on.

The schema registry is the authority on compatibility, but the Confluent API answers a check
with a bare ``is_compatible: false``. :func:`compatibility_problems` says *why*, with the Avro
resolution rules (the reader's fields are looked up by name in the writer's record; a reader
field missing from the writer needs a default; types must match or be a permitted promotion;
a writer union needs every branch readable):

* ``BACKWARD``: the new schema reads data written with the old one (consumers upgrade first);
* ``FORWARD``: the old schema reads data written with the new one (producers upgrade first);
* ``FULL``: both, so producers and consumers upgrade in any order.

``*_TRANSITIVE`` levels apply the same rules against every earlier version, not just the
latest. It covers the schemas contracts produce (records of primitives, nullable unions,
logical types); anything else is compared structurally (equal or incompatible).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Writer type -> reader types it may be promoted to (Avro specification, "Schema Resolution").
_PROMOTIONS = {
    "int": {"long", "float", "double"},
    "long": {"float", "double"},
    "float": {"double"},
    "string": {"bytes"},
    "bytes": {"string"},
}


@dataclass(frozen=True)
class Problem:
    """One reason a schema change breaks compatibility; ``direction`` is BACKWARD or FORWARD."""

    direction: str
    message: str

    def __str__(self) -> str:
        return f"{self.message} [{self.direction}]"


def _normal(avro_type: Any) -> Any:
    """A type with the decorations that do not matter for resolution removed."""
    if isinstance(avro_type, Mapping) and set(avro_type) <= {"type", "logicalType"} and "logicalType" not in avro_type:
        return _normal(avro_type["type"])
    if isinstance(avro_type, Mapping):
        return {k: v for k, v in avro_type.items() if k not in ("doc", "aliases")}
    return avro_type


def describe(avro_type: Any) -> str:
    """``"string"``, ``"optional string"``, ``"long (timestamp-micros)"``, ..."""
    avro_type = _normal(avro_type)
    if isinstance(avro_type, list):
        branches = [describe(t) for t in avro_type if t != "null"]
        prefix = "optional " if "null" in avro_type else ""
        return prefix + (" | ".join(branches) if branches else "null")
    if isinstance(avro_type, Mapping):
        if "logicalType" in avro_type:
            return f"{avro_type['type']} ({avro_type['logicalType']})"
        return str(avro_type.get("type"))
    return str(avro_type)


def can_read(reader: Any, writer: Any) -> bool:
    """True if data written with ``writer`` resolves to ``reader`` (for field types)."""
    reader, writer = _normal(reader), _normal(writer)
    if isinstance(writer, list):
        return all(can_read(reader, branch) for branch in writer)
    if isinstance(reader, list):
        return any(can_read(branch, writer) for branch in reader)
    if isinstance(reader, str) and isinstance(writer, str):
        return reader == writer or reader in _PROMOTIONS.get(writer, set())
    if isinstance(reader, Mapping) and isinstance(writer, Mapping):
        if "logicalType" in reader or "logicalType" in writer:
            # Same underlying type and the same logical meaning (micros are not millis).
            return reader.get("logicalType") == writer.get("logicalType") and reader.get("type") == writer.get("type")
        if reader.get("type") == "record" and writer.get("type") == "record":
            return not _read_problems(reader, writer, "", "")
        return reader == writer
    return False


def _fields(record: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {f["name"]: f for f in record.get("fields", [])}


def _read_problems(reader: Mapping[str, Any], writer: Mapping[str, Any], direction: str,
                   version: str) -> list[Problem]:
    """Why ``reader`` cannot read records written with ``writer`` (empty: it can)."""
    problems = []
    if reader.get("name") != writer.get("name") and writer.get("name") not in reader.get("aliases", ()):
        problems.append(Problem(direction, f"record name {writer.get('name')!r} became {reader.get('name')!r}"))
    writer_fields = _fields(writer)
    for name, field in _fields(reader).items():
        if name in writer_fields:
            if not can_read(field["type"], writer_fields[name]["type"]):
                old, new = (writer_fields[name], field) if direction == "BACKWARD" else (field, writer_fields[name])
                problems.append(Problem(
                    direction,
                    f"field {name!r} changed from {describe(old['type'])} to {describe(new['type'])}: "
                    + ("records written with " + version + " cannot be read with the new schema"
                       if direction == "BACKWARD" else
                       "consumers still on " + version + " cannot read records written with the new schema"),
                ))
        elif "default" not in field:
            if direction == "BACKWARD":
                problems.append(Problem(
                    direction,
                    f"field {name!r} ({describe(field['type'])}) is added without a default: records "
                    f"written with {version} have no value for it",
                ))
            else:
                problems.append(Problem(
                    direction,
                    f"field {name!r} ({describe(field['type'])}, no default in {version}) is removed: "
                    f"consumers still on {version} cannot read records written without it",
                ))
    return problems


def compatibility_problems(old: Mapping[str, Any], new: Mapping[str, Any], level: str,
                           version: str = "the registered version") -> list[Problem]:
    """Why ``new`` breaks ``level`` compatibility with ``old`` (both record schemas as dicts);
    empty when it does not. ``version`` names ``old`` in the messages. A removed and an added
    required field of the same type are also reported together as a likely rename."""
    level = level.removesuffix("_TRANSITIVE")
    if level == "NONE":
        return []
    problems: list[Problem] = []
    if level in ("BACKWARD", "FULL"):
        problems += _read_problems(new, old, "BACKWARD", version)
    if level in ("FORWARD", "FULL"):
        problems += _read_problems(old, new, "FORWARD", version)
    if problems:
        old_fields, new_fields = _fields(old), _fields(new)
        removed = [n for n in old_fields if n not in new_fields and "default" not in old_fields[n]]
        added = [n for n in new_fields if n not in old_fields and "default" not in new_fields[n]]
        for gone in removed:
            for came in added:
                if _normal(old_fields[gone]["type"]) == _normal(new_fields[came]["type"]):
                    problems.append(Problem(
                        "FULL" if level == "FULL" else level,
                        f"{gone!r} -> {came!r} looks like a rename: a rename breaks every reader of the "
                        f"old name. Add {came!r} as an optional field (with a default) beside {gone!r}, "
                        f"and remove {gone!r} only once no consumer reads it",
                    ))
    return problems


def field_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """A plain diff for humans: fields added, removed or retyped (compatible or not)."""
    old_fields, new_fields = _fields(old), _fields(new)
    lines = [f"+ {n}: {describe(f['type'])}" + (f" (default {json.dumps(f['default'])})" if "default" in f else "")
             for n, f in new_fields.items() if n not in old_fields]
    lines += [f"- {n}: {describe(f['type'])}" for n, f in old_fields.items() if n not in new_fields]
    lines += [f"~ {n}: {describe(old_fields[n]['type'])} -> {describe(f['type'])}"
              for n, f in new_fields.items() if n in old_fields and _normal(old_fields[n]["type"]) != _normal(f["type"])]
    return lines


def problems_against(history: Sequence[tuple[int, Mapping[str, Any]]], new: Mapping[str, Any],
                     level: str) -> list[Problem]:
    """``new`` against the latest of ``history`` ((version, schema) in version order), or every
    version for a ``*_TRANSITIVE`` level."""
    if not history:
        return []
    checked = history if level.endswith("_TRANSITIVE") else history[-1:]
    problems = []
    for version, schema in checked:
        problems += compatibility_problems(schema, new, level, f"version {version}")
    return problems
