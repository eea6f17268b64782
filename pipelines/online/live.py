"""Live trailing features: each event's effect on its entity's online value, computed inside
Redis by one atomic server-side script per entity and batch.

The online path (:mod:`pipelines.features.online_path`) hands each micro-batch's valid events
here. For each view and entity, Redis keeps the entity's events that can still count for its
latest event, keyed by event id, and the script:

1. adds the batch's events that are new (``HSETNX`` on the event id: a redelivered event or a
   replayed batch changes nothing; the first delivery wins, as in bronze);
2. forgets every event at or before the horizon ``T - delay - longest window`` (``T``: the
   latest event time of the entity), which can never count for a later event again; an event
   arriving at or before it is not stored either;
3. when something was added, recomputes every feature for ``T`` exactly as the batch
   definition does (:mod:`pipelines.core.view_spec`: window ``(T - delay - w, T - delay]``,
   the null and empty rules of :mod:`pipelines.features.transforms`) over the stored events,
   including out-of-order ones;
4. writes the feature hash with the newer-wins rule of :mod:`pipelines.online.store`. Its
   version is the entity's own change counter (1, 2, ...), always below the durable path's
   versions (``computed_at`` in microseconds since the epoch): a newer event time from this
   path wins at once, and for one event time the feature stream's row (and any correction,
   backfill or late recompute of it) wins over this path's.

Keys (beside the feature hash ``{namespace}:{view}:{entity}``):
``{namespace}:~live:{view}:events:{entity}`` (hash: event id -> JSON array of the event's
values), ``...:times:{entity}`` (sorted set: event id by event time in µs) and ``...:meta:{entity}``
(``max_t``, ``seq``); all expire after the view's TTL or its longest window + delay, whichever
is longer, from the entity's last event.

Cost: one script per entity and batch, linear in the entity's events inside its longest
window. Supported functions are all of :data:`pipelines.core.view_spec.FUNCTIONS` over string,
double, bigint and boolean columns; a view aggregating a timestamp column is refused at start.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis

from pipelines.core.errors import ConfigError
from pipelines.core.times import micros
from pipelines.core.view_spec import FeatureView
from pipelines.online.store import TRANSIENT_ERRORS, OnlineStoreError, entity_key

log = logging.getLogger(__name__)

_SUPPORTED_TYPES = ("string", "double", "bigint", "boolean")

_SCRIPT = r"""
local spec = cjson.decode(%(spec)s)
local fkey, evkey, tkey, mkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, state_ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function int(x) return string.format('%%.0f', x) end

local stored_max = redis.call('HGET', mkey, 'max_t')
local max_t = stored_max and tonumber(stored_max) or nil
for i = 0, n - 1 do
  local t = tonumber(ARGV[5 + 3 * i])
  if max_t == nil or t > max_t then max_t = t end
end
local horizon = max_t - spec.delay - spec.span
local added = 0
for i = 0, n - 1 do
  local id, t = ARGV[4 + 3 * i], tonumber(ARGV[5 + 3 * i])
  if t > horizon and redis.call('HSETNX', evkey, id, ARGV[6 + 3 * i]) == 1 then
    redis.call('ZADD', tkey, int(t), id)
    added = added + 1
  end
end
if added == 0 then return {0, 0} end

