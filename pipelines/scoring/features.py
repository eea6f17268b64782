"""Feature vectors for scored events, read from the online store as the training set's
point-in-time join would give them (:mod:`pipelines.training.join`).

What a scoring job can serve for an event of topic ``T`` (:func:`servable_features`), by the
names a training set gives its columns:

* every field of the event itself (``amount_usd``), as validated, but its id and event time;
* ``{view}__{feature}`` of each trailing view on ``T`` keyed by a field of the event: **the
  row the live path served for this very event** (:meth:`LiveTrailingView.served`), its own
  trailing row with its own contribution, as the batch definition gives it for the event (an
  out-of-order event: its entity's features as they stood when it came, with it counted);
* ``{view}__{feature}`` of each trailing view on another topic keyed by a field of the event
  (``account_fraud_history`` by ``account_id``): the row served for that entity's latest
  event at or before the event's time (:meth:`LiveTrailingView.served_as_of`);
* ``{view}__{feature}`` of each sliding or session view keyed by a field of the event: the
  latest closed window or session in Redis, if it ended at or before the event's time;
* ``{view}__{attribute}`` of each attributes view keyed by a field of the event: the entity's
  current row in the table (:mod:`pipelines.online.attributes`), whatever its age (a row holds
  until the table changes it), None once deleted. It is the row in force at the event's time
  unless a change committed between the event and its scoring, which is then served: the
  freshest knowledge, where training takes the row before it (the vector records the row's
  commit time, so such skew shows).

A row older than the view's ``max_age`` (default: its online TTL) is no row, as in training: the
features come back None, and the model gets them as missing values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from pipelines.core.settings import Settings
from pipelines.core.times import epoch_micros, micros
from pipelines.core.view_spec import FeatureView, feature_names
from pipelines.online.attributes import COMMITTED_FIELD, read_attributes
from pipelines.online.live import LiveTrailingView, ServedRow, output_type, view_spec
from pipelines.online.live_windows import window_spec
from pipelines.online.store import read_online
from pipelines.scoring.model import ServableFeature
from pipelines.training.join import output_column


def contract_types(settings: Settings, topic: str) -> dict[str, str]:
    """Field -> Spark type name of ``topic``'s contract."""
    return {f.name: f.sql_type for f in settings.contract_for(topic).fields}


def view_feature_types(view: FeatureView, column_types: Mapping[str, str]) -> dict[str, str]:
    """Feature -> Spark type of a view the live path computes (raises ConfigError for one it cannot)."""
    if view.kind == "attributes":
        return {name: column_types[name] for name in view.attributes}
    if view.kind == "trailing":
        view_spec(view, column_types)  # refuses what the live path does not serve
        return {name: output_type(function, "bigint" if column == "*" else column_types[column])
                for name, function, column, _ in view.outputs()}
    spec, _ = window_spec(view, column_types)
    types = {o["name"]: o["out_type"] for o in spec["outputs"]}
    types.update({name: "bigint" for name in spec["count_by_names"]})
    if view.kind == "session":
        types.update(event_count="bigint", duration_seconds="double")
    assert set(types) == set(feature_names(view)), view.name
    return types


def servable_features(settings: Settings, topic: str) -> dict[str, ServableFeature]:
    """Every feature a scoring job of ``topic`` can serve, by name (see the module docstring).
    Views served online whose entity is no field of the topic's contract are not among them."""
    event_types = contract_types(settings, topic)
    contract = settings.contract_for(topic)
    # The id and the event time are the event's identity, not inputs (the events topic carries
    # them apart from the other fields).
    required = {f.name for f in contract.fields if f.required}
    servable = {name: ServableFeature(name, kind, nullable=name not in required) for name, kind in event_types.items()
                if name not in (contract.id_field, contract.event_time_field)}
    for view in settings.views.values():
        if not view.online.enabled or view.entity not in event_types:
            continue
        types = view_feature_types(view, contract_types(settings, settings.source_topic(view)))
        for feature, kind in types.items():
            name = output_column(view.name, feature)
            servable[name] = ServableFeature(name, kind, view.name, feature)
    return servable


@dataclass(frozen=True)
class ScoredEvent:
    """One valid event to score: its id, its time and its source record's Kafka append time
    (µs), its place in the events topic, and its fields."""

    event_id: str
    event_micros: int
    append_micros: int
    partition: int
    offset: int
    fields: Mapping[str, Any]


