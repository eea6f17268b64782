"""What the live path's Redis scripts share: a Lua prelude (number and value texts as the online
store writes them, Spark's ordering of values, the newer-wins write of a feature hash) and the
spec of a view as a Lua table literal."""

from __future__ import annotations

from typing import Any

#: Lua functions every live script starts with. ``less`` orders values as Spark does: booleans
#: false < true, numbers numerically, strings by their UTF-8 bytes (Lua's own ``<`` on strings
#: follows the server's collation locale, which need not be bytewise).
PRELUDE = r"""
local null = cjson.null
local function int(x) return string.format('%.0f', x) end
local function num(x) return string.format('%.17g', x) end
local function number_text(x, kind)
  if x ~= x then return 'NaN' end
  if x == math.huge then return 'Infinity' end
  if x == -math.huge then return '-Infinity' end
  if kind == 'bigint' then return int(x) end
  local text = num(x)
  if not string.find(text, '[%.eE]') then text = text .. '.0' end
  return text
end
local function value_text(x, kind)
  if kind == 'string' then return cjson.encode(x) end
  if kind == 'boolean' then return x and 'true' or 'false' end
  return number_text(x, kind)
end
local function less(a, b, kind)
  if kind == 'boolean' then return (not a) and b end
  if kind ~= 'string' then return a < b end
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function distinct_key(v)
  if type(v) == 'number' then return 'n:' .. num(v) end
  return type(v) .. ':' .. tostring(v)
end
-- Write a feature hash unless it holds a newer event time, or the same one at a version at
-- least as high (the online store's newer-wins rule). Returns 1 when written. The hash becomes
-- exactly the new row: a stored field the row has not (a feature null now) is removed. (HSET
-- over the stored hash, rather than DEL and HSET: each write in a script is also a write to
-- the append-only file, and most rows have the stored row's fields.)
local function write_newer(fkey, event_time, version, fields, ttl)
  local stored = redis.call('HMGET', fkey, '_event_time', '_version')
  if stored[1] then
    local stored_time, stored_version = tonumber(stored[1]), tonumber(stored[2])
    if event_time < stored_time or (event_time == stored_time and version <= stored_version) then return 0 end
    local kept, gone = {_event_time = true, _version = true}, {}
    for i = 1, #fields, 2 do kept[fields[i]] = true end
    for _, name in ipairs(redis.call('HKEYS', fkey)) do if not kept[name] then gone[#gone + 1] = name end end
    if #gone > 0 then redis.call('HDEL', fkey, unpack(gone)) end
  elseif redis.call('EXISTS', fkey) == 1 then
    redis.call('DEL', fkey)  -- a hash without an event time is not a row of this store
  end
  redis.call('HSET', fkey, '_event_time', int(event_time), '_version', version, unpack(fields))
  redis.call('PEXPIRE', fkey, ttl)
  return 1
end
"""


def lua_literal(value: Any) -> str:
    """``value`` (JSON-like: dicts with string keys, lists, strings, numbers, booleans) as a
    Lua table constructor: a script builds its spec with no decoding on every call."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # Every byte outside printable ASCII (and the quote and backslash) as a decimal escape:
        # the script sees exactly the UTF-8 bytes.
        return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}"
                             for b in value.encode()) + '"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        # [ key ] = value: any string is a key so (a user's value, a reserved word).
        return "{" + ", ".join(f"[ {lua_literal(str(k))} ] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")
