"""Online store: Redis sink throughput and read latency, on the local platform's Redis.

Writes (the same keys and values, one hash per entity of one view, ``account_velocity`` by default):

1. **bare**: redis-py, pipelined in chunks, ``HSET key mapping=...`` + ``PEXPIRE`` per key, with
   the very same value encoding as the sink but no compare-and-set.
2. **sink**: :meth:`pipelines.online.store.OnlineStoreWriter.write`, the project's real sink (Lua
   newer-wins compare-and-set, whole-hash replace, TTL), same chunk size, on an empty keyspace.
3. **sink replay**: the same call again on the same rows: every write is then rejected by the
   compare-and-set (same event time and version): the cost of replaying a batch.
4. **redis-benchmark** on the same server, one connection, pipeline depth = the chunk size, keys
   drawn at random (``-r``) from the same key names, hash fields and values of one of the rows:
   ``HSET`` (the server's ceiling for a plain write) and ``EVALSHA`` of the sink's own script
   (the compare-and-set with no Python client in the way).

Each write is measured ``--rounds`` times, the methods interleaved (the fastest round of each is
reported, with the range, and the sink / bare ratio within each round); every measurement
starts from an empty benchmark keyspace. Besides wall-clock keys/s, each reports the client's
CPU and the Redis server's CPU (``INFO cpu``) per key: on a shared machine those move less
than the wall clock, and they show on which side of the socket a cost lies.

Reads: :func:`pipelines.online.store.read_online` for 1 entity and for 100 (random existing entities),
and for 100 of which half do not exist (checked to come back as None); p50/p95/p99 per call,
next to the bare pipelined ``HGETALL`` without decoding.

Only keys under ``<namespace>:<view>:`` (namespace ``bench`` by default, never the store's own)
are written, and they are deleted with SCAN + UNLINK before, between and after the measurements.
Results go to ``bench/results/online-<time>.json`` and Markdown tables on stdout.

Usage: python bench/online_store.py --env local [--keys 200000]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import platform as host
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import redis

from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args
from pipelines.core.config import secret_from_env
from pipelines.core.errors import ConfigError
from pipelines.core.settings import PROJECT_ROOT, Settings
from pipelines.core.times import epoch_micros
from pipelines.core.view_spec import FeatureView, event_time_column, feature_names
from pipelines.online.store import (
    _NEWER_WINS,
    EVENT_TIME_FIELD,
    VERSION_FIELD,
    OnlineStoreWriter,
    encode_value,
    entity_key,
    read_online,
    redis_client,
)

log = logging.getLogger("bench")

#: Every write carries this version: the replay then has the same (event time, version) as
#: what is stored, which the compare-and-set rejects.
VERSION = 1


# --------------------------------------------------------------------------- data


def entity_id(index: int) -> str:
    """Account ids padded to 12 digits: exactly the names redis-benchmark's ``__rand_int__``
    expands to, so that all the write methods address the same keys."""
    return f"acct-{index:012d}"


def feature_values(view: FeatureView, rng: random.Random) -> dict[str, Any]:
    """One entity's plausible feature values: counts growing with the window, money as
    2-decimal floats, averages as full-precision floats (the longest JSON numbers), so that the
    encoded hash has the size and types of a real one. No value is null."""
    windows = sorted({w for _, _, _, w in view.outputs() if w is not None})
    counts: dict[timedelta | None, int] = {None: rng.randint(1, 50)}
    running = 0
    for window in windows:
        running += rng.randint(1, 8) if running == 0 else rng.randint(0, 40)
        counts[window] = running
    means = {w: rng.lognormvariate(3.7, 0.8) for w in counts}
    values: dict[str, Any] = {}
    for name, function, _, window in view.outputs():
        count, mean = counts[window], means[window]
        total = round(mean * count, 2)
        if function == "count":
            values[name] = count
        elif function == "approx_count_distinct":
            values[name] = rng.randint(1, min(count, 25))
        elif function == "sum":
            values[name] = total
        elif function == "avg":
            values[name] = total / count
        elif function == "max":
            values[name] = round(mean * rng.uniform(1.0, 2.5), 2)
        elif function == "min":
            values[name] = round(mean * rng.uniform(0.2, 1.0), 2)
        elif function == "last":
            values[name] = round(rng.uniform(0, 20_000), 2)
        else:
            raise ValueError(f"no generator for function {function!r} of {name}")
    # Session views also store event_count, duration_seconds and count_<column>_<value>: integers.
    for name in feature_names(view):
        values.setdefault(name, rng.randint(0, 50))
    return values


def make_rows(view: FeatureView, count: int, seed: int, now: datetime) -> list[dict[str, Any]]:
    """``count`` rows as the features job hands them to the sink (``Row.asDict()``): the entity
    (a string), the event time (an aware UTC datetime, microsecond precision, within the last
    day) and every feature, one row per entity."""
    rng = random.Random(seed)
    time_column = event_time_column(view)
    rows = []
    for index in range(count):
        row: dict[str, Any] = {view.entity: entity_id(index),
                               time_column: now - timedelta(microseconds=rng.randrange(86_400_000_000))}
        row.update(feature_values(view, rng))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- Redis helpers


def delete_keys(client: redis.Redis, pattern: str) -> int:
    """UNLINK every key matching ``pattern`` (SCAN, never FLUSHALL: the server is shared)."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) == 1000:
            deleted += client.unlink(*batch)
            batch = []
    if batch:
        deleted += client.unlink(*batch)
    return deleted


