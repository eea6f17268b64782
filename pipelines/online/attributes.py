"""A database table's current rows in Redis (change data capture's online side): one hash per
primary key, ``{namespace}:cdc.{table}:{key}``, one field per non-null column (values encoded as
the feature store's, :func:`pipelines.online.store.encode_value`), ``_lsn``, the write-ahead-log
position of the change the hash is at, and ``_at``, its commit time (epoch µs).

Newer wins by LSN, atomically per key (one Lua script): a change applies only over an older one,
so replaying a batch changes nothing and an older change never overwrites a newer one; a delete
removes the hash. Unlike a feature row, an attribute does not expire: it is the table's row until
the table changes it. LSNs are compared as Lua numbers (exact up to 2^53, 8 PiB of WAL).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from pipelines.online.store import decode_value, encode_value, retry_transient

LSN_FIELD = "_lsn"
COMMITTED_FIELD = "_at"

_APPLY = """
local stored = redis.call('HGET', KEYS[1], '_lsn')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] == '1' then return 1 end
redis.call('HSET', KEYS[1], '_lsn', ARGV[1], '_at', ARGV[3], unpack(ARGV, 4))
return 1
"""


def attribute_key(namespace: str, table: str, key: Any) -> str:
    return f"{namespace}:cdc.{table}:{key}"


@dataclass(frozen=True)
class AttributeChange:
    """The change a key is at after a batch: its LSN, its commit time (epoch µs), whether it
    deleted the row, the row."""

    key: Any
    lsn: int
    committed_micros: int
    deleted: bool
    values: Mapping[str, Any]


@dataclass(frozen=True)
class AttributeWriteResult:
    applied: int
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
        def run() -> int:
            pipe = self.client.pipeline(transaction=False)
            for change in chunk:
                fields = [item for name, value in change.values.items() if value is not None
                          for item in (name, encode_value(value))]
                self._apply(keys=[attribute_key(self.namespace, self.table, change.key)],
                            args=[change.lsn, "1" if change.deleted else "0", change.committed_micros, *fields], client=pipe)
            return sum(int(r) for r in pipe.execute())

        return retry_transient(run, f"attributes of {self.table}", self.attempts, self.backoff)


def read_attributes(client: redis.Redis, namespace: str, table: str, keys: Sequence[Any],
                    columns: Sequence[str]) -> list[dict[str, Any] | None]:
    """Per key, its current row's ``columns`` (a null column None), ``_lsn`` and ``_at``; None
    for a key the table does not hold."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(attribute_key(namespace, table, key))
    rows: list[dict[str, Any] | None] = []
    for stored in pipe.execute():
        if not stored:
            rows.append(None)
            continue
        text = {k.decode(): v.decode() for k, v in stored.items()}
        row: dict[str, Any] = {c: decode_value(text[c]) if c in text else None for c in columns}
        row[LSN_FIELD] = int(text[LSN_FIELD])
        row[COMMITTED_FIELD] = int(text[COMMITTED_FIELD])
        rows.append(row)
    return rows
