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
inside an open window or session, by time: a redelivered event changes nothing),
``open:{entity}`` (one msgpack value: window start, or session first event time and id -> its
aggregates; read and written once per script call, since each write of a script is also
appended to Redis's append-only file) and ``distinct:{entity}:{window}:{column}`` (a set per
open window and column of an ``approx_count_distinct``: its values are added one by one, never
rewritten with the window's state; deleted when the window closes). Each expires after the
state TTL from the last event that touched it (the expiry is set when it would end sooner than
that: about once every eighth of the TTL, and at once for a key made anew). Which entities hold
an open window, and its earliest end, is the caller's own sorted set (``pending``), so that
every script touches the keys of one entity only. ``definition`` holds a digest of the layout
(:data:`LAYOUT` included); a changed view definition is refused at start until its state is
cleared.
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
from pipelines.online.store import entity_key, hash_tag, retry_transient, run_keyed, script_call

#: The layout of the windows' state in Redis, part of the definition digest: 2 is one value per
#: entity for its open windows and a set per window of its distinct values (1 was a hash of the
#: windows, written field by field, each with its distinct values inside); 3: every key of an
#: entity hash-tagged ``{entity}`` (one Redis Cluster slot).
LAYOUT = 3

#: Aggregates of one window or session: first/last event time, the event count, and per column
#: (by its 1-based index) the non-null count, a compensated sum, max, min, the latest (time,
#: value), and the number of distinct values; per count_by value, its count. The distinct values
#: themselves are in a set per window and column (``KEYS[3]:<dk>:<column>``, ``dk`` the window's
#: start, or the id of a session's first event), not in the state: the state is rewritten on
#: every call, and a window's distinct values can be thousands (accounts of a merchant-hour).
_AGGREGATES = r"""
local distinct_base, touched = KEYS[3], {}
local function distinct_set(st, c) return distinct_base .. ':' .. st.dk .. ':' .. c end
local function new_state(dk) return {dk = dk, n = 0, nn = {}, s = {}, k = {}, mx = {}, mn = {}, lt = {}, lv = {}, dc = {}, cb = {}} end
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
        local set = distinct_set(st, c.col)
        touched[set] = true
        st.dc[c.col] = (st.dc[c.col] or 0) + redis.call('SADD', set, distinct_key(v))
      end
    end
  end
  for i, b in ipairs(spec.count_by) do
    local v = row[b.col]
    if v ~= nil and v ~= null and b.values[v] then st.cb[b.values[v]] = (st.cb[b.values[v]] or 0) + 1 end
  end
end
local function merge(a, b)  -- b's events into a (b's distinct sets are merged into a's and deleted)
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
        local into, from = distinct_set(a, col), distinct_set(b, col)
        redis.call('SUNIONSTORE', into, into, from)
        redis.call('DEL', from)
        touched[into] = true
        a.dc[col] = redis.call('SCARD', into)
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
    elseif o.fn == 'approx_count_distinct' then result = st.dc[c] or 0
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

# KEYS: ids, open, distinct sets' prefix. ARGV: the watermark before this batch (µs), state TTL
# (ms), the expiry's refresh period (ms), n, then n triples (event id, event time µs, JSON array
# of values). Returns {events counted, events dropped as late, earliest end of an open window
# (µs text) or false}.
_APPLY = r"""%(prelude)s
local spec = %(spec)s
%(aggregates)s
local idkey, okey = KEYS[1], KEYS[2]
local watermark, state_ttl, refresh, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
-- Every open window of the entity, in one value: field (window start, or session start:id) ->
-- state; a session merged into another is removed from it.
local blob = redis.call('GET', okey)
local open = blob and cmsgpack.unpack(blob) or {}
local added, late, seen = 0, 0, {}
for i = 0, n - 1 do
  local id, t, values = ARGV[5 + 3 * i], tonumber(ARGV[6 + 3 * i]), ARGV[7 + 3 * i]
  if not seen[id] and not redis.call('ZSCORE', idkey, id) then
    seen[id] = true
    local counted = false
    if spec.kind == 'sliding' then
      local start, row = t - (t %% spec.slide), nil
      while start + spec.window > t do
        if start + spec.window > watermark then
          row = row or cjson.decode(values)
          local field = int(start)
          open[field] = open[field] or new_state(field)
          add(open[field], t, row)
          counted = true
        end
        start = start - spec.slide
      end
    elseif t + spec.gap > watermark then
      -- The sessions the event's [t, t + gap) overlaps or touches merge (as in Spark), into the
      -- first of them (its distinct sets stay where they are), or the event opens one.
      local merged = nil
      for field, st in pairs(open) do
        if st.first <= t + spec.gap and t <= st.last + spec.gap then
          if merged then merge(merged, st) else merged = st end
          open[field] = nil
        end
      end
      merged = merged or new_state(id)
      add(merged, t, cjson.decode(values))
      open[int(merged.first) .. ':' .. merged.dk] = merged
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
local earliest = nil
for field, st in pairs(open) do
  local e = window_end(field, st)
  if earliest == nil or e < earliest then earliest = e end
end
if added > 0 then
  -- One write of the windows (each write of a script is also appended to the AOF), with their
  -- expiry. Ids of events whose every window has closed are no longer needed: a redelivery is
  -- late. The other keys' expiry is set when it would end within the state TTL (a read, PTTL,
  -- decides: so about once a refresh period, and at once for a key made anew).
  redis.call('SET', okey, cmsgpack.pack(open), 'PX', state_ttl)
  redis.call('ZREMRANGEBYSCORE', idkey, '-inf', int(watermark - spec.reach))
  touched[idkey] = true
  for key in pairs(touched) do
    if redis.call('PTTL', key) < state_ttl then redis.call('PEXPIRE', key, state_ttl + refresh) end
  end
