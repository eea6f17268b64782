"""Live trailing features: each event's effect on its entity's online value, computed inside
Redis by one atomic server-side script per entity and batch.

The live path (:mod:`pipelines.features.live_stream`) hands each batch of valid events here.
For each view and entity, Redis keeps the entity's events that can still count for its latest
event, keyed by event id, and running aggregates of every window ``w`` of the view over
its current bounds ``(T - delay - w, T - delay]`` (``T``: the entity's latest event time). The
script, for one entity and batch:

1. stores the batch's events that are new (``HSETNX`` on the event id: a redelivered event or a
   replayed batch changes nothing; the first delivery wins, as in bronze). A new event inside a
   window's current bounds (an out-of-order one) counts there at once;
2. steps every window through the batch's new event times after ``T``, oldest first, to the
   bounds of each: events that leave it are removed from its aggregates, events that enter it
   (those after the previous ``T - delay``) are added, and the new events at that time are
   counted. Each new event keeps the features of its step as its **served row** (what a
   scorer reads for it: the event's own trailing row, as the batch definition gives it for
   that event). Events at or before ``T`` (out of order) are counted first, at ``T``'s bounds,
   and are served the entity's features at ``T`` with them counted. A served row is trimmed once
   the entity's latest event time is ``served_retention`` past its event: long enough for a
   scorer to read it, not as long as the state (a row is some 10x an event's values). A late
   event already behind the retention gets its row all the same (a scorer reads it at once); it
   goes with the event at the horizon or the state's expiry. A window whose stored bounds do not overlap a step's is rebuilt from the stored
   events;
3. forgets every event at or before the horizon ``T - delay - longest window``, which can never
   count for a later event again, and its served row; an event arriving at or before it is not
   stored either;
4. when something was added, writes every feature for ``T`` as the batch definition gives it
   (:mod:`pipelines.core.view_spec`, the null and empty rules of
   :mod:`pipelines.features.transforms`) with the newer-wins rule of
   :mod:`pipelines.online.store`. Its version is the entity's own change counter (1, 2, ...),
   always below the durable path's versions (``computed_at`` in microseconds since the epoch):
   a newer event time from this path wins at once, and for one event time the feature
   stream's row (and any correction, backfill or late recompute of it) wins over this path's.

The aggregates per window and column: the event count, the non-null count, a compensated
(Neumaier) sum for ``sum``/``avg`` (reset to exactly 0 when the window holds no value), for
``max``/``min`` a monotonic deque (the window's values that can still become its extreme: each
greater, for ``max``, than every later one; strings compared by their bytes, as Spark orders
them), the latest non-null value and its time for ``last``, and a value -> count hash for
``approx_count_distinct`` (exact: its length). Numbers are Lua doubles: a bigint above 2**53
loses precision.

Keys (beside the feature hash ``{namespace}:{view}:{entity}``; the braces are literal, the
entity's hash tag: its keys share a Redis Cluster slot, so one script touches them all), under
``{namespace}:~live:{view}``: ``events:{entity}`` (hash: event id -> JSON array of the event's
values), ``times:{entity}`` (sorted set: event id by event time in µs), ``meta:{entity}``
(``max_t``, ``seq``, ``expiry_set`` and the msgpack of every window's bounds and aggregates),
``distinct:{column}:{w}:{entity}`` and ``served:{entity}`` (hash: event id -> JSON of the row's
time, the server's clock in ms when it was computed, and every feature's text in output order,
null for a null one). All expire at least the view's TTL or its longest window
+ delay, whichever is longer, after the entity's last event (their expiry is refreshed every
eighth of that, and set at once on a new key). ``definition`` holds a digest of the layout
(:data:`LAYOUT` included); a changed view definition is refused at start until its state is
cleared.

Cost: one script per entity and batch, proportional to the events that batch adds and those
entering or leaving a window (each event enters and leaves each window once). The writes are
kept few, since each write of a script is also appended to Redis's append-only file: per new
event its ``HSETNX``, ``ZADD``, served row and one ``HINCRBY`` per distinct count, per call the state
hash and the feature hash (``account_velocity``, batches of 1,000 events over 500 accounts:
94-103 ms of Redis CPU per batch with sorted sets for max and an expiry set on every call,
70-72 ms now). Supported functions are all of
:data:`pipelines.core.view_spec.FUNCTIONS` over string, double, bigint and boolean columns; a
view aggregating a timestamp column is refused at start.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis

from pipelines.core.errors import ConfigError
from pipelines.core.times import micros
from pipelines.core.view_spec import FeatureView
from pipelines.online.lua import PRELUDE, lua_literal
from pipelines.online.store import decode_value, entity_key, hash_tag, retry_transient, run_keyed, script_call

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("string", "double", "bigint", "boolean")

#: The version of the state's layout, part of its digest: state kept by another layout is
#: refused at start (2: max/min and the latest value kept in the window state, not in sorted sets;
#: 3: the rows served for each event; 4: every key of an entity hash-tagged ``{entity}``, one
#: Redis Cluster slot).
LAYOUT = 4

_SCRIPT = r"""%(prelude)s
local spec = %(spec)s
local fkey, evkey, tkey, mkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, state_ttl, refresh, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local keep = tonumber(ARGV[5])  -- served rows are kept while within this of the entity's latest event time