def server_cpu_seconds(client: redis.Redis) -> float:
    """CPU time of the whole Redis process so far (all threads: command execution, AOF)."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def aof_rewrites(client: redis.Redis) -> int:
    """Completed AOF rewrites (a fork that competes for the CPU while it runs)."""
    return int(client.info("persistence").get("aof_rewrites", 0))


def redis_facts(client: redis.Redis) -> dict[str, Any]:
    """Version and persistence of the server: with the AOF on, every applied write is also
    appended to the log (and periodically rewritten by a forked child)."""
    server, persistence = client.info("server"), client.info("persistence")
    facts: dict[str, Any] = {"version": server["redis_version"], "os": server.get("os"),
                             "aof_enabled": persistence.get("aof_enabled")}
    try:  # managed servers may refuse CONFIG
        facts["appendfsync"] = client.config_get("appendfsync").get("appendfsync")
    except redis.ResponseError:
        facts["appendfsync"] = None
    return facts


# --------------------------------------------------------------------------- writes


@dataclass(frozen=True)
class WriteTarget:
    """Where and what the writes go to: one view's keys under the benchmark's namespace."""

    namespace: str
    view: FeatureView
    features: list[str]
    chunk_size: int

    @property
    def time_column(self) -> str:
        return event_time_column(self.view)

    @property
    def ttl_ms(self) -> int:
        return int(self.view.online.ttl.total_seconds() * 1000)

    @property
    def key_pattern(self) -> str:
        return f"{self.namespace}:{self.view.name}:*"

    def key(self, entity: Any) -> str:
        return entity_key(self.namespace, self.view.name, entity)


def measure(client: redis.Redis, keys: int, action: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """Run ``action`` once; its wall time, the CPU of this process and of its children (for
    redis-benchmark), the Redis server's CPU, per key."""
    rewrites = aof_rewrites(client)
    server_before = server_cpu_seconds(client)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_before = time.process_time()
    started = time.perf_counter()
    outcome = action()
    seconds = time.perf_counter() - started
    client_cpu = time.process_time() - client_before
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu += (children_after.ru_utime - children_before.ru_utime) + (children_after.ru_stime - children_before.ru_stime)
    server_cpu = server_cpu_seconds(client) - server_before
    figures = {"keys": keys, "seconds": round(seconds, 3), "keys_per_second": round(keys / seconds),
               "client_cpu_us_per_key": round(client_cpu / keys * 1e6, 2),
               "server_cpu_us_per_key": round(server_cpu / keys * 1e6, 2),
               "aof_rewrites_during": aof_rewrites(client) - rewrites}
    return figures, outcome


def bare_write(client: redis.Redis, target: WriteTarget, rows: Sequence[Mapping[str, Any]]) -> None:
    """HSET + PEXPIRE per key, pipelined per chunk, encoded exactly like the sink's writes
    (same fields, same strings), but unconditional: the difference to the sink is the CAS."""
    for start in range(0, len(rows), target.chunk_size):
        pipe = client.pipeline(transaction=False)
        for row in rows[start:start + target.chunk_size]:
            mapping: dict[str, Any] = {EVENT_TIME_FIELD: epoch_micros(row[target.time_column]), VERSION_FIELD: VERSION}
            for name in target.features:
                if row[name] is not None:
                    mapping[name] = encode_value(row[name])
            key = target.key(row[target.view.entity])
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, target.ttl_ms)
        pipe.execute()


