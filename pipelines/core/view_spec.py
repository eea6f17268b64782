"""Feature views: declared in ``conf/features/*.yaml`` (one file per domain), checked at load time.

A view names a source, an entity key column, an event-time column, a kind, its aggregations
and its online settings. Loading rejects, naming the file and key: unknown keys, unknown
columns, columns of an unusable type for a function, bad durations and unsupported functions.

Kinds and their semantics (the transforms are in :mod:`pipelines.features.transforms`):

* ``trailing``: one row per source event. For an event of entity k at time t, an aggregate
  over window w covers k's events with event time in the half-open interval
  ``(t - delay - w, t - delay]``: with ``delay: 0s`` the event itself and every other event of
  k at exactly t are included, an event exactly w before t is not.
* ``sliding``: event-time windows of ``window`` every ``slide`` per entity (``slide`` =
  ``window``, the default, is tumbling); one row per (entity, window) with events.
* ``session``: session windows per entity closed after ``gap`` without events.
* ``attributes``: an entity's row in an operational database table, captured by ``fp-cdc``
  (its contract has ``format: debezium``; the entity is the table's key). Nothing computes it:
  its rows are the table's history (one per committed change, the commit time as event time),
  a training set takes the row in force at T (a deleted row: nulls), the online store serves
  the current row. ``attributes`` names the columns served (default: every column but the key).

Output names are derived as ``{function}_{column}_{window}`` (``count_{window}`` for
``column: "*"``; sliding and session views drop the ``_{window}`` suffix), and can be
overridden per aggregation with ``names: {derived: chosen}``.

Column types are Spark SQL type names (``string``, ``bigint``...), so views load, and the
online store reads them, without Spark.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from pipelines.core.config import build, read_yaml
from pipelines.core.contract_spec import Contract
from pipelines.core.errors import ConfigError
from pipelines.core.times import format_duration

#: The kinds the feature jobs compute from events.
COMPUTED_KINDS = ("trailing", "sliding", "session")
KINDS = (*COMPUTED_KINDS, "attributes")
#: An attributes row holds until the table changes it: no age limit in training (a century).
UNBOUNDED_AGE = timedelta(days=36_500)
#: The file formats the platform reads: a backfill's files, a spine.
FILE_FORMATS = ("parquet", "csv", "json")
FUNCTIONS = ("count", "sum", "avg", "min", "max", "approx_count_distinct", "last")
_NUMERIC_ONLY = {"sum", "avg"}
_ORDERABLE = {"min", "max"}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Aggregation:
    """``functions`` of ``column`` over each of ``windows`` (trailing views only)."""

    column: str
    functions: tuple[str, ...]
    windows: tuple[timedelta, ...] = ()
    #: Derived output name -> the name to use instead.
    names: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CountBy:
    """Session views: one count per listed value of ``column`` (``count_{column}_{value}``)."""

    column: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class SourceSpec:
    """Where a view's events come from: the bronze table of the ingested topic whose contract
    this is (the stream, backfills and the late recompute all read it; files reach a view
    through ``fp-backfill --source files``)."""

    contract: str


@dataclass(frozen=True)
class OnlineSpec:
    #: How long Redis keeps an entity's values after their last write.
    ttl: timedelta = timedelta(days=7)
    enabled: bool = True


@dataclass(frozen=True)
class FeatureView:
    name: str
    source: SourceSpec
    entity: str
    kind: str
    #: The source's event-time column (computed kinds; an attributes view has none).
    event_time: str = ""
    aggregations: tuple[Aggregation, ...] = ()
    description: str = ""
    #: trailing: shift every interval back by this much (inputs trusted only after a delay).
    delay: timedelta = timedelta(0)
    #: sliding: the window length and step (tumbling when equal).
    window: timedelta | None = None
    slide: timedelta | None = None
    #: How late an event may arrive and still count (the watermark delay). Events behind the
    #: watermark are left out of the stream (a backfill from bronze computes them).
    allowed_lateness: timedelta = timedelta(minutes=10)
    #: trailing, on a stream: at most this many events kept in state per entity (the newest).
    #: An entity with more events in ``max window + delay`` gets features over only its newest
    #: ones, and a warning naming it is logged: size it above the busiest entity's rate.
    max_events_per_entity: int = 100_000
    #: session: inactivity that closes a session.
    gap: timedelta | None = None
    count_by: tuple[CountBy, ...] = ()
    online: OnlineSpec = field(default_factory=OnlineSpec)
    #: attributes: the table's columns served (empty in the YAML: every column but the key).
    attributes: tuple[str, ...] = ()
    #: Training sets: the oldest feature row a spine row at time T may take (event time >=
    #: T - max_age); unset: ``online.ttl``, so training sees a value exactly as long as the online
    #: store would still serve it. Overridable per training-set request.
    max_age: timedelta | None = None

    @property
    def computed(self) -> bool:
        """Whether a feature job computes the view from events (every kind but attributes)."""
        return self.kind in COMPUTED_KINDS

    @property
    def training_max_age(self) -> timedelta:
        if self.max_age is not None:
            return self.max_age
        return self.online.ttl if self.computed else UNBOUNDED_AGE

    def outputs(self) -> list[tuple[str, str, str, timedelta | None]]:
        """``(output name, function, column, window)`` for every feature, in declaration order."""
        result = []
        for agg in self.aggregations:
            windows: tuple[timedelta | None, ...] = agg.windows if self.kind == "trailing" else (None,)
            for window in windows:
                for function in agg.functions:
                    derived = output_name(function, agg.column, window)
                    result.append((agg.names.get(derived, derived), function, agg.column, window))
        return result

    @property
    def max_lookback(self) -> timedelta:
        """How much history before an event a trailing view needs: max window + delay."""
        windows = [w for agg in self.aggregations for w in agg.windows]
        return (max(windows) if windows else timedelta(0)) + self.delay


def output_name(function: str, column: str, window: timedelta | None) -> str:
    """``sum``, ``amount_usd``, 1h -> ``sum_amount_usd_1h``; ``count``, ``*``, 1h -> ``count_1h``."""
    parts = [function] if column == "*" else [function, column]
    if window is not None:
        parts.append(format_duration(window))
    return "_".join(parts)


#: The column that orders a view's rows in time (and that Redis compares on), by kind; trailing
#: rows are ordered by the view's own event-time column.
EVENT_TIME_COLUMN = {"trailing": None, "sliding": "window_end", "session": "session_end", "attributes": "valid_from"}


def event_time_column(view: FeatureView) -> str:
    """The column of the view's rows that says when a row's values hold: the event time for
    trailing views, the window end for sliding views, the session end for session views, the
    change's commit time (``valid_from`` of the history table) for attributes views."""
    return EVENT_TIME_COLUMN[view.kind] or view.event_time