local stored_meta = redis.call('HMGET', mkey, 'max_t', 'seq', 'windows', 'expiry_set')
local max_t = stored_meta[1] and tonumber(stored_meta[1]) or nil
local old_max_t = max_t
local skey = KEYS[#KEYS]  -- served rows: event id -> the features served for it
local saved = stored_meta[3] and cmsgpack.unpack(stored_meta[3]) or {}

-- The batch's events new to Redis, stored at once: the first delivery of an id wins, its time
-- included (HSETNX); an id already held, or repeated in the batch, is skipped. The time index
-- (tkey) gets them only in step 2, so that step 1 moves the windows over the older events.
local fresh_events = {}
for i = 0, n - 1 do
  local id, values = ARGV[6 + 3 * i], ARGV[8 + 3 * i]
  if redis.call('HSETNX', evkey, id, values) == 1 then
    local t = tonumber(ARGV[7 + 3 * i])
    fresh_events[#fresh_events + 1] = {id, t, values}
    if max_t == nil or t > max_t then max_t = t end
  end
end
if #fresh_events == 0 then return {0, 0} end
local hi = max_t - spec.delay
local horizon = hi - spec.span
local new_events, too_old = {}, {}
for _, e in ipairs(fresh_events) do  -- those at or before the horizon can never count
  if e[2] > horizon then new_events[#new_events + 1] = e else too_old[#too_old + 1] = e[1] end
end
for i = 1, #too_old, 1000 do redis.call('HDEL', evkey, unpack(too_old, i, math.min(i + 999, #too_old))) end
if #new_events == 0 then return {0, 0} end

-- Each window's aggregates as they stand for its stored bounds (lo, hi]. A window whose
-- stored bounds do not overlap the new ones (or that has none yet) is rebuilt from the
-- stored events.
-- The times the windows step through, oldest first: each new time after the entity's latest
-- one (each event's own row), preceded by that latest time when the batch holds events at or
-- before it (out of order: they are served the entity's features as they stand, counted).
table.sort(new_events, function(a, b) return a[2] < b[2] end)
local targets, out_of_order = {}, false
for _, e in ipairs(new_events) do
  if old_max_t ~= nil and e[2] <= old_max_t then out_of_order = true
  elseif #targets == 0 or targets[#targets] ~= e[2] then targets[#targets + 1] = e[2] end
end
if out_of_order then table.insert(targets, 1, old_max_t) end

-- Each window's aggregates as they stand for its stored bounds (lo, hi] (nil: none yet).
local W = {}
local created = false  -- a distinct counter (re)created: its key needs the state's expiry
for wi in ipairs(spec.windows) do W[wi] = saved[wi] end
local function empty_window(win)
  local st = {n = 0, nn = {}, s = {}, k = {}, xt = {}, xv = {}, mt = {}, mv = {}, lt = {}, lv = {}}
  for _, c in ipairs(win.cols) do
    st.nn[c.col], st.s[c.col], st.k[c.col] = 0, 0, 0
    if c.max then st.xt[c.col], st.xv[c.col] = {}, {} end
    if c.min then st.mt[c.col], st.mv[c.col] = {}, {} end
  end
  return st
end

-- The max (min) of a window: a deque of (time, value) in increasing time, each value
-- strictly greater (less) than every later one. A value with a later or equal-time one at
-- least as great can never be the max while it is in the window; the head is the max.
local function deque_add(ts, vs, t, v, kind, better)
  local j = #ts + 1
  while j > 1 and ts[j - 1] >= t do j = j - 1 end
  if j <= #ts and not better(v, vs[j], kind) then return end
  local i = j
  while i > 1 and not better(vs[i - 1], v, kind) do i = i - 1 end
  for _ = i, j - 1 do table.remove(ts, i); table.remove(vs, i) end
  table.insert(ts, i, t); table.insert(vs, i, v)
end
local function deque_trim(ts, vs, lo)  -- the entries that left the window (time <= lo)
  while #ts > 0 and ts[1] <= lo do table.remove(ts, 1); table.remove(vs, 1) end
end
local function greater(a, b, kind) return less(b, a, kind) end

-- Add (sign 1) or remove (sign -1) one event's values to or from a window's aggregates.
-- Removal happens only as the window's start moves past the event: the max/min deques are
-- trimmed to the new bounds afterwards (trim_window).
local function apply(wi, t, row, sign)
  local win, st = spec.windows[wi], W[wi]
  st.n = st.n + sign
  for _, c in ipairs(win.cols) do
    local v = row[c.col]
    if v ~= nil and v ~= null then
      local before = st.nn[c.col]
      st.nn[c.col] = before + sign
      if c.sum then  -- Neumaier's compensated sum: adding and removing leaves no drift worth a digit
        local s, x = st.s[c.col], sign * v
        local u = s + x
        if math.abs(s) >= math.abs(x) then st.k[c.col] = st.k[c.col] + ((s - u) + x)
        else st.k[c.col] = st.k[c.col] + ((x - u) + s) end
        st.s[c.col] = u
        if st.nn[c.col] == 0 then st.s[c.col], st.k[c.col] = 0, 0 end  -- an emptied sum is exactly zero
      end
      if sign > 0 then
        if c.max then deque_add(st.xt[c.col], st.xv[c.col], t, v, c.type, greater) end
        if c.min then deque_add(st.mt[c.col], st.mv[c.col], t, v, c.type, less) end
        -- The latest value (ties: the greatest). It leaves the window only when every value of
        -- the column has (none is later), so it needs no trimming: the window is then empty.
        if c.last then
          local lt = st.lt[c.col]
          if before == 0 or t > lt or (t == lt and less(st.lv[c.col], v, c.type)) then st.lt[c.col], st.lv[c.col] = t, v end
        end
      end
      if c.distinct then
        local key, dk = KEYS[c.distinct], distinct_key(v)
        if sign > 0 and before == 0 then created = true end
        if redis.call('HINCRBY', key, dk, sign) <= 0 then redis.call('HDEL', key, dk) end
      end
    end
  end
end
local function trim_window(wi, lo)
  local win, st = spec.windows[wi], W[wi]
  for _, c in ipairs(win.cols) do
    if c.max then deque_trim(st.xt[c.col], st.xv[c.col], lo) end
    if c.min then deque_trim(st.mt[c.col], st.mv[c.col], lo) end
  end
end

-- Stored events with lo < time <= upper, oldest first, as {id, time, values}.
local function events_between(lo, upper)
  local found = redis.call('ZRANGEBYSCORE', tkey, '(' .. int(lo), int(upper), 'WITHSCORES')
  local ids, rows = {}, {}
  for i = 1, #found, 2 do ids[#ids + 1] = found[i] end
  for i = 1, #ids, 1000 do
    local raw = redis.call('HMGET', evkey, unpack(ids, i, math.min(i + 999, #ids)))
    for j = 1, #raw do
      local at = i + j - 1
      rows[at] = {ids[at], tonumber(found[2 * at]), cjson.decode(raw[j])}
    end
  end
  return rows
end

-- 1. Move every window over the stored events to (hi - w, hi]: events leaving it are removed,
-- events entering it (stored while after the old hi - delay) added. A window whose bounds do
-- not overlap the new ones (or that has none yet) is rebuilt from the stored events: its
-- events may be forgotten, or may never have been counted (after its old hi).
local function move_to(hi)
  for wi, win in ipairs(spec.windows) do
    local st, lo = W[wi], hi - win.w
    if st == nil or lo >= st.hi then
      st = empty_window(win)
      W[wi] = st
      for _, c in ipairs(win.cols) do
        if c.distinct then redis.call('DEL', KEYS[c.distinct]) end
      end
      for _, e in ipairs(events_between(lo, hi)) do apply(wi, e[2], e[3], 1) end
    else
      if lo > st.lo then
        for _, e in ipairs(events_between(st.lo, lo)) do apply(wi, e[2], e[3], -1) end
        trim_window(wi, lo)
      end
      if hi > st.hi and spec.delay > 0 then  -- without a delay no stored event is after the old hi
        for _, e in ipairs(events_between(st.hi, hi)) do apply(wi, e[2], e[3], 1) end
      end
    end
    st.lo, st.hi = lo, hi
  end
end

-- 2. Index a new event by time; it counts in every window whose bounds hold it.
local function add_event(e)
  local t = e[2]
  redis.call('ZADD', tkey, int(t), e[1])
  local row = nil
  for wi, st in ipairs(W) do
    if t > st.lo and t <= st.hi then
      row = row or cjson.decode(e[3])
      apply(wi, t, row, 1)
    end
  end
end

-- 3. The features at the windows' bounds, from their aggregates: the feature hash's fields
-- (name, text pairs; a null feature left out) and the served row's values (every output in
-- order, null as null).
local function features()
  local out, row = {}, {}
  for i, o in ipairs(spec.outputs) do
    local st, result = W[o.window], nil
    if o.fn == 'count' then result = o.col == 0 and st.n or st.nn[o.col]
    elseif o.fn == 'sum' then result = st.s[o.col] + st.k[o.col]
    elseif o.fn == 'avg' then if st.nn[o.col] > 0 then result = (st.s[o.col] + st.k[o.col]) / st.nn[o.col] end
    elseif o.fn == 'max' then result = st.xv[o.col][1]
    elseif o.fn == 'min' then result = st.mv[o.col][1]
    elseif o.fn == 'last' then if st.nn[o.col] > 0 then result = st.lv[o.col] end
    elseif o.fn == 'approx_count_distinct' then result = redis.call('HLEN', KEYS[o.distinct]) end
    if result ~= nil then
      out[#out + 1] = o.name
      out[#out + 1] = value_text(result, o.out_type)
      row[i] = out[#out]
    else
      row[i] = null
    end
  end
  return out, row
end

-- Step through the targets: the windows move to each, the new events up to it are added, and
-- each new event gets the features of its step as its served row (first delivery wins), with
-- the step's time and the server's clock (ms) when it was computed.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local next_event, out = 1, {}
local cut = max_t - keep  -- rows of events at or before it are trimmed as the latest time passes them
for _, target in ipairs(targets) do
  move_to(target - spec.delay)
  local first = next_event
  while next_event <= #new_events and new_events[next_event][2] <= target do
    add_event(new_events[next_event])
    next_event = next_event + 1
  end
  local row
  out, row = features()
  -- Times as texts: cjson keeps 14 digits of a number.
  local served = cjson.encode({int(target), int(now), row})
  -- Every new event gets its row, a late one behind the retention too (it is read at once; the
  -- trim below passes it by, and it goes with its event at the horizon or the state's expiry).
  for i = first, next_event - 1 do redis.call('HSETNX', skey, new_events[i][1], served) end
end
-- The rows of events that fell out of the retention as the latest time moved.
-- (Not this batch's own: a late one's row is read at once.)
if old_max_t ~= nil and cut > old_max_t - keep then
  local mine = {}
  for _, e in ipairs(new_events) do mine[e[1]] = true end
  local gone = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', tkey, '(' .. int(old_max_t - keep), int(cut))) do
    if not mine[id] then gone[#gone + 1] = id end
  end
  for i = 1, #gone, 1000 do redis.call('HDEL', skey, unpack(gone, i, math.min(i + 999, #gone))) end
end
local added = #new_events

-- 4. Forget the events no later event can count (all are out of every window by now), and
-- the rows served for them.
local old = redis.call('ZRANGEBYSCORE', tkey, '-inf', int(horizon))
for i = 1, #old, 1000 do
  redis.call('HDEL', evkey, unpack(old, i, math.min(i + 999, #old)))
  redis.call('HDEL', skey, unpack(old, i, math.min(i + 999, #old)))
end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', tkey, '-inf', int(horizon)) end

-- 5. The state, and its expiry: refreshed every `refresh` ms (the keys live state_ttl, the
-- refresh period included, past the entity's last event), and at once for a new key.
local seq = tonumber(stored_meta[2] or '0') + 1
local windows = {}
for wi, st in ipairs(W) do
  windows[wi] = {lo = st.lo, hi = st.hi, n = st.n, nn = st.nn, s = st.s, k = st.k, xt = st.xt, xv = st.xv,
                 mt = st.mt, mv = st.mv, lt = st.lt, lv = st.lv}
end
local expiry_set = stored_meta[4] and tonumber(stored_meta[4]) or nil
if created or expiry_set == nil or now - expiry_set >= refresh then
  redis.call('HSET', mkey, 'max_t', int(max_t), 'seq', seq, 'windows', cmsgpack.pack(windows), 'expiry_set', now)
  for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], state_ttl) end
else
  redis.call('HSET', mkey, 'max_t', int(max_t), 'seq', seq, 'windows', cmsgpack.pack(windows))
end

return {added, write_newer(fkey, max_t, seq, out, ttl)}
"""


def definition_digest(script_spec: Mapping[str, Any], columns: Sequence[str]) -> str:
    """Identifies the layout of a view's live state (its script spec and event columns)."""
    text = json.dumps({"script": script_spec, "columns": list(columns)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def claim_definition(client: redis.Redis, prefix: str, view_name: str, digest: str) -> None:
    """Record ``digest`` as the layout of the live state under ``prefix``, or raise ConfigError
    when that state was built for another definition of the view (it would be misread)."""
    key = f"{prefix}:definition"
    if client.set(key, digest, nx=True):
        return
    stored = client.get(key)
    if stored is not None and stored.decode() != digest:
        raise ConfigError(
            f"live: Redis holds live state of view {view_name!r} built for another definition "
            f"({stored.decode()}, now {digest}). Delete the keys {prefix}:* and the live batch log of "
            f"its topic ({prefix.rsplit(':~live:', 1)[0]}:~live-log:<topic>.live), then restart fp-live: "
            f"it rebuilds the state from what the events topic retains")


def column_index(view: FeatureView, column_types: Mapping[str, str], columns: list[str], column: str, why: str) -> int:
    """The 1-based position of ``column`` among the values each stored event carries
    (``columns``, appended to when new). Raises ConfigError for a type the live path does not
    serve; ``why`` names the column's use in the message."""
    kind = column_types[column]
    if kind not in SUPPORTED_TYPES:
        raise ConfigError(f"view {view.name}: {why} {column!r} is of type {kind}; "
                          f"the live path serves {', '.join(SUPPORTED_TYPES)} columns")
    if column not in columns:
        columns.append(column)
    return columns.index(column) + 1


def output_type(function: str, column_type: str) -> str:
    """The Spark type of a trailing feature (as the batch transform gives it)."""
    if function in ("count", "approx_count_distinct"):
        return "bigint"
    if function == "avg":
        return "double"
    return column_type  # sum keeps a bigint or double column's type; min/max/last the column's


@dataclass(frozen=True)
class LiveSpec:
    """What the script needs of one view. ``script`` is the JSON the script decodes: ``delay``,
    ``span`` (longest window), ``windows`` (each: ``w`` and the columns aggregated in it, with
    whether they need a sum, a max, a min or the latest value, and the 1-based index in KEYS of
    their distinct counter) and ``outputs`` (name, function, column, 1-based window). ``columns`` are the
    event values each stored event carries, in order; ``structures`` name the extra keys, in
    KEYS order after the four fixed ones: (kind, column, window in µs)."""

    script: dict[str, Any]
    columns: list[str]
    structures: list[tuple[str, str, int]]

    @property
    def digest(self) -> str:
        """Identifies the stored state's layout: live state built for another definition of the
        view cannot be read with this one."""
        return definition_digest(self.script, self.columns)


def view_spec(view: FeatureView, column_types: Mapping[str, str]) -> LiveSpec:
    """The script's description of ``view``. Raises ConfigError for a view it cannot serve."""
    if view.kind != "trailing":
        raise ConfigError(f"view {view.name}: only trailing views are computed live (kind {view.kind!r})")
    columns: list[str] = []
    outputs: list[tuple[str, str, str, int, str]] = []
    for name, function, column, window in view.outputs():
        assert window is not None
        if column != "*":
            column_index(view, column_types, columns, column, f"feature {name!r} aggregates")
        outputs.append((name, function, column, micros(window), "bigint" if column == "*" else column_types[column]))
    windows = sorted({w for *_, w, _ in outputs})
    structures: list[tuple[str, str, int]] = []
    window_specs = []
    for w in windows:
        cols = []
        for column in columns:
            functions = {f for _, f, c, ow, _ in outputs if c == column and ow == w}
            if not functions:
                continue
            entry: dict[str, Any] = {"col": columns.index(column) + 1, "type": column_types[column],
                                     "sum": bool(functions & {"sum", "avg"}), "max": "max" in functions,
                                     "min": "min" in functions, "last": "last" in functions}
            if "approx_count_distinct" in functions:
                structures.append(("distinct", column, w))
                entry["distinct"] = 4 + len(structures)
            cols.append(entry)
        window_specs.append({"w": w, "cols": cols})
    script_outputs = []
    for name, function, column, w, kind in outputs:
        wi = windows.index(w)
        out = {"name": name, "fn": function, "col": 0 if column == "*" else columns.index(column) + 1,
               "window": wi + 1, "type": kind, "out_type": output_type(function, kind)}
        if column != "*":
            col = next(c for c in window_specs[wi]["cols"] if c["col"] == out["col"])
            out.update({k: col[k] for k in ("distinct",) if k in col})
        script_outputs.append(out)
    script = {"layout": LAYOUT, "delay": micros(view.delay), "span": windows[-1], "windows": window_specs,
              "outputs": script_outputs}
    return LiveSpec(script, columns, structures)


#: The row served for an entity's latest stored event at or before ARGV[1] (µs), or nil.
_AS_OF = r"""
local found = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[1], '-inf', 'LIMIT', 0, 1)
if #found == 0 then return nil end
return redis.call('HGET', KEYS[2], found[1])
"""


@dataclass(frozen=True)
class ServedRow:
    """The features a view served for one event: ``event_micros`` is the time of the row (the
    event's own time; for an out-of-order event, its entity's latest event time when it came),
    ``computed_ms`` the Redis server's clock when the row was computed (ms since the epoch), and
    ``features`` the features by name (a null feature is absent from the row, read as None)."""

    event_micros: int
    computed_ms: int
    features: dict[str, Any]

    @classmethod
    def decode(cls, raw: bytes | str, names: Sequence[str]) -> ServedRow:
        """From the stored JSON: the row's time and computation as texts, then the text of
        every feature in ``names``' order (null: a null feature)."""
        event_micros, computed_ms, texts = json.loads(raw)
        # Lua's cjson writes an empty array as {}, and a row that ends in nulls comes back short.
        texts = texts if isinstance(texts, list) else []
        return cls(int(event_micros), int(computed_ms),
                   {name: decode_value(text) for name, text in zip(names, texts) if text is not None})

    def value(self, name: str) -> Any:
        return self.features.get(name)


@dataclass(frozen=True)
class LiveResult:
    """What one batch did to one view: events new to Redis, feature hashes written, and entities
    whose hash held a newer or durable row (left as they were)."""

    added: int
    written: int
    kept: int


class LiveTrailingView:
    """Applies events to one trailing view's live state in Redis (see the module docstring).

    Raises ConfigError when the namespace holds live state of another definition of the view
    (its aggregates would be misread): that state must be cleared and rebuilt from Kafka."""

    def __init__(self, client: redis.Redis, namespace: str, view: FeatureView, column_types: Mapping[str, str],
                 entities_per_round_trip: int = 200, attempts: int = 8, backoff: float = 0.25,
                 served_retention: timedelta = timedelta(minutes=10)):
        self.client = client
        self.served_keep_us = micros(served_retention)
        self.namespace = namespace
        self.view = view
        self.spec = view_spec(view, column_types)
        self.output_names = [o["name"] for o in self.spec.script["outputs"]]
        self.columns = self.spec.columns
        self.ttl_ms = micros(view.online.ttl) // 1000
        # The state's expiry is refreshed every eighth of its TTL, not on every batch (each
        # PEXPIRE is a write to the append-only file); the keys get that period on top.
        lifetime_ms = micros(state_ttl(view, self.spec)) // 1000
        self.refresh_ms = max(1000, lifetime_ms // 8)
        self.state_ttl_ms = lifetime_ms + self.refresh_ms
        self.chunk = entities_per_round_trip
        self.attempts = attempts
        self.backoff = backoff
        self.prefix = f"{namespace}:~live:{view.name}"
        claim_definition(client, self.prefix, view.name, self.spec.digest)
        self._script = client.register_script(_SCRIPT % {"prelude": PRELUDE, "spec": lua_literal(self.spec.script)})
        self._as_of = client.register_script(_AS_OF)

    def state_keys(self, entity: Any) -> list[str]:
        """The entity's live state keys, in the script's KEYS order after the feature hash."""
        tag = hash_tag(entity)
        fixed = [f"{self.prefix}:{part}:{tag}" for part in ("events", "times", "meta")]
        return fixed + [f"{self.prefix}:{kind}:{column}:{w // 1_000_000}s:{tag}"
                        for kind, column, w in self.spec.structures] + [self.served_key(entity)]

    def served_key(self, entity: Any) -> str:
        return f"{self.prefix}:served:{hash_tag(entity)}"

    def served(self, events: Sequence[tuple[Any, str]]) -> list[ServedRow | None]:
        """The row served for each (entity, event id), in order: None for an event this view
        has not applied (yet), or has forgotten (at or before its entity's horizon)."""
        calls = [(key, lambda pipe, k=key, e=event_id: pipe.hget(k, e))
                 for key, event_id in ((self.served_key(entity), event_id) for entity, event_id in events)]

        def run() -> list[Any]:
            return run_keyed(self.client, calls, writes=False)

        raw = retry_transient(run, f"served rows of view {self.view.name!r}", self.attempts, self.backoff)
        return [None if r is None else ServedRow.decode(r, self.output_names) for r in raw]

    def served_as_of(self, lookups: Sequence[tuple[Any, int]]) -> list[ServedRow | None]:
        """For each (entity, time in µs): the row served for the entity's latest stored event
        at or before that time (ties: one of them; they share their row when they came in one
        batch), as the point-in-time join takes a view's row. None when the entity has no stored
        event by then."""
        calls = []
        for entity, at in lookups:
            keys = [f"{self.prefix}:times:{hash_tag(entity)}", self.served_key(entity)]
            calls.append((keys[0], script_call(self._as_of, keys, [int(at)])))

        def run() -> list[Any]:
            return run_keyed(self.client, calls, writes=False)

        raw = retry_transient(run, f"served rows of view {self.view.name!r}", self.attempts, self.backoff)
        return [None if r is None else ServedRow.decode(r, self.output_names) for r in raw]

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
        calls = []
        for entity in entities:
            args = by_entity[entity]
            keys = [entity_key(self.namespace, self.view.name, entity), *self.state_keys(entity)]
            calls.append((keys[0], script_call(self._script, keys, [self.ttl_ms, self.state_ttl_ms, self.refresh_ms,
                                                                    len(args) // 3, self.served_keep_us, *args])))

        def run() -> list[tuple[int, int]]:
            return [(int(r[0]), int(r[1])) for r in run_keyed(self.client, calls)]

        # Safe to repeat: an event already stored is not added again.
        return retry_transient(run, f"live update of view {self.view.name!r}", self.attempts, self.backoff)


def state_ttl(view: FeatureView, spec: LiveSpec) -> timedelta:
    """How long an entity's live state outlives its last event."""
    return max(view.online.ttl, timedelta(microseconds=spec.script["span"]) + view.delay + timedelta(minutes=1))
