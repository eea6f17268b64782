"""The Redis online store: newer-wins, idempotent writes of feature rows, and reads.

Key layout: one hash per view and entity, ``{namespace}:{view}:{{entity}}`` (the entity in braces
is the key's hash tag: a Redis Cluster keeps an entity's keys in one slot), with one field per
feature plus ``_event_time`` (microseconds since the epoch, UTC) and ``_version``. A feature
whose value is null has no field. Values are JSON scalars (numbers round-trip exactly), except
timestamps, stored as ``t:<ISO-8601>``; a JSON string always starts with a quote, so the two
never mix.

Every write goes through one Lua script, atomically per key: it applies the row only if its
``(event time, version)`` is greater than the stored one (event time first, then version),
replacing the whole hash and setting the view's TTL. So an older event never overwrites a
newer value, replaying a batch changes nothing, and a higher version for the same event time
does overwrite (the feature sinks use each row's ``computed_at`` as its version, so a later
computation of an event wins: a stream correction, a backfill). Writes are pipelined in chunks; transient Redis errors are
retried with bounded backoff (safe: the writes are idempotent), after which the error is
raised and the batch fails loudly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, TypeVar

import redis
from redis.cluster import ClusterNode, RedisCluster

from pipelines.core.config import secret_from_env
from pipelines.core.errors import PipelineError
from pipelines.core.settings import RedisSettings
from pipelines.core.times import epoch_micros, from_epoch_micros, micros, utc_assuming_local

log = logging.getLogger(__name__)

EVENT_TIME_FIELD = "_event_time"
VERSION_FIELD = "_version"

_NEWER_WINS = """
local stored = redis.call('HMGET', KEYS[1], '_event_time', '_version')
if stored[1] then
  local event_time, version = tonumber(ARGV[1]), tonumber(ARGV[2])
  local stored_time, stored_version = tonumber(stored[1]), tonumber(stored[2])
  if event_time < stored_time or (event_time == stored_time and version <= stored_version) then
    return 0
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '_event_time', ARGV[1], '_version', ARGV[2], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

class ReplicasBehind(redis.RedisError):
    """A master's replicas did not acknowledge a batch's writes in time (Redis ``WAIT``), though
    it has them: the batch is retried (its writes are idempotent)."""


#: A Redis Cluster in motion: a master failing over (its slots down a few seconds, its replica
#: read-only until promoted), a slot moved. The client reads the topology again and the batch is
#: retried.
CLUSTER_ERRORS = (
    redis.exceptions.ClusterError,  # ClusterDownError, MasterDownError
    redis.exceptions.AskError,  # MovedError
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.SlotNotCoveredError,
)

TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ReplicasBehind, *CLUSTER_ERRORS)


class OnlineStoreError(PipelineError):
    """Redis stayed unavailable through every retry: the batch must fail (and be replayed)."""


T = TypeVar("T")


def retry_transient(action: Callable[[], T], what: str, attempts: int, backoff: float, max_pause: float = 8.0) -> T:
    """``action()``, repeated on a connection error, timeout or a Redis still loading its data
    (``attempts`` tries in all, ``backoff`` seconds doubling up to ``max_pause`` between them);
    after the last, OnlineStoreError saying ``what`` failed. ``action`` must be safe to repeat."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except TRANSIENT_ERRORS as exc:
            if attempt == attempts:
                raise OnlineStoreError(f"{what} failed {attempts} times: {exc}") from exc
            pause = min(backoff * 2 ** (attempt - 1), max_pause)
            log.warning("%s failed (%s): retry %d in %.1fs", what, exc, attempt, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


class _ReplicaAcks:
    """A client that knows how many replicas must acknowledge a batch of online writes, and how
    long to wait for them (:func:`run_keyed`)."""

    def __init__(self, *args: Any, replica_acks: int = 0, replica_ack_timeout_ms: int = 5000, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.replica_acks, self.replica_ack_timeout_ms = replica_acks, replica_ack_timeout_ms


class StoreServer(_ReplicaAcks, redis.Redis):
    """A client of one Redis server, with the online writes' replica acknowledgements."""


class StoreCluster(_ReplicaAcks, RedisCluster):
    """A Redis Cluster client (it routes each key to its slot's master and follows a failover),
    with the online writes' replica acknowledgements."""


def redis_client(settings: RedisSettings) -> redis.Redis:
    """A client of the online store: one server, or a Redis Cluster (``redis.cluster_nodes``)."""
    password = secret_from_env(settings.password_env, "redis.password_env") if settings.password_env else None
    durability = {"replica_acks": settings.replica_acks,
                  "replica_ack_timeout_ms": int(settings.replica_ack_timeout.total_seconds() * 1000)}
    if settings.clustered:
        nodes = []
        for node in settings.cluster_nodes:
            host, _, port = node.rpartition(":")
            nodes.append(ClusterNode(host, int(port)))
        return StoreCluster(startup_nodes=nodes, password=password, socket_timeout=10, socket_connect_timeout=5,
                            **durability)
    return StoreServer(host=settings.host, port=settings.port, db=settings.db, password=password,
                       socket_timeout=10, socket_connect_timeout=5, **durability)


