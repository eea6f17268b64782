"""Time primitives, one of each, named for their rule. Every module that converts a datetime, a
duration or a day uses these; none keeps its own copy.

* Instants: :func:`utc_assuming_local` (any datetime -> aware UTC; a naive one is this process's
  local time, which is how PySpark returns timestamps), :func:`parse_instant` (text a user typed;
  no offset means UTC), :func:`epoch_micros` / :func:`from_epoch_micros`.
* Durations: :func:`micros` (exact microseconds), :func:`spark_interval` (the exact Spark
  interval text, for watermarks, windows, triggers and ``INTERVAL`` literals),
  :func:`parse_duration` / :func:`format_duration` (the configuration's spelling, ``15m``) and
  :func:`describe_duration` (for messages, ``5m 1s``).
* Days: :func:`parse_day` (a UTC day boundary).

Nothing here imports Spark: the online read path uses it too.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from pipelines.core.errors import BadSourceArguments, ConfigError

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_UNIT_MICROS = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}


# --------------------------------------------------------------------------- instants


def utc_assuming_local(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime. An aware one is converted; a naive one is taken as
    this Python process's local time, which is how PySpark hands out timestamps (``collect()``,
    RDD rows, ``transformWithState`` input rows: the process's zone, not the session's)."""
    return moment.astimezone(timezone.utc)


def parse_instant(text: str, flag: str) -> datetime:
    """An ISO-8601 instant a user gave (``--label-cutoff``); ``Z`` or an offset is honoured and
    text without one is UTC (never the host's zone). Returned aware, in UTC; a ConfigError naming
    ``flag`` if it does not parse."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not an ISO-8601 time (e.g. 2026-11-20T00:00:00Z)") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def micros(delta: timedelta) -> int:
    """``delta`` in whole microseconds, exactly (integer arithmetic, no float rounding)."""
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def epoch_micros(moment: datetime) -> int:
    """Microseconds since the epoch (UTC) of ``moment`` (naive: local time, see
    :func:`utc_assuming_local`)."""
    return micros(utc_assuming_local(moment) - EPOCH)


def from_epoch_micros(value: int) -> datetime:
    """The aware UTC datetime ``value`` microseconds after the epoch."""
    return EPOCH + timedelta(microseconds=value)


# --------------------------------------------------------------------------- days


def parse_day(text: str, flag: str) -> date:
    """A UTC day given as ``YYYY-MM-DD`` (or a midnight with an offset); BadSourceArguments naming
    ``flag`` otherwise."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadSourceArguments(f"{flag} {text!r}: not a date (YYYY-MM-DD)") from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    if parsed.time() != time(0):
        raise BadSourceArguments(f"{flag} {text!r}: not a UTC day boundary (feature tables are replaced by "
                                 "whole event_date partitions)")
    return parsed.date()


def day_start(day: date) -> datetime:
    """The aware UTC midnight that starts ``day``."""
    return datetime.combine(day, time(0), timezone.utc)


# --------------------------------------------------------------------------- durations


def spark_interval(delta: timedelta) -> str:
    """``delta`` as Spark interval text, exact to the microsecond: ``'600000000 microseconds'``.
    Spark reads it wherever it takes a duration (``withWatermark``, ``window``,
    ``session_window``, a ``processingTime`` trigger) and after ``INTERVAL`` in SQL
    (``F.expr(f"INTERVAL {spark_interval(d)}")``). Watermark delays and triggers are kept in
    milliseconds by Spark, which is why configuration durations stop at ``ms``."""
    return f"{micros(delta)} microseconds"


def parse_duration(text: Any, key: str = "duration") -> timedelta:
    """``'30s'``, ``'15m'``, ``'1h'``, ``'7d'``, ``'250ms'`` -> timedelta; anything else is a
    ConfigError naming ``key``."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise ConfigError(f"{key}: {text!r} is not a duration (use e.g. 30s, 15m, 1h, 7d)")
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"{key}: {text!r} is not a duration (use e.g. 30s, 15m, 1h, 7d)")
    return timedelta(microseconds=int(match.group(1)) * _UNIT_MICROS[match.group(2)])


def format_duration(delta: timedelta) -> str:
    """The shortest exact spelling of ``delta`` that :func:`parse_duration` reads back, in one
    unit (``90m``, ``1d``, ``250ms``): the form feature names and recorded requests use. A
    duration finer than a millisecond has no such spelling: ValueError, never a rounded one."""
    total = micros(delta)
    for unit in ("d", "h", "m", "s", "ms"):
        if total % _UNIT_MICROS[unit] == 0:
            return f"{total // _UNIT_MICROS[unit]}{unit}"
    raise ValueError(f"{delta!r} is finer than a millisecond: configuration durations cannot spell it")


#: The resolution of the durations in dead-letter reasons: whole seconds (they read "7m 2s").
SECOND = timedelta(seconds=1)


def describe_duration(delta: timedelta, resolution: timedelta = timedelta(microseconds=1)) -> str:
    """``delta`` for a human reading a message: ``22d 12h``, ``5m 1s``, ``1.5s``, ``0s``. Exact
    by default (a fraction of a second is shown); with ``resolution`` it is first cut down to a
    multiple of it (``SECOND``: whole seconds, as dead-letter reasons have always read). Negative
    durations get a leading ``-``."""
    total, step = micros(delta), micros(resolution)
    sign, total = ("-", -total) if total < 0 else ("", total)
    total -= total % step
    days, rest = divmod(total, _UNIT_MICROS["d"])
    hours, rest = divmod(rest, _UNIT_MICROS["h"])
    minutes, rest = divmod(rest, _UNIT_MICROS["m"])
    seconds, fraction = divmod(rest, _UNIT_MICROS["s"])
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m")) if v]
    if seconds or fraction:
        parts.append(f"{seconds}.{fraction:06d}".rstrip("0") + "s" if fraction else f"{seconds}s")
    return sign + (" ".join(parts) or "0s")