def encode_only(target: WriteTarget, rows: Sequence[Mapping[str, Any]]) -> int:
    """The sink's per-row argument building with no Redis at all: the Python floor of a write."""
    size = 0
    for row in rows:
        args: list[Any] = [epoch_micros(row[target.time_column]), VERSION, target.ttl_ms]
        for name in target.features:
            if row[name] is not None:
                args += [name, encode_value(row[name])]
        size += len(args) + len(target.key(row[target.view.entity]))
    return size


def check_stored(client: redis.Redis, target: WriteTarget, rows: Sequence[Mapping[str, Any]],
                 rng: random.Random, sample: int = 200) -> None:
    """A sample of entities reads back exactly as written (so the writes measured were real)."""
    picked = rng.sample(list(rows), min(sample, len(rows)))
    entity = target.view.entity
    got = read_online(client, target.namespace, target.view.name, target.features, [r[entity] for r in picked])
    for row, stored in zip(picked, got):
        expected = {name: row[name] for name in target.features}
        actual = {name: stored[name] for name in target.features}
        if actual != expected or stored["event_time"] != row[target.time_column]:
            raise AssertionError(f"{row[entity]}: stored {stored}, expected {row}")


def redis_benchmark_command(binary: str, settings: Settings, target: WriteTarget, requests: int,
                            command: list[str]) -> list[str]:
    """One connection (like one sink writer), pipeline depth = chunk size, keys drawn from
    the same names as the entities (``-r``), CSV output."""
    args = [binary, "-h", settings.redis.host, "-p", str(settings.redis.port), "--dbnum", str(settings.redis.db),
            "-c", "1", "-n", str(requests), "-r", str(requests), "-P", str(target.chunk_size), "--csv"]
    return args + command