@dataclass
class Vector:
    """An event's feature values by name, and per view used the row's event time (µs) and when
    it was computed (ms, the Redis clock; None for windowed views: the row has no such time)."""

    values: dict[str, Any]
    rows: dict[str, tuple[int | None, int | None]]


class FeatureReader:
    """Reads the features ``names`` need from Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis, settings: Settings, topic: str, servable: Mapping[str, ServableFeature],
                 names: Sequence[str]):
        self.client = client
        self.namespace = settings.redis.namespace
        self.topic = topic
        self.names = list(names)
        self.event_fields = [n for n in names if servable[n].view is None]
        by_view: dict[str, list[str]] = {}
        for name in names:
            feature = servable[name]
            if feature.view is not None:
                by_view.setdefault(feature.view, []).append(feature.feature)
        self.views = {name: settings.views[name] for name in by_view}
        self.features = by_view
        self.trailing = {
            name: LiveTrailingView(client, self.namespace, view, contract_types(settings, settings.source_topic(view)))
            for name, view in self.views.items() if view.kind == "trailing"
        }
        #: Trailing views on the scored topic: their row is the event's own, by its id.
        self.own = sorted(n for n in self.trailing if settings.source_topic(self.views[n]) == topic)

    def own_rows(self, events: Sequence[ScoredEvent]) -> dict[str, list[ServedRow | None]]:
        """Per own view, the row served for each event (None: not applied yet, or forgotten)."""
        return {name: self.trailing[name].served([(e.fields.get(self.views[name].entity), e.event_id) for e in events])
                for name in self.own}

    def vectors(self, events: Sequence[ScoredEvent], own: Mapping[str, Sequence[ServedRow | None]],
                now: datetime) -> list[Vector]:
        """One vector per event: ``own`` gives the own views' rows (from :meth:`own_rows`; a
        None there leaves the view's features None), the other views are read now."""
        vectors = [Vector({n: e.fields.get(n) for n in self.event_fields}, {}) for e in events]
        for name, view in self.views.items():
            entities = [e.fields.get(view.entity) for e in events]
            oldest = [e.event_micros - micros(view.training_max_age) for e in events]
            if name in own:
                rows = list(own[name])
            elif name in self.trailing:
                rows = self.trailing[name].served_as_of([(entity, e.event_micros) for entity, e in zip(entities, events)])
            elif view.kind == "attributes":
                rows = self._attributes(view, entities)
            else:
                rows = self._windowed(view, entities, now)
            for vector, event, row, floor in zip(vectors, events, rows, oldest):
                # The event's own row is its own whatever its time (an out-of-order event's is its
                # entity's latest time); another view's row counts only within [t - max_age, t].
                usable = row is not None and (name in own or view.kind == "attributes"
                                              or floor <= row.event_micros <= event.event_micros)
                for feature in self.features[name]:
                    vector.values[output_column(name, feature)] = row.value(feature) if usable else None
                vector.rows[name] = (row.event_micros, row.computed_ms or None) if usable else (None, None)
        return vectors

    def _attributes(self, view: FeatureView, entities: Sequence[Any]) -> list[ServedRow | None]:
        known = [e for e in entities if e is not None]
        values = iter(read_attributes(self.client, self.namespace, view.source.contract, known,
                                      self.features[view.name]))
        rows: list[ServedRow | None] = []
        for entity in entities:
            value = next(values) if entity is not None else None
            if value is None:
                rows.append(None)
            else:
                committed = value[COMMITTED_FIELD] or 0  # 0: a hash from before commit times were kept
                rows.append(ServedRow(committed, committed // 1000, {f: value[f] for f in self.features[view.name]}))
        return rows

    def _windowed(self, view: FeatureView, entities: Sequence[Any], now: datetime) -> list[ServedRow | None]:
        known = [e for e in entities if e is not None]
        values = iter(read_online(self.client, self.namespace, view.name, self.features[view.name], known, now))
        rows: list[ServedRow | None] = []
        for entity in entities:
            value = next(values) if entity is not None else None
            if value is None or value["event_time"] is None:
                rows.append(None)
            else:
                rows.append(ServedRow(epoch_micros(value["event_time"]), 0,
                                      {f: value[f] for f in self.features[view.name]}))
        return rows
