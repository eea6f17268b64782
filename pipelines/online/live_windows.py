"""Live sliding and session views: windows kept open in Redis, closed and written to the online
store in the batch whose events move the watermark past their end.

Semantics are the feature stream's (:func:`pipelines.features.transforms.sliding_features`,
:func:`~pipelines.features.transforms.session_features`, README "Feature views"), with the
watermark of the live path instead of the feature stream's:

* the watermark of a view is the latest event time of the valid events the live path has
  read from the view's topic, minus ``allowed_lateness``; as in Spark it moves at the end of a
  batch and never back, and the events of a batch are judged against the watermark before it;
* sliding: an event counts in every window ``[start, start + window)`` (starts aligned to the
  epoch, ``slide`` apart) that contains it and ends after the watermark; an event late for all
  of them is dropped;
* session: an event opens ``[t, t + gap)``, merged with every open session it overlaps or
  touches (as Spark merges them: an event exactly ``gap`` after the last one extends the
  session, and an out-of-order event can join two sessions); it is dropped when ``t + gap`` is
  at or before the watermark. A session ends ``gap`` after its last event;
* a window or session closes when the watermark reaches its end (end <= watermark): its row is
  written to the feature hash with the newer-wins rule, at version 1, below every version of
  the durable path (which restates the same window with its own row). Of the windows an entity
  closes in one batch, the latest is written (the online store serves the latest).

Functions: as for trailing views, with ``approx_count_distinct`` exact here (the feature stream
uses Spark's HyperLogLog++, whose estimate restates the exact count when its row arrives).

Keys under ``{namespace}:~live:{view}``: ``ids:{entity}`` (sorted set: the ids of events still
inside an open window or session, by time: a redelivered event changes nothing) and
``open:{entity}`` (hash: window start, or session first event time -> the msgpack of its
aggregates). Both expire after the state TTL from the entity's last event. Which entities
hold an open window, and its earliest end, is the caller's own sorted set (``pending``), so
that every script touches the keys of one entity only. ``definition`` holds a digest of the
layout; a changed view definition is refused at start until its state is cleared.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis

from pipelines.core.errors import ConfigError
from pipelines.core.times import micros
from pipelines.core.view_spec import FeatureView, feature_names
from pipelines.online.live import claim_definition, column_index, definition_digest, output_type
from pipelines.online.lua import PRELUDE, lua_literal
from pipelines.online.store import entity_key, retry_transient

#: Aggregates of one window or session: first/last event time, the event count, and per column
#: (by its 1-based index) the non-null count, a compensated sum, max, min, the latest (time,
#: value), and the distinct values; per count_by value, its count.
_AGGREGATES = r"""
local function new_state() return {n = 0, nn = {}, s = {}, k = {}, mx = {}, mn = {}, lt = {}, lv = {}, d = {}, cb = {}} end
local function sum_add(st, c, x)
  local s = st.s[c] or 0
  local t = s + x
  if math.abs(s) >= math.abs(x) then st.k[c] = (st.k[c] or 0) + ((s - t) + x)
  else st.k[c] = (st.k[c] or 0) + ((x - t) + s) end
  st.s[c] = t
end
local function take_last(st, c, t, v, kind)
  local lt = st.lt[c]
  if lt == nil or t > lt or (t == lt and less(st.lv[c], v, kind)) then st.lt[c], st.lv[c] = t, v end
end
local function add(st, t, row)
  st.n = st.n + 1
  if st.first == nil or t < st.first then st.first = t end
  if st.last == nil or t > st.last then st.last = t end
  for _, c in ipairs(spec.cols) do
    local v = row[c.col]
    if v ~= nil and v ~= null then
      st.nn[c.col] = (st.nn[c.col] or 0) + 1
      if c.sum then sum_add(st, c.col, v) end
      if c.order then
        if st.mx[c.col] == nil or less(st.mx[c.col], v, c.type) then st.mx[c.col] = v end
        if st.mn[c.col] == nil or less(v, st.mn[c.col], c.type) then st.mn[c.col] = v end
      end
      if c.last then take_last(st, c.col, t, v, c.type) end
      if c.distinct then
        st.d[c.col] = st.d[c.col] or {}
        st.d[c.col][distinct_key(v)] = true
      end
    end
  end
  for i, b in ipairs(spec.count_by) do
    local v = row[b.col]
    if v ~= nil and v ~= null and b.values[v] then st.cb[b.values[v]] = (st.cb[b.values[v]] or 0) + 1 end
  end
