"""Record-level contract validation of JSON topics: raw Kafka bytes in, typed fields or an
error class out. This module names the rules and their limits; they are implemented once, in
Spark SQL expressions (:func:`pipelines.ingest.json_records.validate_records`), which the bronze
ingest, backfills and the online path all run, so every path rejects exactly the same records.
JSON is strict: trailing data after the object, ``NaN``/``Infinity``, duplicate keys, comments
and single quotes are all ``not_json`` (Spark's JSON readers alone would accept trailing data and
silently drop half of two concatenated events; see that module for how it is refused).

Error classes, in the order they are decided (a record gets the first that applies; its
reason lists every problem found at that stage):

=================== =========================================================================
oversize            the value is larger than ``max_value_bytes``
not_utf8            the value is not UTF-8
not_json            null/empty value, invalid JSON (incl. trailing data, NaN, duplicate keys),
                    or JSON that is not an object
renamed_field       required fields are missing and at least as many undeclared ones are present
missing_field       a required field is missing
unknown_field       an undeclared field is present and the contract is strict
null_field          a required field is null
wrong_type          a value of the wrong JSON type (no coercion: ``"12.5"`` is not a number), a
                    number beyond the type's range, or a timestamp text not in
                    :data:`pipelines.ingest.json_records.TIMESTAMP_PATTERN`
negative_value      a ``non_negative`` field below zero
future_event_time   event time later than batch time + ``future_tolerance``
stale_event_time    event time earlier than batch time - ``max_event_age``
=================== =========================================================================

The time checks compare with the *batch time* (Spark's ``current_timestamp()`` of the
micro-batch, which the checkpoint records), never with the wall clock, so a batch that is
replayed after a crash classifies every record exactly as the first attempt did.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pipelines.core.settings import IngestSettings

ERROR_CLASSES = (
    "oversize",
    "not_utf8",
    "not_json",
    "renamed_field",
    "missing_field",
    "unknown_field",
    "null_field",
    "wrong_type",
    "negative_value",
    "future_event_time",
    "stale_event_time",
)


@dataclass(frozen=True)
class ValidationRules:
    """Record-level limits that are not part of a contract (they are per environment)."""

    max_value_bytes: int = 65_536
    future_tolerance: timedelta = timedelta(minutes=5)
    max_event_age: timedelta = timedelta(days=7)

    @classmethod
    def of(cls, ingest: IngestSettings) -> ValidationRules:
        """The rules an environment's ingest settings set."""
        return cls(max_value_bytes=ingest.max_value_bytes, future_tolerance=ingest.future_tolerance,
                   max_event_age=ingest.max_event_age)