local old = redis.call('ZRANGEBYSCORE', tkey, '-inf', int(horizon))
for i = 1, #old, 1000 do
  redis.call('HDEL', evkey, unpack(old, i, math.min(i + 999, #old)))
end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', tkey, '-inf', int(horizon)) end
local seq = redis.call('HINCRBY', mkey, 'seq', 1)
redis.call('HSET', mkey, 'max_t', int(max_t))
for _, key in ipairs({evkey, tkey, mkey}) do redis.call('PEXPIRE', key, state_ttl) end

local function number_text(x, kind)
  if x ~= x then return 'NaN' end
  if x == math.huge then return 'Infinity' end
  if x == -math.huge then return '-Infinity' end
  if kind == 'bigint' then return int(x) end
  local text = string.format('%%.17g', x)
  if not string.find(text, '[%%.eE]') then text = text .. '.0' end
  return text
end
local function value_text(x, kind)
  if kind == 'string' then return cjson.encode(x) end
  if kind == 'boolean' then return x and 'true' or 'false' end
  return number_text(x, kind)
end
local function less(a, b, kind)
  if kind == 'boolean' then return (not a) and b end
  return a < b
end

local cache = {}
local function window_events(w)
  if cache[w] then return cache[w] end
  local hi = max_t - spec.delay
  local pairs_ = redis.call('ZRANGEBYSCORE', tkey, '(' .. int(hi - w), int(hi), 'WITHSCORES')
  local ids, times = {}, {}
  for i = 1, #pairs_, 2 do ids[#ids + 1] = pairs_[i]; times[#times + 1] = tonumber(pairs_[i + 1]) end
  local rows = {}
  for i = 1, #ids, 1000 do
    local raw = redis.call('HMGET', evkey, unpack(ids, i, math.min(i + 999, #ids)))
    for j = 1, #raw do
      rows[#rows + 1] = {t = times[i + j - 1], v = cjson.decode(raw[j])}
    end
  end
  cache[w] = rows
  return rows
end

local out = {}
for _, o in ipairs(spec.outputs) do
  local rows = window_events(o.window)
  local result = nil
  if o.fn == 'count' and o.col == 0 then
    result = #rows
  else
    local count, sum, best, best_t, distinct, seen = 0, 0, nil, nil, 0, {}
    for _, r in ipairs(rows) do
      local v = r.v[o.col]
      if v ~= nil and v ~= cjson.null then
        count = count + 1
        if o.fn == 'sum' or o.fn == 'avg' then sum = sum + v
        elseif o.fn == 'max' then if best == nil or less(best, v, o.type) then best = v end
        elseif o.fn == 'min' then if best == nil or less(v, best, o.type) then best = v end
        elseif o.fn == 'last' then
          if best_t == nil or r.t > best_t or (r.t == best_t and less(best, v, o.type)) then best, best_t = v, r.t end
        elseif o.fn == 'approx_count_distinct' then
          local k = type(v) .. ':' .. tostring(v)
          if type(v) == 'number' then k = 'n:' .. string.format('%%.17g', v) end
          if not seen[k] then seen[k] = true; distinct = distinct + 1 end
        end
      end
    end
    if o.fn == 'count' then result = count
    elseif o.fn == 'sum' then result = sum
    elseif o.fn == 'avg' then if count > 0 then result = sum / count end
    elseif o.fn == 'approx_count_distinct' then result = distinct
    else result = best end
  end
  if result ~= nil then
    out[#out + 1] = o.name
    out[#out + 1] = value_text(result, o.out_type)
  end
end

local stored = redis.call('HMGET', fkey, '_event_time', '_version')
if stored[1] then
  local stored_time, stored_version = tonumber(stored[1]), tonumber(stored[2])
  if max_t < stored_time or (max_t == stored_time and seq <= stored_version) then return {added, 0} end
end
redis.call('DEL', fkey)
redis.call('HSET', fkey, '_event_time', int(max_t), '_version', seq, unpack(out))
redis.call('PEXPIRE', fkey, ttl)
return {added, 1}
"""


def _output_type(function: str, column_type: str) -> str:
    """The Spark type of a trailing feature (as the batch transform gives it)."""
    if function in ("count", "approx_count_distinct"):
        return "bigint"
    if function == "avg":
        return "double"
    return column_type  # sum keeps a bigint or double column's type; min/max/last the column's


def view_spec(view: FeatureView, column_types: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The script's view description (delay, longest window, outputs) and the ordered columns
    whose values each stored event carries. Raises ConfigError for a view it cannot serve."""
    if view.kind != "trailing":
        raise ConfigError(f"view {view.name}: only trailing views are computed live (kind {view.kind!r})")
    columns: list[str] = []
    outputs = []
    for name, function, column, window in view.outputs():
        assert window is not None
        if column == "*":
            index, kind = 0, "bigint"
        else:
            kind = column_types[column]
            if kind not in _SUPPORTED_TYPES:
                raise ConfigError(f"view {view.name}: feature {name!r} aggregates {column!r} of type {kind}; "
                                  f"the live path serves {', '.join(_SUPPORTED_TYPES)} columns")
            if column not in columns:
                columns.append(column)
            index = columns.index(column) + 1
        outputs.append({"name": name, "fn": function, "col": index, "window": micros(window),
                        "type": kind, "out_type": _output_type(function, kind)})
    spec = {"delay": micros(view.delay), "span": max(o["window"] for o in outputs), "outputs": outputs}
    return spec, columns


@dataclass(frozen=True)
class LiveResult:
    """What one batch did to one view: events new to Redis, feature hashes written, and entities
    whose hash held a newer or durable row (left as they were)."""

    added: int
    written: int
    kept: int


class LiveTrailingView:
    """Applies events to one trailing view's live state in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis, namespace: str, view: FeatureView, column_types: Mapping[str, str],
                 entities_per_round_trip: int = 200, attempts: int = 8, backoff: float = 0.25):
        self.client = client
        self.namespace = namespace
        self.view = view
        spec, self.columns = view_spec(view, column_types)
        self.ttl_ms = micros(view.online.ttl) // 1000
        self.state_ttl_ms = micros(state_ttl(view)) // 1000
        self.chunk = entities_per_round_trip
        self.attempts = attempts
        self.backoff = backoff
        self._script = client.register_script(_SCRIPT % {"spec": _lua_string(json.dumps(spec))})

    def state_keys(self, entity: Any) -> list[str]:
        prefix = f"{self.namespace}:~live:{self.view.name}"
        return [f"{prefix}:events:{entity}", f"{prefix}:times:{entity}", f"{prefix}:meta:{entity}"]

    def apply(self, events: Iterable[Sequence[Any]]) -> LiveResult:
        """Apply ``events``: tuples of (entity, event id, event time in µs since the epoch, then
        the values of :attr:`columns` in order). Events with a null entity are skipped (the
        contract makes the entity required, so valid events have one)."""
        by_entity: dict[Any, list[Any]] = defaultdict(list)
        for entity, event_id, event_micros, *values in events:
            if entity is None:
                continue
            by_entity[entity] += [event_id, event_micros, json.dumps(values, separators=(",", ":"))]
        added = written = kept = 0
        entities = list(by_entity)
        for start in range(0, len(entities), self.chunk):
            for (new, wrote) in self._run(entities[start:start + self.chunk], by_entity):
                added += new
                written += wrote
                kept += 1 if new and not wrote else 0
        return LiveResult(added, written, kept)

    def _run(self, entities: list[Any], by_entity: Mapping[Any, list[Any]]) -> list[tuple[int, int]]:
        for attempt in range(1, self.attempts + 1):
            try:
                pipe = self.client.pipeline(transaction=False)
                for entity in entities:
                    args = by_entity[entity]
                    self._script(keys=[entity_key(self.namespace, self.view.name, entity), *self.state_keys(entity)],
                                 args=[self.ttl_ms, self.state_ttl_ms, len(args) // 3, *args], client=pipe)
                return [(int(r[0]), int(r[1])) for r in pipe.execute()]
            except TRANSIENT_ERRORS as exc:
                # Safe to repeat: an event already stored is not added again.
                if attempt == self.attempts:
                    raise OnlineStoreError(
                        f"live update of view {self.view.name!r} failed {self.attempts} times: {exc}") from exc
                pause = min(self.backoff * 2 ** (attempt - 1), 8.0)
                log.warning("live update of view %s failed (%s): retry %d in %.1fs", self.view.name, exc, attempt, pause)
                time.sleep(pause)
        raise AssertionError("unreachable")


def _lua_string(text: str) -> str:
    """``text`` as a Lua long-bracket string literal (no escapes needed inside)."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def state_ttl(view: FeatureView) -> timedelta:
    """How long an entity's live state outlives its last event."""
    longest = max(w for agg in view.aggregations for w in agg.windows)
    return max(view.online.ttl, longest + view.delay + timedelta(minutes=1))