end
local function merge(a, b)  -- b's events into a
  a.n = a.n + b.n
  if b.first < a.first then a.first = b.first end
  if b.last > a.last then a.last = b.last end
  for _, c in ipairs(spec.cols) do
    local col = c.col
    if b.nn[col] then
      a.nn[col] = (a.nn[col] or 0) + b.nn[col]
      if c.sum then sum_add(a, col, b.s[col]); sum_add(a, col, b.k[col]) end
      if c.order then
        if a.mx[col] == nil or less(a.mx[col], b.mx[col], c.type) then a.mx[col] = b.mx[col] end
        if a.mn[col] == nil or less(b.mn[col], a.mn[col], c.type) then a.mn[col] = b.mn[col] end
      end
      if c.last then take_last(a, col, b.lt[col], b.lv[col], c.type) end
      if c.distinct then
        a.d[col] = a.d[col] or {}
        for key in pairs(b.d[col] or {}) do a.d[col][key] = true end
      end
    end
  end
  for i, count in pairs(b.cb) do a.cb[i] = (a.cb[i] or 0) + count end
  return a
end
local function finish(st)  -- the row's fields: name, value text, ...
  local out = {}
  local function put(name, value, kind)
    if value ~= nil then out[#out + 1] = name; out[#out + 1] = value_text(value, kind) end
  end
  if spec.kind == 'session' then
    put('event_count', st.n, 'bigint')
    put('duration_seconds', (st.last - st.first) / 1e6, 'double')
  end
  for _, o in ipairs(spec.outputs) do
    local c, result = o.col, nil
    if o.fn == 'count' then result = c == 0 and st.n or (st.nn[c] or 0)
    elseif o.fn == 'sum' then result = (st.s[c] or 0) + (st.k[c] or 0)
    elseif o.fn == 'avg' then if (st.nn[c] or 0) > 0 then result = (st.s[c] + st.k[c]) / st.nn[c] end
    elseif o.fn == 'max' then result = st.mx[c]
    elseif o.fn == 'min' then result = st.mn[c]
    elseif o.fn == 'last' then result = st.lv[c]
    elseif o.fn == 'approx_count_distinct' then
      result = 0
      for _ in pairs(st.d[c] or {}) do result = result + 1 end
    end
    put(o.name, result, o.out_type)
  end
  for i, name in ipairs(spec.count_by_names) do put(name, st.cb[i] or 0, 'bigint') end
  return out
end
local function window_end(field, st)
  if spec.kind == 'sliding' then return tonumber(field) + spec.window end
  return st.last + spec.gap
end
"""

# KEYS: ids, open. ARGV: the watermark before this batch (µs), state TTL (ms), n, then n
# triples (event id, event time µs, JSON array of values). Returns {events counted, events
# dropped as late, earliest end of an open window (µs text) or false}.
_APPLY = r"""%(prelude)s
local spec = %(spec)s
%(aggregates)s
local idkey, okey = KEYS[1], KEYS[2]
local watermark, state_ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
-- open: field -> state (false: merged into another session, to delete); dirty: fields to save.
local open, dirty = {}, {}
local function state(field)
  if open[field] == nil then
    local blob = redis.call('HGET', okey, field)
    open[field] = blob and cmsgpack.unpack(blob) or new_state()
  end
  dirty[field] = true
  return open[field]
end
if spec.kind == 'session' then
  local flat = redis.call('HGETALL', okey)
  for i = 1, #flat, 2 do open[flat[i]] = cmsgpack.unpack(flat[i + 1]) end
end
local added, late, seen = 0, 0, {}
for i = 0, n - 1 do
  local id, t, values = ARGV[4 + 3 * i], tonumber(ARGV[5 + 3 * i]), ARGV[6 + 3 * i]
  if not seen[id] and not redis.call('ZSCORE', idkey, id) then
    seen[id] = true
    local counted = false
    if spec.kind == 'sliding' then
      local start, row = t - (t %% spec.slide), nil
      while start + spec.window > t do
        if start + spec.window > watermark then
          row = row or cjson.decode(values)
          add(state(int(start)), t, row)
          counted = true
        end
        start = start - spec.slide
      end
    elseif t + spec.gap > watermark then
      local merged = new_state()
      add(merged, t, cjson.decode(values))
      for field, st in pairs(open) do
        if st and st.first <= t + spec.gap and t <= st.last + spec.gap then  -- touching sessions merge, as in Spark
          merge(merged, st)
          open[field] = false
        end
      end
      local field = int(merged.first) .. ':' .. id
      open[field], dirty[field] = merged, true
      counted = true
    end
    if counted then
      redis.call('ZADD', idkey, int(t), id)
      added = added + 1
    else
      late = late + 1
    end
  end
end
if added > 0 then
  for field, st in pairs(open) do
    if st == false then redis.call('HDEL', okey, field)
    elseif dirty[field] then redis.call('HSET', okey, field, cmsgpack.pack(st)) end
  end
  -- Ids of events whose every window has closed are no longer needed: a redelivery is late.
  redis.call('ZREMRANGEBYSCORE', idkey, '-inf', int(watermark - spec.reach))
  redis.call('PEXPIRE', idkey, state_ttl)
  redis.call('PEXPIRE', okey, state_ttl)
end
local earliest = nil
if spec.kind == 'sliding' then  -- a window's end follows from its start, the field
  for _, field in ipairs(redis.call('HKEYS', okey)) do
    local e = window_end(field, nil)
    if earliest == nil or e < earliest then earliest = e end
  end
else
  for _, st in pairs(open) do
    if st and (earliest == nil or st.last + spec.gap < earliest) then earliest = st.last + spec.gap end
  end
end
return {added, late, earliest and int(earliest) or false}
"""

# KEYS: open, feature hash. ARGV: watermark (µs), online TTL (ms). Closes every window whose
# end is at or before the watermark and writes the latest of them. Returns {windows closed,
# earliest end still open (µs text) or false, 1 if the feature hash was written, earliest end
# closed (µs text) or false}.
_CLOSE = r"""%(prelude)s
local spec = %(spec)s
%(aggregates)s
local okey, fkey = KEYS[1], KEYS[2]
local watermark, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local flat = redis.call('HGETALL', okey)
local closed, latest, latest_end, first_closed, earliest = 0, nil, nil, nil, nil
for i = 1, #flat, 2 do
  local st = cmsgpack.unpack(flat[i + 1])
  local e = window_end(flat[i], st)
  if e <= watermark then
    redis.call('HDEL', okey, flat[i])
    closed = closed + 1
    if latest_end == nil or e > latest_end then latest, latest_end = st, e end
    if first_closed == nil or e < first_closed then first_closed = e end
  elseif earliest == nil or e < earliest then
    earliest = e
  end
end
local written = 0
if latest then written = write_newer(fkey, latest_end, 1, finish(latest), ttl) end
return {closed, earliest and int(earliest) or false, written, first_closed and int(first_closed) or false}
"""


def window_spec(view: FeatureView, column_types: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The scripts' description of a sliding or session view, and the columns each event
    carries (in order). Raises ConfigError for a view the live path cannot serve."""
    if view.kind not in ("sliding", "session"):
        raise ConfigError(f"view {view.name}: not a sliding or session view (kind {view.kind!r})")
    columns: list[str] = []

    def index(column: str, why: str) -> int:
        return column_index(view, column_types, columns, column, why)

    outputs, needs = [], defaultdict(set)
    for name, function, column, _ in view.outputs():
        kind = "bigint" if column == "*" else column_types[column]
        col = 0 if column == "*" else index(column, f"feature {name!r} aggregates")
        if col:
            needs[col].add(function)
        outputs.append({"name": name, "fn": function, "col": col, "out_type": output_type(function, kind)})
    cols = [{"col": col, "type": column_types[columns[col - 1]], "sum": bool(fns & {"sum", "avg"}),
             "order": bool(fns & {"max", "min"}), "last": "last" in fns, "distinct": "approx_count_distinct" in fns}
            for col, fns in sorted(needs.items())]
    count_by, count_by_names = [], []
    for by in view.count_by:
        if column_types[by.column] != "string":
            raise ConfigError(f"view {view.name}: count_by column {by.column!r} is of type "
                              f"{column_types[by.column]}; the live path counts string values")
        values = {}
        for value in by.values:
            count_by_names.append(f"count_{by.column}_{value}")
            values[value] = len(count_by_names)
        count_by.append({"col": index(by.column, "count_by column"), "values": values})
    spec: dict[str, Any] = {"kind": view.kind, "outputs": outputs, "cols": cols, "count_by": count_by,
                            "count_by_names": count_by_names}
    if view.kind == "sliding":
        assert view.window is not None
        spec.update(window=micros(view.window), slide=micros(view.slide or view.window), reach=micros(view.window))
    else:
        assert view.gap is not None
        spec.update(gap=micros(view.gap), reach=micros(view.gap))
    names = [*(["event_count", "duration_seconds"] if view.kind == "session" else []),
             *(o["name"] for o in outputs), *count_by_names]
    assert names == feature_names(view), (names, feature_names(view))
    return spec, columns


@dataclass(frozen=True)
class WindowResult:
    """One batch of one view: events counted, events dropped as late, windows closed, feature
    hashes written, and (entity, earliest window end closed, µs) for each entity that closed."""

    added: int
    late: int
    closed: int
    written: int
    closed_ends: list[tuple[Any, int]]


class LiveWindowView:
    """Applies events to one sliding or session view's open windows in Redis and closes those the
    watermark passes (see the module docstring)."""

    def __init__(self, client: redis.Redis, namespace: str, view: FeatureView, column_types: Mapping[str, str],
                 entities_per_round_trip: int = 200, attempts: int = 8, backoff: float = 0.25):
        self.client = client
        self.namespace = namespace
        self.view = view
        self.spec, self.columns = window_spec(view, column_types)
        self.lateness = micros(view.allowed_lateness)
        self.ttl_ms = micros(view.online.ttl) // 1000
        reach = timedelta(microseconds=self.spec["reach"])
        self.state_ttl_ms = micros(max(view.online.ttl, reach + view.allowed_lateness + timedelta(hours=1))) // 1000
        self.chunk = entities_per_round_trip
        self.attempts, self.backoff = attempts, backoff
        self.prefix = f"{namespace}:~live:{view.name}"
        self.pending_key = f"{self.prefix}:pending"
        self.watermark_key = f"{self.prefix}:watermark"
        claim_definition(client, self.prefix, view.name, definition_digest(self.spec, self.columns))
        parts = {"prelude": PRELUDE, "spec": lua_literal(self.spec), "aggregates": _AGGREGATES}
        self._apply = client.register_script(_APPLY % parts)
        self._close = client.register_script(_CLOSE % parts)

    def keys(self, entity: Any) -> list[str]:
        return [f"{self.prefix}:ids:{entity}", f"{self.prefix}:open:{entity}"]

    def watermarks(self, batch_id: int) -> int:
        """The watermark this batch's events are judged by: the one before the batch (a replayed
        batch id gets the one its first attempt had)."""
        stored = self.client.hmget(self.watermark_key, "batch", "previous", "current")
        if stored[0] is None:
            return -(2 ** 62)
        if int(stored[0]) == batch_id:
            return int(stored[1])
        return int(stored[2])

    def apply(self, batch_id: int, events: Iterable[Sequence[Any]], topic_max_micros: int | None) -> WindowResult:
        """Apply one batch's ``events`` (entity, id, event µs, values of :attr:`columns`), move the
        watermark by ``topic_max_micros`` (the batch's latest valid event time of the view's
        topic) and close what it passes. Retried whole on a transient Redis error: every step is
        idempotent, and the watermark is the one this batch id was first judged by."""
        by_entity: dict[Any, list[Any]] = defaultdict(list)
        for entity, event_id, event_micros, *values in events:
            if entity is not None:
                by_entity[entity] += [event_id, event_micros, json.dumps(values, separators=(",", ":"))]
        return retry_transient(lambda: self._apply_batch(batch_id, by_entity, topic_max_micros),
                               f"live update of view {self.view.name!r}", self.attempts, self.backoff)

    def _apply_batch(self, batch_id: int, by_entity: Mapping[Any, list[Any]], topic_max_micros: int | None) -> WindowResult:
        before = self.watermarks(batch_id)
        added = late = 0
        entities = list(by_entity)
        for start in range(0, len(entities), self.chunk):
            chunk = entities[start:start + self.chunk]
            pipe = self.client.pipeline(transaction=False)
            for entity in chunk:
                args = by_entity[entity]
                self._apply(keys=self.keys(entity), args=[before, self.state_ttl_ms, len(args) // 3, *args], client=pipe)
            pending = {}
            for entity, (new, dropped, earliest) in zip(chunk, pipe.execute()):
                added, late = added + int(new), late + int(dropped)
                if earliest:
                    pending[str(entity)] = int(earliest)
            if pending:
                self.client.zadd(self.pending_key, pending)
        after = before if topic_max_micros is None else max(before, topic_max_micros - self.lateness)
        self.client.hset(self.watermark_key, mapping={"batch": batch_id, "previous": before, "current": after})
        closed, written, closed_ends = self.close(after)
        return WindowResult(added, late, closed, written, closed_ends)

    def close(self, watermark: int) -> tuple[int, int, list[tuple[Any, int]]]:
        """Close every open window whose end is at or before ``watermark``."""
        closed = written = 0
        closed_ends: list[tuple[Any, int]] = []
        while True:
            due = [m.decode() for m in self.client.zrangebyscore(self.pending_key, "-inf", watermark, start=0,
                                                                 num=self.chunk)]
            if not due:
                return closed, written, closed_ends
            pipe = self.client.pipeline(transaction=False)
            for entity in due:
                self._close(keys=[self.keys(entity)[1], entity_key(self.namespace, self.view.name, entity)],
                            args=[watermark, self.ttl_ms], client=pipe)
            still_open, done = {}, []
            for entity, (count, earliest, wrote, first_closed) in zip(due, pipe.execute()):
                closed, written = closed + int(count), written + int(wrote)
                if first_closed:
                    closed_ends.append((entity, int(first_closed)))
                if earliest:
                    still_open[entity] = int(earliest)
                else:
                    done.append(entity)
            pipe = self.client.pipeline(transaction=False)
            if still_open:
                pipe.zadd(self.pending_key, still_open)
            if done:
                pipe.zrem(self.pending_key, *done)
            pipe.execute()
