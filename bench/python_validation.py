"""The ingest benchmark's Python baseline validator: the contract rules of
:mod:`pipelines.contracts.validation` applied to one record at a time in plain Python (``json``
with duplicate keys, NaN and trailing data refused), as a single-process consumer would apply
them. The platform itself validates in Spark SQL (:mod:`pipelines.ingest.json_records`);
``tests/unit/test_validation_parity.py`` holds the two to the same verdicts on every fault the
generator makes, so the benchmark compares equal work. Not part of the package.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipelines.contracts.validation import ValidationRules
from pipelines.core.contract_spec import Contract, ContractField
from pipelines.core.times import SECOND, describe_duration

_INT64 = (-(2**63), 2**63 - 1)
_SNIPPET = 40


@dataclass(frozen=True)
class Verdict:
    """The outcome for one record: ``values`` when valid, else ``error_class`` and ``reason``."""

    values: Mapping[str, Any] | None
    error_class: str | None = None
    reason: str | None = None

    @property
    def is_valid(self) -> bool:
        return self.error_class is None


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


_decoder = json.JSONDecoder(object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant)


def _snippet(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else json.dumps(value)
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 3] + "..."


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def parse_timestamp(text: str) -> datetime | None:
    """ISO-8601 with an explicit offset (``Z`` or ``+hh:mm``) -> aware UTC datetime; else None."""
    if len(text) < 16 or text[4:5] != "-" or "T" not in text.upper():
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.astimezone(timezone.utc)


class RecordValidator:
    """Validates raw record values against one contract. Stateless and cheap to call."""

    def __init__(self, contract: Contract, rules: ValidationRules):
        self.contract = contract
        self.rules = rules
        self._fields: tuple[ContractField, ...] = contract.fields
        self._declared = frozenset(contract.field_names)
        self._required = tuple(f.name for f in contract.fields if f.required)

    def validate(self, value: bytes | None, batch_time: datetime) -> Verdict:
        """Classify one record value; ``batch_time`` is the aware UTC time of the batch."""
        if value is None:
            return Verdict(None, "not_json", "value is null (a tombstone), expected a JSON object")
        if len(value) > self.rules.max_value_bytes:
            return Verdict(
                None,
                "oversize",
                f"value is {len(value)} bytes, over the limit of {self.rules.max_value_bytes} bytes",
            )
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Verdict(None, "not_utf8", f"value is not UTF-8: invalid byte at position {exc.start}")
        if not text.strip():
            return Verdict(None, "not_json", "value is empty, expected a JSON object")
        try:
            obj = _decoder.decode(text)
        except _DuplicateKey as exc:
            return Verdict(None, "not_json", f"value has the key {str(exc)!r} twice")
        except json.JSONDecodeError as exc:
            return Verdict(
                None, "not_json", f"value is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            )
        except ValueError as exc:
            return Verdict(None, "not_json", f"value is not JSON: {exc}")
        if not isinstance(obj, dict):
            return Verdict(None, "not_json", f"value is a JSON {_json_type(obj)}, expected an object")
        return self._check_object(obj, batch_time)

    def _check_object(self, obj: dict[str, Any], batch_time: datetime) -> Verdict:
        missing = [name for name in self._required if name not in obj]
        unknown = [key for key in obj if key not in self._declared]
        if missing:
            problems = [f"required field {m!r} is missing" for m in missing]
            # As many undeclared fields as missing ones: the shape of an upstream rename.
            if unknown and len(missing) <= len(unknown):
                problems += [f"undeclared field {u!r} is present (renamed upstream?)" for u in unknown]
                return Verdict(None, "renamed_field", "; ".join(problems))
            problems += [f"undeclared field {u!r} is present" for u in unknown]
            return Verdict(None, "missing_field", "; ".join(problems))
        if unknown and self.contract.strict:
            return Verdict(
                None,
                "unknown_field",
                "; ".join(
                    f"undeclared field {u!r} (contract {self.contract.name!r} "
                    f"v{self.contract.version} is strict)"
                    for u in unknown
                ),
            )
        nulls = [name for name in self._required if obj[name] is None]
        if nulls:
            return Verdict(None, "null_field", "; ".join(f"required field {n!r} is null" for n in nulls))

        values: dict[str, Any] = {}
        type_errors: list[str] = []
        negatives: list[str] = []
        for f in self._fields:
            raw = obj.get(f.name)
            if raw is None:
                values[f.name] = None
                continue
            typed = self._typed(f, raw)
            if typed is None:
                type_errors.append(self._type_message(f, raw))
                continue
            if f.non_negative and typed < 0:
                negatives.append(f"field {f.name!r} must not be negative, got {_snippet(raw)}")
            values[f.name] = typed
        if type_errors:
            return Verdict(None, "wrong_type", "; ".join(type_errors))
        if negatives:
            return Verdict(None, "negative_value", "; ".join(negatives))

        name = self.contract.event_time_field
        event_time: datetime = values[name]
        # Reasons give durations in whole seconds, as they always have (a DLQ row's text is stable).
        if event_time > batch_time + self.rules.future_tolerance:
            ahead = describe_duration(event_time - batch_time, SECOND)
            return Verdict(
                None,
                "future_event_time",
                f"{name} {event_time.isoformat()} is {ahead} ahead of the batch time {batch_time.isoformat()}, "
                f"beyond the tolerance of {describe_duration(self.rules.future_tolerance, SECOND)}",
            )
        if event_time < batch_time - self.rules.max_event_age:
            behind = describe_duration(batch_time - event_time, SECOND)
            return Verdict(
                None,
                "stale_event_time",
                f"{name} {event_time.isoformat()} is {behind} behind the batch time {batch_time.isoformat()}, "
                f"beyond the horizon of {describe_duration(self.rules.max_event_age, SECOND)}",
            )
        return Verdict(values)

    @staticmethod
    def _typed(f: ContractField, raw: Any) -> Any:
        """The typed value of ``raw`` for field ``f``, or None if its JSON type is wrong."""
        kind = f.type
        if kind == "string":
            return raw if isinstance(raw, str) else None
        if isinstance(raw, bool):
            return raw if kind == "boolean" else None
        if kind == "double":
            if not isinstance(raw, (int, float)):
                return None
            try:
                number = float(raw)
            except OverflowError:  # an integer literal beyond double range
                return None
            return number if math.isfinite(number) else None
        if kind == "long":
            return raw if isinstance(raw, int) and _INT64[0] <= raw <= _INT64[1] else None
        if kind == "timestamp":
            return parse_timestamp(raw) if isinstance(raw, str) else None
        return None  # boolean field, non-boolean value

    @staticmethod
    def _type_message(f: ContractField, raw: Any) -> str:
        expected = {
            "string": "a string",
            "double": "a finite number",
            "long": "a 64-bit integer",
            "boolean": "true or false",
            "timestamp": "an ISO-8601 timestamp string with a UTC offset",
        }[f.type]
        return f"field {f.name!r} must be {expected}, got {_json_type(raw)} {_snippet(raw)}"