def run_redis_benchmark(args: list[str], settings: Settings) -> dict[str, Any]:
    """Run redis-benchmark and parse its CSV line: requests/s and latency per pipelined batch.

    A password goes through ``REDISCLI_AUTH`` in the tool's environment, never on its command
    line (where ``ps`` shows it)."""
    env = dict(os.environ)
    if settings.redis.password_env:
        env["REDISCLI_AUTH"] = secret_from_env(settings.redis.password_env, "redis.password_env")
    done = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith('"')]
    table = list(csv.DictReader(io.StringIO("\n".join(lines))))
    if len(table) != 1:
        raise RuntimeError(f"unexpected redis-benchmark output: {done.stdout!r} {done.stderr!r}")
    row = table[0]
    return {"rps": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"]), "p99_ms": float(row["p99_latency_ms"])}


def server_rate(figures: Mapping[str, Any], bench: Mapping[str, Any]) -> dict[str, Any]:
    """redis-benchmark's own requests/s as the rate (our wall clock also counts the tool's
    start-up and connection), the wall clock kept apart."""
    return {"keys_per_second": round(bench["rps"]), "seconds": round(figures["keys"] / bench["rps"], 3),
            "wall_seconds": figures["seconds"]}


def shown_command(args: list[str]) -> str:
    """The command as run (it never carries a password)."""
    return shlex.join(["redis-benchmark", *args[1:]])


def write_round(client: redis.Redis, settings: Settings, target: WriteTarget, rows: list[dict[str, Any]],
                binary: str, rng: random.Random) -> dict[str, dict[str, Any]]:
    """One measurement of every write method, each from an empty benchmark keyspace; ends with
    the sink's keys in place (the reads use them)."""
    keys = len(rows)
    sample_row = rows[0]
    pairs: list[str] = []
    for name in target.features:
        pairs += [name, encode_value(sample_row[name])]
    key_template = target.key("acct-__rand_int__")
    micros, version = str(epoch_micros(sample_row[target.time_column])), str(VERSION)
    results: dict[str, dict[str, Any]] = {}

    delete_keys(client, target.key_pattern)
    hset = redis_benchmark_command(binary, settings, target, keys,
                                   ["HSET", key_template, EVENT_TIME_FIELD, micros, VERSION_FIELD, version, *pairs])
    figures, bench = measure(client, keys, lambda: run_redis_benchmark(hset, settings))
    results["redis_benchmark_hset"] = {**figures, **server_rate(figures, bench), "batch_p50_ms": bench["p50_ms"],
                                       "batch_p99_ms": bench["p99_ms"], "command": shown_command(hset),
                                       "distinct_keys": delete_keys(client, target.key_pattern)}

    # The sink's own script; loading it is idempotent and makes EVALSHA valid on this server.
    sha = client.script_load(_NEWER_WINS)
    evalsha = redis_benchmark_command(binary, settings, target, keys,
                                      ["EVALSHA", sha, "1", key_template, micros, version, str(target.ttl_ms), *pairs])
    figures, bench = measure(client, keys, lambda: run_redis_benchmark(evalsha, settings))
    distinct = delete_keys(client, target.key_pattern)
    # -r draws keys with replacement: a key's second draw has the same (event time, version)
    # and is rejected, so this is a mix of applied and stale writes, counted here.
    results["redis_benchmark_evalsha"] = {**figures, **server_rate(figures, bench), "batch_p50_ms": bench["p50_ms"],
                                          "batch_p99_ms": bench["p99_ms"], "command": shown_command(evalsha),
                                          "distinct_keys": distinct, "applied": distinct, "stale": keys - distinct}

    figures, _ = measure(client, keys, lambda: bare_write(client, target, rows))
    check_stored(client, target, rows, rng)
    distinct = delete_keys(client, target.key_pattern)
    if distinct != keys:
        raise AssertionError(f"bare writes left {distinct} keys, expected {keys}")
    results["bare"] = {**figures, "distinct_keys": distinct}

    writer = OnlineStoreWriter(client, target.namespace, target.view.name, target.view.online.ttl,
                               chunk_size=target.chunk_size)

    def write() -> Any:
        return writer.write(rows, target.view.entity, target.time_column, target.features, VERSION)

    figures, outcome = measure(client, keys, write)
    if (outcome.written, outcome.stale) != (keys, 0):
        raise AssertionError(f"sink on an empty keyspace: {outcome}, expected {keys} written")
    check_stored(client, target, rows, rng)
    results["sink"] = {**figures, "written": outcome.written, "stale": outcome.stale}

    figures, outcome = measure(client, keys, write)
    if (outcome.written, outcome.stale) != (0, keys):
        raise AssertionError(f"sink replay: {outcome}, expected {keys} stale")
    check_stored(client, target, rows, rng)
    results["sink_replay"] = {**figures, "written": outcome.written, "stale": outcome.stale}

    figures, _ = measure(client, keys, lambda: encode_only(target, rows))
    results["encode_only"] = figures
    return results


# --------------------------------------------------------------------------- reads


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def latency(calls: int, call: Callable[[int], Any], warmup: int = 50) -> dict[str, Any]:
    """Milliseconds per call of ``call(i)`` for i in ``range(calls)``, after ``warmup``
    unmeasured calls ``call(calls + j)`` (connection set-up, first allocations)."""
    for j in range(warmup):
        call(calls + j)
    times = []
    for i in range(calls):
        started = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"calls": calls, "p50_ms": round(percentile(times, 50), 3), "p95_ms": round(percentile(times, 95), 3),
            "p99_ms": round(percentile(times, 99), 3), "mean_ms": round(statistics.fmean(times), 3),
            "max_ms": round(times[-1], 3)}