def feature_names(view: FeatureView) -> list[str]:
    """Every feature column the view's transform outputs (what Redis stores), in order."""
    if view.kind == "attributes":
        return list(view.attributes)
    names = [name for name, *_ in view.outputs()]
    if view.kind == "session":
        names = ["event_count", "duration_seconds", *names]
        names += [f"count_{by.column}_{value}" for by in view.count_by for value in by.values]
    return names


#: Spark SQL type names by what a function can do with them.
_NUMERIC_TYPES = ("tinyint", "smallint", "int", "bigint", "float", "double")
_ORDERABLE_TYPES = ("string", "timestamp", "boolean")


def _numeric(type_name: str) -> bool:
    return type_name in _NUMERIC_TYPES


def _usable(function: str, type_name: str) -> bool:
    if function in _NUMERIC_ONLY:
        return _numeric(type_name)
    if function in _ORDERABLE:
        return _numeric(type_name) or type_name in _ORDERABLE_TYPES
    return True


def source_columns(view: FeatureView, contracts: Mapping[str, Contract], where: str) -> dict[str, str]:
    """The columns a view can reference, name -> Spark SQL type name: its contract's fields."""
    contract = view.source.contract
    if contract not in contracts:
        raise ConfigError(f"{where}.source.contract: no contract {contract!r} ({', '.join(sorted(contracts))})")
    return {f.name: f.sql_type for f in contracts[contract].fields}