end
return {added, late, earliest and int(earliest) or false}
"""

# KEYS: open, feature hash, distinct sets' prefix. ARGV: watermark (µs), online TTL (ms). Closes
# every window whose end is at or before the watermark, writes the latest of them and deletes
# their distinct sets. Returns {windows closed, earliest end still open (µs text) or false, 1 if
# the feature hash was written, earliest end closed (µs text) or false}.
_CLOSE = r"""%(prelude)s
local spec = %(spec)s
%(aggregates)s
local okey, fkey = KEYS[1], KEYS[2]
local watermark, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local distinct = {}  -- the distinct sets of the closed windows, deleted once the row is written
local blob = redis.call('GET', okey)
local open = blob and cmsgpack.unpack(blob) or {}
local closed, latest, latest_end, first_closed, earliest = 0, nil, nil, nil, nil
for field, st in pairs(open) do
  local e = window_end(field, st)
  if e <= watermark then
    open[field] = nil
    closed = closed + 1
    for c in pairs(st.dc) do distinct[#distinct + 1] = distinct_set(st, c) end
    if latest_end == nil or e > latest_end then latest, latest_end = st, e end
    if first_closed == nil or e < first_closed then first_closed = e end
  elseif earliest == nil or e < earliest then
    earliest = e
  end
end
if closed > 0 then
  if earliest then redis.call('SET', okey, cmsgpack.pack(open), 'KEEPTTL') else redis.call('DEL', okey) end
end
local written = 0
if latest then written = write_newer(fkey, latest_end, 1, finish(latest), ttl) end
if #distinct > 0 then redis.call('DEL', unpack(distinct)) end
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
    spec: dict[str, Any] = {"layout": LAYOUT, "kind": view.kind, "outputs": outputs, "cols": cols, "count_by": count_by,
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
        # The ids' and distinct sets' expiry is set to the state TTL plus this period whenever it
        # would end sooner than the state TTL: about once a period, not on every batch.
        self.refresh_ms = max(1000, self.state_ttl_ms // 8)
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
        """The entity's state keys: its event ids, its open windows, and its windows' distinct
        sets' prefix."""
        tag = hash_tag(entity)
        return [f"{self.prefix}:ids:{tag}", f"{self.prefix}:open:{tag}", f"{self.prefix}:distinct:{tag}"]

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
            calls = []
            for entity in chunk:
                args, keys = by_entity[entity], self.keys(entity)
                calls.append((keys[0], script_call(self._apply, keys,
                                                   [before, self.state_ttl_ms, self.refresh_ms, len(args) // 3, *args])))
            pending = {}
            for entity, (new, dropped, earliest) in zip(chunk, run_keyed(self.client, calls)):
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
            calls = []
            for entity in due:
                _, open_key, distinct = self.keys(entity)
                calls.append((open_key, script_call(self._close, [open_key, entity_key(self.namespace, self.view.name, entity),
                                                                  distinct], [watermark, self.ttl_ms])))
            still_open, done = {}, []
            for entity, (count, earliest, wrote, first_closed) in zip(due, run_keyed(self.client, calls)):
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
