"""The online read API: a view's feature values for a list of entities, from Redis.

Importable without Spark: a model server that only reads features loads its settings
(:func:`pipelines.core.settings.load_settings`) and calls :func:`get_online_features`, and
neither imports pyspark (a test checks it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import pandas as pd
import redis

from pipelines.core.settings import RedisSettings, Settings
from pipelines.core.view_spec import feature_names
from pipelines.online.store import read_online, redis_client


@functools.lru_cache(maxsize=8)
def _shared_client(settings: RedisSettings) -> redis.Redis:
    """One client (one connection pool) per Redis settings: serving reuses its connections."""
    return redis_client(settings)


def get_online_features(settings: Settings, view: str, entity_ids: Sequence[Any], as_pandas: bool = False,
                        client: redis.Redis | None = None) -> list[dict[str, Any]] | pd.DataFrame:
    """The online values of ``view`` for ``entity_ids``: one row per requested entity, in order,
    with ``entity``, every feature, ``event_time`` (UTC) and ``age_seconds`` (now - event time).

    A missing or expired entity, and a feature stored as null, come back as None (NaN/NaT in
    pandas): never an error, never a default. An undeclared view raises ``KeyError``. Calls
    share one connection pool per Redis settings (or pass ``client``).
    """
    if view not in settings.views:
        raise KeyError(f"view {view!r} is not declared in conf/features ({', '.join(settings.views)})")
    if isinstance(entity_ids, (str, bytes)):
        raise TypeError("entity_ids: a sequence of ids, not one string")
    declared = settings.views[view]
    names = feature_names(declared)
    rows = read_online(client or _shared_client(settings.redis), settings.redis.namespace, view, names,
                       list(entity_ids))
    if not as_pandas:
        return rows
    return pd.DataFrame(rows, columns=["entity", *names, "event_time", "age_seconds"])