#: When a master without enough replicas was last reported, by node (one line a minute each).
_UNDER_REPLICATED: dict[str, float] = {}


def run_keyed(client: redis.Redis, calls: Sequence[tuple[str, Callable[[Any], Any]]], writes: bool = True) -> list[Any]:
    """Run ``calls`` (a key, and a function that queues one command on the pipeline it is given,
    for that key: a script call, HGETALL, ...) in pipelines, and return their results in order.

    One server: one pipeline. A Redis Cluster: one pipeline per master, each on a connection of
    its own to that master (a script call, whose keys share the key's slot, goes where its slot
    is; the pipeline loads the script there if the master lacks it, as a replica promoted by a
    failover does). When the client asks for replicas' acknowledgements (:class:`StoreCluster`,
    ``redis.replica_acks``), each pipeline ends with ``WAIT`` on its connection: writes a
    master acknowledged are on its replicas before the batch counts as done, so a failover does
    not lose them. A master with fewer replicas than asked (its replica down, or promoted and
    not yet followed) is waited for by those it has, and reported; :class:`ReplicasBehind` if
    replicas it has did not answer in time. Reads (``writes`` False) wait for nothing. On a
    cluster's error (a failover, a moved slot, a node gone) the client reads the topology again
    before the error is raised: a retry goes to the new masters."""
    acks = getattr(client, "replica_acks", 0) if writes else 0
    timeout_ms = getattr(client, "replica_ack_timeout_ms", 5000)
    if not isinstance(client, RedisCluster):
        where = client.connection_pool.connection_kwargs
        return _run_on(client, [queue for _, queue in calls], acks, timeout_ms, f"{where.get('host')}:{where.get('port')}")
    groups: dict[str, tuple[Any, list[int]]] = {}
    try:
        for index, (key, _) in enumerate(calls):
            node = client.get_node_from_key(key)
            groups.setdefault(node.name, (node, []))[1].append(index)
        results: list[Any] = [None] * len(calls)
        for name, (node, indexes) in groups.items():
            out = _run_on(client.get_redis_connection(node), [calls[i][1] for i in indexes], acks, timeout_ms, name)
            for index, result in zip(indexes, out):
                results[index] = result
        return results
    except (redis.ConnectionError, redis.TimeoutError, *CLUSTER_ERRORS):
        try:
            client.nodes_manager.initialize()
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            log.warning("Redis Cluster topology not read again (%s): the retry will", exc)
        raise


def script_call(script: Any, keys: Sequence[str], args: Sequence[Any]) -> Callable[[Any], Any]:
    """For :func:`run_keyed`: a call of the registered ``script`` on ``keys`` (one slot) with ``args``."""
    return lambda pipe: script(keys=keys, args=args, client=pipe)


def _run_on(server: redis.Redis, queued: Sequence[Callable[[Any], Any]], acks: int, timeout_ms: int, name: str) -> list[Any]:
    pipe = server.pipeline(transaction=False)
    for queue in queued:
        queue(pipe)
    if acks:
        pipe.wait(acks, timeout_ms)
    results = pipe.execute()
    if acks:
        acknowledged = int(results.pop())
        if acknowledged < acks:
            replicas = len(server.execute_command("ROLE")[2])
            if replicas >= acks:
                raise ReplicasBehind(f"{acknowledged} of {acks} replicas of {name} acknowledged its writes "
                                     f"within {timeout_ms} ms")
            now = time.monotonic()
            if now - _UNDER_REPLICATED.get(name, -60.0) >= 60.0:
                _UNDER_REPLICATED[name] = now
                log.warning("Redis %s has %d replicas, %d asked for (redis.replica_acks): its writes are on %d "
                            "(a failover now would lose the others)", name, replicas, acks, acknowledged)
    return results


def hash_tag(entity: Any) -> str:
    """``{entity}``: in a key, the part Redis Cluster hashes to pick the key's slot (the text
    between the first ``{`` and the next ``}``), so that every key of one entity (its feature
    hashes, its live state) is in one slot and a Lua script may touch them all. The namespace
    and view names hold no braces (checked when the settings load), so the entity's are the
    first. (An empty entity id makes an empty tag, which Redis ignores: its keys then spread.)"""
    return f"{{{entity}}}"


def entity_key(namespace: str, view: str, entity: Any) -> str:
    return f"{namespace}:{view}:{hash_tag(entity)}"


def entity_from_key(key: str | bytes, namespace: str, view: str) -> str:
    """The entity id of a key :func:`entity_key` made (as text: a key does not say its type)."""
    text = key.decode() if isinstance(key, bytes) else key
    prefix = f"{namespace}:{view}:{{"
    if not text.startswith(prefix) or not text.endswith("}"):
        raise ValueError(f"{text!r} is not a key of view {view!r} in namespace {namespace!r}")
    return text[len(prefix):-1]