def check_view(view: FeatureView, contracts: Mapping[str, Contract], where: str) -> None:
    """Reject a view that cannot be computed, naming the key and the reason."""
    if not _NAME.match(view.name):
        raise ConfigError(f"{where}.name: {view.name!r} must be lower_snake_case")
    if view.kind not in KINDS:
        raise ConfigError(f"{where}.kind: {view.kind!r} is not one of {', '.join(KINDS)}")
    types = source_columns(view, contracts, where)

    def column(name: str, key: str) -> str:
        if name not in types:
            raise ConfigError(f"{where}.{key}: no column {name!r} in the source ({', '.join(types)})")
        return types[name]

    column(view.entity, "entity")
    if view.kind == "attributes":
        _check_attributes_view(view, contracts[view.source.contract], where)
        return
    if view.max_events_per_entity <= 0:
        raise ConfigError(f"{where}.max_events_per_entity: must be positive")
    if view.max_age is not None and view.max_age <= timedelta(0):
        raise ConfigError(f"{where}.max_age: must be positive")
    if view.attributes:
        raise ConfigError(f"{where}.attributes: only attributes views take attributes")
    if not view.event_time:
        raise ConfigError(f"{where}.event_time: a {view.kind} view needs its source's event-time column")
    if column(view.event_time, "event_time") != "timestamp":
        raise ConfigError(f"{where}.event_time: {view.event_time!r} is not a timestamp")
    if view.kind == "trailing":
        for i, agg in enumerate(view.aggregations):
            if not agg.windows:
                raise ConfigError(f"{where}.aggregations[{i}].windows: a trailing view needs windows")
            if any(w <= timedelta(0) for w in agg.windows):
                raise ConfigError(f"{where}.aggregations[{i}].windows: windows must be positive")
    else:
        for i, agg in enumerate(view.aggregations):
            if agg.windows:
                raise ConfigError(
                    f"{where}.aggregations[{i}].windows: only trailing views take windows per "
                    f"aggregation; a {view.kind} view has one window for all"
                )
        if view.delay:
            raise ConfigError(f"{where}.delay: only trailing views take a delay")
    if view.kind == "sliding":
        if view.window is None or view.window <= timedelta(0):
            raise ConfigError(f"{where}.window: a sliding view needs a positive window")
        slide = view.slide or view.window
        if slide <= timedelta(0) or slide > view.window:
            raise ConfigError(f"{where}.slide: must be positive and at most the window")
    elif view.window is not None or view.slide is not None:
        raise ConfigError(f"{where}.window: only sliding views take window/slide")
    if view.kind == "session":
        if view.gap is None or view.gap <= timedelta(0):
            raise ConfigError(f"{where}.gap: a session view needs a positive gap")
    elif view.gap is not None or view.count_by:
        raise ConfigError(f"{where}.gap: only session views take gap/count_by")
    for i, by in enumerate(view.count_by):
        column(by.column, f"count_by[{i}].column")
    if not view.aggregations and not view.count_by and view.kind != "session":
        raise ConfigError(f"{where}.aggregations: a {view.kind} view needs at least one aggregation")
    for i, agg in enumerate(view.aggregations):
        key = f"aggregations[{i}]"
        for function in agg.functions:
            if function not in FUNCTIONS:
                raise ConfigError(f"{where}.{key}.functions: {function!r} is not one of {', '.join(FUNCTIONS)}")
        if agg.column == "*":
            if set(agg.functions) != {"count"}:
                raise ConfigError(f"{where}.{key}.column: '*' only counts events (functions: [count])")
            continue
        data_type = column(agg.column, f"{key}.column")
        for function in agg.functions:
            if not _usable(function, data_type):
                raise ConfigError(
                    f"{where}.{key}: {function} needs a "
                    f"{'numeric' if function in _NUMERIC_ONLY else 'numeric, string, boolean or timestamp'} column, "
                    f"{agg.column!r} is {data_type}"
                )
    names = [name for name, *_ in view.outputs()]
    taken = {view.entity, view.event_time, "window_start", "window_end", "session_start", "session_end",
             "event_count", "duration_seconds", "computed_at", "event_date"}
    for name in names:
        if names.count(name) > 1 or name in taken:
            raise ConfigError(f"{where}.aggregations: output name {name!r} is used twice or reserved")
        if not _NAME.match(name):
            raise ConfigError(f"{where}.aggregations: output name {name!r} must be lower_snake_case")


def _check_attributes_view(view: FeatureView, contract: Contract, where: str) -> None:
    if not contract.is_changes:
        raise ConfigError(f"{where}.source.contract: an attributes view reads a table's changes: contract "
                          f"{contract.name!r} is not of format: debezium")
    if view.entity != contract.key_field:
        raise ConfigError(f"{where}.entity: an attributes view's entity is its table's key "
                          f"{contract.key_field!r}, not {view.entity!r}")
    given = {"event_time": view.event_time, "aggregations": view.aggregations, "delay": view.delay,
             "window": view.window, "slide": view.slide, "gap": view.gap, "count_by": view.count_by,
             "max_age": view.max_age}
    for key, value in given.items():
        if value:
            raise ConfigError(f"{where}.{key}: an attributes view takes none (its rows hold from each change's "
                              "commit until the next change)")
    others = [name for name in contract.field_names if name != contract.key_field]
    for name in view.attributes:
        if name not in others:
            raise ConfigError(f"{where}.attributes: no column {name!r} in {contract.name} besides its key "
                              f"({', '.join(others)})")
    if len(set(view.attributes)) != len(view.attributes):
        raise ConfigError(f"{where}.attributes: a column is listed twice")


def load_views(folder: Path, contracts: Mapping[str, Contract]) -> dict[str, FeatureView]:
    """Every view in ``folder/*.yaml`` (each file: ``views: [...]``), by name, checked."""
    views: dict[str, FeatureView] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        data = read_yaml(path)
        unknown = sorted(set(data) - {"views", "description"})
        if unknown:
            raise ConfigError(f"{path}: {unknown[0]}: unknown key (expected views, description)")
        if not isinstance(data.get("views"), list):
            raise ConfigError(f"{path}: views: expected a list of feature views")
        for i, entry in enumerate(data["views"]):
            where = f"{path}: views[{i}]"
            source = entry.get("source") if isinstance(entry, Mapping) else None
            if isinstance(source, Mapping) and "path" in source:
                # Said plainly, not as an unknown key: the README once documented path sources.
                raise ConfigError(
                    f"{where}.source.path: path sources are not supported (no stream, backfill or late "
                    "recompute could compute the view); declare the events' contract as the source, ingest "
                    "them through its topic, and load history with fp-backfill --source files")
            view = build(FeatureView, entry, where)
            check_view(view, contracts, where)
            if view.kind == "attributes" and not view.attributes:
                contract = contracts[view.source.contract]
                view = replace(view, attributes=tuple(n for n in contract.field_names if n != contract.key_field))
            if view.name in views:
                raise ConfigError(f"{where}.name: view {view.name!r} is declared twice")
            views[view.name] = view
    return views