def read_latencies(client: redis.Redis, target: WriteTarget, keys: int, repeat: int, seed: int) -> dict[str, Any]:
    """read_online per call for 1 and 100 random existing entities and for 100 of which half
    are missing, plus the bare pipelined HGETALL of the same batches (no decoding)."""
    rng = random.Random(seed)
    batch_calls = max(1, repeat // 4)
    warmup = 50
    singles = [[entity_id(rng.randrange(keys))] for _ in range(repeat + warmup)]
    hundreds = [[entity_id(i) for i in rng.sample(range(keys), 100)] for _ in range(batch_calls + warmup)]
    half_missing = []
    for _ in range(batch_calls + warmup):
        # Ids beyond the written range: never written, so missing; shuffled in among existing ones.
        ids = [entity_id(i) for i in rng.sample(range(keys), 50)] + [entity_id(keys + i) for i in rng.sample(range(keys), 50)]
        rng.shuffle(ids)
        half_missing.append(ids)
    written = {entity_id(i) for i in range(keys)}

    def online(batches: list[list[str]]) -> Callable[[int], Any]:
        return lambda i: read_online(client, target.namespace, target.view.name, target.features, batches[i])

    def raw(batches: list[list[str]]) -> Callable[[int], Any]:
        def call(i: int) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for entity in batches[i]:
                pipe.hgetall(target.key(entity))
            return pipe.execute()
        return call

    # The missing half must come back as rows of None (not errors, not defaults), the rest filled.
    for ids in half_missing:
        for row in read_online(client, target.namespace, target.view.name, target.features, ids):
            present = row["entity"] in written
            values = [row[name] for name in target.features] + [row["event_time"], row["age_seconds"]]
            if (present and None in values) or (not present and values != [None] * len(values)):
                raise AssertionError(f"read_online of {row['entity']} (written: {present}): {row}")
    log.info("read_online: %d batches of 50 existing + 50 missing entities checked", len(half_missing))

    results = {}
    for name, batches, calls in (("1", singles, repeat), ("100", hundreds, batch_calls),
                                 ("100_half_missing", half_missing, batch_calls)):
        results[f"read_online_{name}"] = {**latency(calls, online(batches), warmup), "entities": len(batches[0])}
        results[f"raw_hgetall_{name}"] = {**latency(calls, raw(batches), warmup), "entities": len(batches[0])}
        log.info("reads of %s: %s", name, results[f"read_online_{name}"])
    return results


# --------------------------------------------------------------------------- report


def best_of(rounds: list[dict[str, dict[str, Any]]], method: str) -> dict[str, Any]:
    """The figures of ``method``'s fastest round, with the range of all rounds. The fastest,
    not the median: on a shared machine a slow round measures the neighbours, a fast one
    cannot be faster than the code allows."""
    runs = sorted((r[method] for r in rounds), key=lambda f: f["keys_per_second"])
    best = dict(runs[-1])
    best["keys_per_second_range"] = [runs[0]["keys_per_second"], runs[-1]["keys_per_second"]]
    return best


def paired_ratios(rounds: list[dict[str, dict[str, Any]]], method: str, baseline: str) -> list[float]:
    """keys/s of ``method`` over ``baseline`` within each round (measured seconds apart, so
    less exposed to a change of load than a ratio of two rounds' figures)."""
    return [round(r[method]["keys_per_second"] / r[baseline]["keys_per_second"], 2) for r in rounds]


WRITE_ROWS = (
    ("bare", "redis-py pipelined HSET + PEXPIRE (no CAS)"),
    ("sink", "OnlineStoreWriter.write: Lua CAS + TTL, empty keyspace"),
    ("sink_replay", "OnlineStoreWriter.write again, same rows (all stale)"),
    ("redis_benchmark_hset", "redis-benchmark HSET, same fields (C client)"),
    ("redis_benchmark_evalsha", "redis-benchmark EVALSHA of the sink's script (C client)"),
    ("encode_only", "sink's argument encoding only, no Redis"),
)


def print_tables(results: dict[str, Any]) -> None:
    writes, rounds = results["writes"], results["rounds"]
    bare = writes["bare"]["keys_per_second"]
    load = results["load_average"]
    print(f"\n### Redis sink throughput ({results['keys']:,} keys of `{results['view']}`, chunks of "
          f"{results['chunk_size']}, best of {rounds} round{'s' if rounds > 1 else ''}; load average "
          f"{load['start']:.1f} at start, {load['end']:.1f} at end, {results['machine']['cpus']} CPUs)\n")
    print("| method | keys/s | range | vs bare | client CPU µs/key | Redis CPU µs/key |\n|---|---|---|---|---|---|")
    for key, label in WRITE_ROWS:
        w = writes[key]
        low, high = w["keys_per_second_range"]
        print(f"| {label} | {w['keys_per_second']:,} | {low:,}–{high:,} | {w['keys_per_second'] / bare:.2f}x "
              f"| {w['client_cpu_us_per_key']} | {w['server_cpu_us_per_key']} |")
    cpu = {k: writes[k]["client_cpu_us_per_key"] + writes[k]["server_cpu_us_per_key"] for k in ("bare", "sink", "sink_replay")}
    print(f"\nWithin each round, sink / bare keys/s: {results['sink_vs_bare_per_round']}; "
          f"replay / bare: {results['replay_vs_bare_per_round']}. CPU per key (client + Redis, "
          f"fastest rounds): bare {cpu['bare']:.1f} µs, sink {cpu['sink']:.1f} µs, replay {cpu['sink_replay']:.1f} µs.")
    print("\nredis-benchmark commands (`-r` draws keys with replacement):\n")
    for key in ("redis_benchmark_hset", "redis_benchmark_evalsha"):
        w = writes[key]
        print(f"* `{w['command']}`: {w['distinct_keys']:,} distinct keys")
    print(f"\n### Online reads: `read_online` per call ({results['redis']['version']} on "
          f"{results['redis_address']})\n")
    print("| entities per call | calls | p50 ms | p95 ms | p99 ms | raw HGETALL p50 / p99 ms |\n|---|---|---|---|---|---|")
    for name, label in (("1", "1"), ("100", "100"), ("100_half_missing", "100, half missing")):
        r, raw = results["reads"][f"read_online_{name}"], results["reads"][f"raw_hgetall_{name}"]
        print(f"| {label} | {r['calls']:,} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['p99_ms']:.3f} "
              f"| {raw['p50_ms']:.3f} / {raw['p99_ms']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--keys", type=int, default=200_000, help="entities written (one key each)")
    parser.add_argument("--repeat", type=int, default=2000,
                        help="read_online calls for 1 entity; a quarter as many for 100 entities")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each write method (fastest reported)")
    parser.add_argument("--view", default="account_velocity")
    parser.add_argument("--chunk-size", type=int, default=1000, help="pipelined writes per round-trip (the sink's default)")
    parser.add_argument("--namespace", default="bench", help="first part of the benchmark's keys (never the store's own)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    try:
        settings = settings_from_args(args)
        if args.view not in settings.views:
            raise ConfigError(f"--view: {args.view} not declared in conf/features ({', '.join(settings.views)})")
        if args.namespace == settings.redis.namespace or any(c in args.namespace for c in "*?[]\\:"):
            raise ConfigError(f"--namespace {args.namespace!r}: must differ from redis.namespace "
                              f"({settings.redis.namespace!r}; its keys would be deleted) and hold no glob characters or ':'")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    binary = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
    if not os.access(binary, os.X_OK):
        print("error: redis-benchmark not found (Debian: apt-get install redis-tools)", file=sys.stderr)
        return 2

    view = settings.views[args.view]
    target = WriteTarget(args.namespace, view, feature_names(view), args.chunk_size)
    client = redis_client(settings.redis)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    started = time.monotonic()
    rows = make_rows(view, args.keys, args.seed, datetime.now(timezone.utc))
    log.info("made %d rows of %s in %.1fs, e.g. %s", len(rows), view.name, time.monotonic() - started, rows[0])

    results: dict[str, Any] = {
        "run": run_id, "view": view.name, "features": target.features, "keys": args.keys, "chunk_size": args.chunk_size,
        "rounds": args.rounds, "namespace": args.namespace, "ttl_ms": target.ttl_ms,
        "redis_address": f"{settings.redis.host}:{settings.redis.port}", "redis": redis_facts(client),
        "machine": {"cpus": os.cpu_count(), "python": host.python_version(), "system": host.platform(),
                    "processor": host.processor() or host.machine()},
    }
    # Other work on the machine shows in every wall-clock figure: keep the 1-minute load with them.
    results["load_average"] = {"start": os.getloadavg()[0]}
    rng = random.Random(args.seed)
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        for number in range(1, args.rounds + 1):
            rounds.append(write_round(client, settings, target, rows, binary, rng))
            log.info("round %d: %s", number, {k: v["keys_per_second"] for k, v in rounds[-1].items()})
        results["writes"] = {key: best_of(rounds, key) for key, _ in WRITE_ROWS}
        results["write_rounds"] = rounds
        results["sink_vs_bare_per_round"] = paired_ratios(rounds, "sink", "bare")
        results["replay_vs_bare_per_round"] = paired_ratios(rounds, "sink_replay", "bare")
        # The keys of the last sink write are in place: read them.
        results["reads"] = read_latencies(client, target, args.keys, args.repeat, args.seed)
    finally:
        log.info("deleted %d benchmark keys", delete_keys(client, target.key_pattern))
    results["seconds"] = round(time.monotonic() - started, 1)
    results["load_average"]["end"] = os.getloadavg()[0]

    out = PROJECT_ROOT / "bench" / "results" / f"online-{run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print_tables(results)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