def encode_value(value: Any) -> str:
    """A feature value as stored in its hash field (None is never stored: the field is absent)."""
    if isinstance(value, datetime):
        return "t:" + utc_assuming_local(value).isoformat()
    if isinstance(value, date):
        return "t:" + value.isoformat()
    if isinstance(value, float) and value != value:  # NaN: JSON has none; keep it explicit
        return "NaN"
    return json.dumps(value)


def decode_value(raw: str) -> Any:
    if raw.startswith("t:"):
        text = raw[2:]
        return datetime.fromisoformat(text) if "T" in text else date.fromisoformat(text)
    if raw == "NaN":
        return float("nan")
    return json.loads(raw)


@dataclass(frozen=True)
class WriteResult:
    written: int
    stale: int
    #: The latest event time (µs since the epoch, UTC) among the rows Redis applied, if any.
    newest_written_micros: int | None = None


class OnlineStoreWriter:
    """Writes feature rows of one view to Redis, newer wins, with bounded retries."""

    def __init__(self, client: redis.Redis, namespace: str, view: str, ttl: timedelta,
                 chunk_size: int = 1000, attempts: int = 8, backoff: float = 0.2):
        if ttl <= timedelta(0):
            raise ValueError("ttl must be positive: every online key expires")
        self.client = client
        self.namespace = namespace
        self.view = view
        self.ttl_ms = micros(ttl) // 1000
        self.chunk_size = chunk_size
        self.attempts = attempts
        self.backoff = backoff
        self._script = client.register_script(_NEWER_WINS)

    def write(self, rows: Iterable[Mapping[str, Any]], entity: str, event_time: str,
              features: Sequence[str], version: int | str, ttl_ms_field: str | None = None) -> WriteResult:
        """Write ``rows`` (mappings with the entity, event time and feature columns).

        ``version``: one version for every row, or the name of the row field holding each row's
        (a datetime counts as its microseconds since the epoch: the feature sinks use the row's
        ``computed_at``, so of two rows for one event time the later computation wins).
        ``ttl_ms_field``: the row field holding that row's TTL in milliseconds (a restore gives
        each key what was left of its TTL); otherwise every key gets the view's TTL.
        """
        written = stale = 0
        newest: int | None = None
        for chunk in _chunks(rows, self.chunk_size):
            applied = self._write_chunk(chunk, entity, event_time, features, version, ttl_ms_field)
            written += sum(applied)
            stale += len(applied) - sum(applied)
            times = [epoch_micros(row[event_time]) for row, ok in zip(chunk, applied) if ok]
            if times:
                newest = max(times + ([newest] if newest is not None else []))
        return WriteResult(written, stale, newest)

    def _write_chunk(self, chunk: list[Mapping[str, Any]], entity: str, event_time: str,
                     features: Sequence[str], version: int | str, ttl_ms_field: str | None) -> list[int]:
        calls = []
        for row in chunk:
            ttl_ms = int(row[ttl_ms_field]) if ttl_ms_field else self.ttl_ms
            if ttl_ms <= 0:
                raise ValueError(f"view {self.view}: TTL {ttl_ms} ms for {row[entity]!r}: every key expires")
            args: list[Any] = [epoch_micros(row[event_time]), _version(row, version), ttl_ms]
            for name in features:
                if row[name] is not None:
                    args += [name, encode_value(row[name])]
            key = entity_key(self.namespace, self.view, row[entity])
            calls.append((key, script_call(self._script, [key], args)))

        def write() -> list[int]:
            return [int(r) for r in run_keyed(self.client, calls)]

        return retry_transient(write, f"Redis write of view {self.view!r}", self.attempts, self.backoff, max_pause=60.0)


def _version(row: Mapping[str, Any], version: int | str) -> int:
    if not isinstance(version, str):
        return version
    value = row[version]
    return epoch_micros(value) if isinstance(value, datetime) else int(value)


def _chunks(rows: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[Mapping[str, Any]]]:
    chunk: list[Mapping[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def read_online(client: redis.Redis, namespace: str, view: str, features: Sequence[str],
                entity_ids: Sequence[Any], now: datetime | None = None) -> list[dict[str, Any]]:
    """One row per requested entity, in order: ``entity``, each feature, ``event_time`` and
    ``age_seconds`` (now - event time). A missing or expired entity, or a feature stored as
    null, comes back as None: never an error, never a default."""
    now = now or datetime.now(timezone.utc)
    keys = [entity_key(namespace, view, entity) for entity in entity_ids]
    rows = []
    reads = [(key, lambda pipe, k=key: pipe.hgetall(k)) for key in keys]
    for entity, stored in zip(entity_ids, run_keyed(client, reads, writes=False)):
        fields = {k.decode(): v.decode() for k, v in stored.items()}
        event_time = None
        if EVENT_TIME_FIELD in fields:
            event_time = from_epoch_micros(int(fields[EVENT_TIME_FIELD]))
        row = {"entity": entity}
        row.update({name: decode_value(fields[name]) if name in fields else None for name in features})
        row["event_time"] = event_time
        row["age_seconds"] = (now - event_time).total_seconds() if event_time else None
        rows.append(row)
    return rows
