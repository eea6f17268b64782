"""The online read API: a view's feature values for a list of entities, from Redis.

Importable without Spark: a model server that only reads features loads its settings
(:func:`pipelines.core.settings.load_settings`) and calls :func:`get_online_features`, and
neither imports pyspark (a test checks it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import pandas as pd
import redis

from pipelines.core.settings import RedisSettings, Settings
from pipelines.core.view_spec import feature_names
from pipelines.online.attributes import COMMITTED_FIELD, read_attributes
from pipelines.online.store import read_online, redis_client


def attribute_rows(client: redis.Redis, namespace: str, table: str, names: Sequence[str], entity_ids: Sequence[Any]
                   ) -> list[dict[str, Any]]:
    """:func:`get_online_features`' rows for an attributes view."""
    now = datetime.now(timezone.utc)
    rows = []
    for entity, stored in zip(entity_ids, read_attributes(client, namespace, table, entity_ids, names)):
        row: dict[str, Any] = {"entity": entity, **{n: stored[n] if stored else None for n in names}}
        committed = (datetime.fromtimestamp(0, timezone.utc) + timedelta(microseconds=stored[COMMITTED_FIELD])
                     if stored and stored[COMMITTED_FIELD] is not None else None)
        row["event_time"] = committed
        row["age_seconds"] = (now - committed).total_seconds() if committed else None
        rows.append(row)
    return rows


@functools.lru_cache(maxsize=8)
def _shared_client(settings: RedisSettings) -> redis.Redis:
    """One client (one connection pool) per Redis settings: serving reuses its connections."""
    return redis_client(settings)


def get_online_features(settings: Settings, view: str, entity_ids: Sequence[Any], as_pandas: bool = False,
                        client: redis.Redis | None = None) -> list[dict[str, Any]] | pd.DataFrame:
    """The online values of ``view`` for ``entity_ids``: one row per requested entity, in order,
    with ``entity``, every feature, ``event_time`` (UTC) and ``age_seconds`` (now - event time).

    A missing or expired entity, and a feature stored as null, come back as None (NaN/NaT in
    pandas): never an error, never a default. An attributes view gives the entity's current row
    in its table, ``event_time`` the commit time of its last change (a deleted row: None). An undeclared view raises ``KeyError``. Calls
    share one connection pool per Redis settings (or pass ``client``).
    """
    if view not in settings.views:
        raise KeyError(f"view {view!r} is not declared in conf/features ({', '.join(settings.views)})")
    if isinstance(entity_ids, (str, bytes)):
        raise TypeError("entity_ids: a sequence of ids, not one string")
    declared = settings.views[view]
    names = feature_names(declared)
    client = client or _shared_client(settings.redis)
    if declared.kind == "attributes":
        rows = attribute_rows(client, settings.redis.namespace, declared.source.contract, names, list(entity_ids))
    else:
        rows = read_online(client, settings.redis.namespace, view, names, list(entity_ids))
    if not as_pandas:
        return rows
    return pd.DataFrame(rows, columns=["entity", *names, "event_time", "age_seconds"])
