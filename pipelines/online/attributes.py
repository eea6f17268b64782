"""A database table's current rows in Redis (change data capture's online side): one hash per
primary key, ``{namespace}:cdc.{table}:{{key}}`` (the key is the hash tag, as an entity's), one field per non-null column (values encoded as
the feature store's, :func:`pipelines.online.store.encode_value`), ``_lsn``, the write-ahead-log
position of the change the hash is at, and ``_at``, its commit time (epoch µs).

Newer wins by LSN, atomically per key (one Lua script): a change applies only over an older one,
so replaying a batch changes nothing and an older change never overwrites a newer one; a snapshot
read equal to the row held changes nothing (not even ``_at``). A delete replaces the hash with a
marker (``_lsn``, ``_at``, ``_deleted``) kept for :data:`DELETED_RETENTION_MS`, which readers see
as no row, so that an older change replayed meanwhile cannot bring the key back. Unlike a feature
row, an attribute does not expire: it is the table's row until the table changes it. LSNs are
compared as Lua numbers (exact up to 2^53, 8 PiB of WAL).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from pipelines.online.store import decode_value, encode_value, hash_tag, retry_transient, run_keyed, script_call

LSN_FIELD = "_lsn"
COMMITTED_FIELD = "_at"
DELETED_FIELD = "_deleted"
#: How long a deleted key's marker (its delete's LSN) is kept: an older change of the key that
#: comes later (a replay of the topic) cannot bring it back meanwhile.
DELETED_RETENTION_MS = 7 * 24 * 3600 * 1000

# KEYS[1]: the key's hash. ARGV: LSN, kind ('c' a change, 'r' a snapshot read, 'd' a delete),
# commit time (µs), the deleted marker's retention (ms), then field, value, ... (non-null only).
_APPLY = """
local stored = redis.call('HGET', KEYS[1], '_lsn')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then return 0 end
if ARGV[2] == 'r' and stored and not redis.call('HGET', KEYS[1], '_deleted') then
  -- A snapshot read equal to the row held is no change: the hash keeps its LSN and commit time.
  local held = redis.call('HGETALL', KEYS[1])
  local values, count = {}, 0
  for i = 1, #held, 2 do
    if string.sub(held[i], 1, 1) ~= '_' then values[held[i]] = held[i + 1]; count = count + 1 end
  end
  local same = count * 2 == #ARGV - 4
  for i = 5, #ARGV, 2 do
    if not same then break end
    same = values[ARGV[i]] == ARGV[i + 1]
  end
  if same then return 0 end
end
redis.call('DEL', KEYS[1])
if ARGV[2] == 'd' then
  redis.call('HSET', KEYS[1], '_lsn', ARGV[1], '_at', ARGV[3], '_deleted', '1')
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return 1
end
redis.call('HSET', KEYS[1], '_lsn', ARGV[1], '_at', ARGV[3], unpack(ARGV, 5))
return 1
"""


def attribute_key(namespace: str, table: str, key: Any) -> str:
    return f"{namespace}:cdc.{table}:{hash_tag(key)}"


@dataclass(frozen=True)
class AttributeChange:
    """The change a key is at after a batch: its LSN, its commit time (epoch µs), whether it
    deleted the row, the row."""

    key: Any
    lsn: int
    committed_micros: int
    deleted: bool
    values: Mapping[str, Any]
    #: A snapshot read (``op r``): equal to the row held, it changes nothing.
    read: bool = False

    @property
    def kind(self) -> str:
        return "d" if self.deleted else "r" if self.read else "c"


@dataclass(frozen=True)
class AttributeWriteResult:
    applied: int
    #: Changes Redis did not take: it held a newer one, or (a read) the same row.
    stale: int


class AttributeStoreWriter:
    """Applies changes of one table to Redis, newer wins by LSN, with bounded retries."""

    def __init__(self, client: redis.Redis, namespace: str, table: str, chunk_size: int = 1000,
                 attempts: int = 5, backoff: float = 0.2):
        self.client, self.namespace, self.table = client, namespace, table
        self.chunk_size, self.attempts, self.backoff = chunk_size, attempts, backoff
        self._apply = client.register_script(_APPLY)

    def write(self, changes: Iterable[AttributeChange]) -> AttributeWriteResult:
        applied = stale = 0
        chunk: list[AttributeChange] = []
        for change in changes:
            chunk.append(change)
            if len(chunk) == self.chunk_size:
                done = self._write_chunk(chunk)
                applied, stale, chunk = applied + done, stale + len(chunk) - done, []
        if chunk:
            done = self._write_chunk(chunk)
            applied, stale = applied + done, stale + len(chunk) - done
        return AttributeWriteResult(applied, stale)

    def _write_chunk(self, chunk: Sequence[AttributeChange]) -> int:
        calls = []
        for change in chunk:
            fields = [item for name, value in change.values.items() if value is not None
                      for item in (name, encode_value(value))]
            key = attribute_key(self.namespace, self.table, change.key)
            calls.append((key, script_call(self._apply, [key], [change.lsn, change.kind, change.committed_micros,
                                                                 DELETED_RETENTION_MS, *fields])))

        def run() -> int:
            return sum(int(r) for r in run_keyed(self.client, calls))

        return retry_transient(run, f"attributes of {self.table}", self.attempts, self.backoff)


def read_attributes(client: redis.Redis, namespace: str, table: str, keys: Sequence[Any],
                    columns: Sequence[str]) -> list[dict[str, Any] | None]:
    """Per key, its current row's ``columns`` (a null column None), ``_lsn`` and ``_at`` (None
    in a hash written before the platform kept it); None for a key the table does not hold
    (never had, or deleted)."""
    hashes = [attribute_key(namespace, table, key) for key in keys]
    rows: list[dict[str, Any] | None] = []
    for stored in run_keyed(client, [(h, lambda pipe, h=h: pipe.hgetall(h)) for h in hashes], writes=False):
        text = {k.decode(): v.decode() for k, v in stored.items()}
        if not text or DELETED_FIELD in text:
            rows.append(None)
            continue
        row: dict[str, Any] = {c: decode_value(text[c]) if c in text else None for c in columns}
        row[LSN_FIELD] = int(text[LSN_FIELD])
        row[COMMITTED_FIELD] = int(text[COMMITTED_FIELD]) if COMMITTED_FIELD in text else None
        rows.append(row)
    return rows
