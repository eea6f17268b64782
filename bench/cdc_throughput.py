"""Change data capture from PostgreSQL to the current table and Redis: throughput, commit ->
Redis latency, and the cost of fp-cdc's ``MERGE``\\ s per micro-batch.

The run gets a connector, slot, topic (2 partitions), lake and Redis namespace of its own on
the local platform (``python -m pipelines.local up``: PostgreSQL, Kafka Connect with Debezium,
Kafka, Redis), and ``fp-cdc`` as a job process (its own Spark driver, ``local[2]``) with
``cdc.trigger_interval`` = ``--trigger``. A warm-up (``--warmup-rows``, one a second, awaited in
Redis and in the current table), then three phases, one after the other:

1. **latency**: ``--latency-rows`` single-row ``INSERT``\\ s, each its own transaction, at
   ``--rate`` per second. Per row: from the moment its ``COMMIT`` returned to (a) its change
   event's arrival at a Kafka consumer of the topic (``read_committed``: the baseline,
   Debezium alone) and (b) the first write of its hash in Redis (a keyspace subscriber).
2. **bulk insert**: ``--bulk-rows`` new rows in ``--bulk-transactions`` transactions, as fast
   as PostgreSQL takes them;
3. **bulk update**: every one of those rows updated, in as many transactions.

For the bulk phases: change events per second from the first commit to the last event on the
topic, to the ``MERGE`` of the current table that completed the phase, and to the last Redis
write (all the phase's keys written). The current table's completion is read from its Delta
log: the commit time of the ``MERGE`` that brought the rows it took since the warm-up to one
per key written since (fp-cdc's tables query; its Redis query runs apart). Each bulk phase
starts once the tables query has caught up with what came before it. Per ``MERGE`` (current and history tables): Delta's own ``executionTimeMs`` and
the batch's source rows, from the commit info.

The results go to ``bench/results/cdc-<time>.json``; the last line printed is that JSON.

Usage: python bench/cdc_throughput.py --env local [--trigger 1s] [--rate 50] [--latency-rows 1500]
       [--bulk-rows 20000] [--bulk-transactions 20] [--warmup-rows 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as host
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import redis
import yaml
from confluent_kafka import Consumer, TopicPartition

from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args
from pipelines.core.config import deep_merge, parse_overrides
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.kafka_connect import ConnectClient, debezium_postgres_config
from pipelines.core.settings import PROJECT_ROOT, load_settings, local_connect_url
from pipelines.core.times import parse_duration
from pipelines.local import appdb
from pipelines.local.platform import LocalPlatform
from pipelines.online.attributes import attribute_key
from pipelines.online.store import redis_client

log = logging.getLogger("bench")


def now_micros() -> int:
    return time.time_ns() // 1000


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float | int]:
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": max(values)}


class TopicArrivals(threading.Thread):
    """Notes when each change event of the topic arrives: key -> arrival times (µs)."""

    def __init__(self, settings, topic: str):
        super().__init__(daemon=True)
        self.consumer = Consumer({**settings.kafka.client_properties(), "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                                  "isolation.level": "read_committed", "enable.auto.commit": False,
                                  "fetch.wait.max.ms": 5})
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        # From the end: the connector's snapshot of the table is not measured.
        self.consumer.assign([TopicPartition(topic, p, -1) for p in partitions])
        self.arrivals: dict[str, list[int]] = defaultdict(list)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for message in self.consumer.consume(1000, timeout=0.1):
                if message.error() is None and message.key():
                    seen = now_micros()
                    self.arrivals[json.loads(message.key())["account_id"]].append(seen)

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.consumer.close()


class RedisWrites(threading.Thread):
    """Notes when each attributes hash of the run is written: key -> write times (µs)."""

    def __init__(self, client: redis.Redis, prefix: str):
        super().__init__(daemon=True)
        self.prefix = prefix
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"__keyspace@{client.connection_pool.connection_kwargs.get('db', 0)}__:{prefix}*")
        self.writes: dict[str, list[int]] = defaultdict(list)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            message = self.pubsub.get_message(timeout=0.1)
            if message is not None and message["data"] == b"hset":
                self.writes[message["channel"].decode().split(":", 1)[1][len(self.prefix):]].append(now_micros())

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.pubsub.close()


def merge_commits(table: Path) -> list[dict]:
    """Every MERGE commit of a Delta table: its time (µs), Delta's execution time, source rows."""
    commits = []
    for entry in sorted((table / "_delta_log").glob("*.json")):
        for line in entry.read_text().splitlines():
            info = json.loads(line).get("commitInfo")
            if info and info.get("operation") == "MERGE":
                metrics = info.get("operationMetrics", {})
                commits.append({"at": info["timestamp"] * 1000, "execution_ms": int(metrics.get("executionTimeMs", 0)),
                                "source_rows": int(metrics.get("numSourceRows", 0))})
    return commits


def wait_until(condition, timeout: float, what: str, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if job.poll() is not None:
            raise RuntimeError(f"fp-cdc exited with {job.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--trigger", default="1s", help="fp-cdc's trigger interval (cdc.trigger_interval)")
    parser.add_argument("--rate", type=float, default=50.0, help="single-row commits per second (latency phase)")
    parser.add_argument("--latency-rows", type=int, default=1500)
    parser.add_argument("--bulk-rows", type=int, default=20_000)
    parser.add_argument("--bulk-transactions", type=int, default=20)
    parser.add_argument("--warmup-rows", type=int, default=30,
                        help="rows inserted (one per second) and awaited in Redis before measuring: fp-cdc runs, "
                             "its first batches (JIT, first plans) are behind it")
    parser.add_argument("--drain", type=float, default=600.0, help="seconds to wait for a phase's last change")
    args = parser.parse_args(argv)
    parse_duration(args.trigger, "--trigger")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    configure_logging(logging.INFO)
    base = settings_from_args(args)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    tag = run_id.lower()
    prefix = f"bench{tag}"
    topic = f"{prefix}.public.accounts"
    root = PROJECT_ROOT / ".local" / "bench" / f"cdc-{run_id}"
    overrides = deep_merge(parse_overrides(args.set), {
        "kafka": {"topics": {topic: {"contract": "accounts", "partitions": 2, "replication_factor": 1}}},
        "cdc": {"connector": f"bench-{tag}", "slot": f"bench_{tag}", "topic_prefix": prefix,
                "trigger_interval": args.trigger},
        "storage": {"root": str(root / "lake")},
        "redis": {"namespace": f"bench-cdc-{tag}"},
        # Relative paths would resolve against the run's conf folder: the platform's own, absolute.
        "spark": {"jars_dir": str(Path(base.spark.jars_dir).resolve())},
        "local": {"root": str(Path(base.local.root).resolve())},
    })
    # A conf folder of the run's own: fp-cdc reads it (a topic name with dots cannot be --set).
    conf_dir = root / "conf"
    shutil.copytree(Path(args.conf_dir) if args.conf_dir else PROJECT_ROOT / "conf", conf_dir)
    env_file = conf_dir / f"{args.env}.yaml"
    env_file.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(env_file.read_text()) or {}, overrides)))
    settings = load_settings(args.env, conf_dir)
    postgres = LocalPlatform(base.local).postgres
    ensure_topics(settings.kafka.client_properties(), [TopicSpec(topic, 2, 1)])
    connect = ConnectClient(settings.cdc.connect_url or local_connect_url(base.local.connect_port))
    connect.put_config(settings.cdc.connector, debezium_postgres_config(settings.cdc))
    connect.wait_running(settings.cdc.connector)
    control = redis_client(settings.redis)
    previous_events = control.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
    control.config_set("notify-keyspace-events", "Kh")
    key_prefix = attribute_key(settings.redis.namespace, "accounts", "")
    arrivals, writes = TopicArrivals(settings, topic), RedisWrites(control, key_prefix)
    arrivals.start()
    writes.start()
    job_log = root / "cdc.log"
    job = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "jobs" / "cdc.py"), "--env", args.env, "--conf-dir",
                            str(conf_dir), "--topics", topic], stdout=open(job_log, "ab"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    result: dict = {"run": run_id, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                    "machine": {"cores": os.cpu_count(), "python": host.python_version(),
                                "load_at_start": os.getloadavg()},
                    "trigger": args.trigger}
    try:
        with postgres.connect(settings.cdc.database.dbname, appdb.APP_ROLE) as conn:
            warm = [f"warm-{tag}-{i}" for i in range(args.warmup_rows)]
            log.info("warm-up: %d rows, one a second, until Redis has them all", len(warm))
            for key in warm:
                conn.execute("insert into accounts (account_id, status, credit_limit, home_country) "
                             "values (%s, 'active', 1, 'DE')", [key])
                conn.commit()
                time.sleep(1.0)
            warm_end = now_micros()
            wait_until(lambda: all(k in writes.writes for k in warm), args.drain, "the warm-up rows in Redis", job)
            # ... and in the current table: the tables query's first batches (JIT, first plans,
            # the snapshot) are behind it too.
            current_path = Path(settings.storage.cdc_path(topic, "current"))
            wait_until(lambda: len(merge_commits(current_path)) >= 2
                       and max(c["at"] for c in merge_commits(current_path)) > warm_end, args.drain,
                       "the warm-up rows in the current table", job)
            warmed_up = now_micros()
            # 1. latency: one row per transaction at a steady rate.
            keys = [f"lat-{tag}-{i}" for i in range(args.latency_rows)]
            committed: dict[str, int] = {}
            log.info("latency: %d single-row commits at %.0f/s", len(keys), args.rate)
            start = time.monotonic()
            for i, key in enumerate(keys):
                pause = start + i / args.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                conn.execute("insert into accounts (account_id, status, credit_limit, home_country) "
                             "values (%s, 'active', 1, 'DE')", [key])
                conn.commit()
                committed[key] = now_micros()
            wait_until(lambda: all(k in writes.writes for k in keys), args.drain, "the latency rows in Redis", job)
            result["latency_seconds"] = {
                "commit_to_kafka": summary([(arrivals.arrivals[k][0] - committed[k]) / 1e6 for k in keys]),
                "commit_to_redis": summary([(writes.writes[k][0] - committed[k]) / 1e6 for k in keys]),
            }
            log.info("latency: %s", result["latency_seconds"])
            # 2 and 3. bulk insert, then bulk update of the same rows.
            bulk = [f"bulk-{tag}-{i}" for i in range(args.bulk_rows)]
            per_tx = max(1, len(bulk) // args.bulk_transactions)
            statements = {
                "bulk_insert": "insert into accounts (account_id, status, credit_limit, home_country) "
                               "select unnest(%s::text[]), 'active', 100, 'FR'",
                "bulk_update": "update accounts set credit_limit = credit_limit + 1, updated_at = now() "
                               "where account_id = any(%s::text[])",
            }
            result["bulk"] = {}
            # The tables query runs apart from the Redis one. Each MERGE of the current table takes
            # one row per key of its batch, and every key the run writes after the warm-up changes
            # once per phase: the table holds a phase once the MERGEs since the warm-up took the
            # latency rows and every phase's rows so far (the warm-up's are merged before).
            def merged_since_warmup() -> list[dict]:
                return sorted((c for c in merge_commits(current_path) if c["at"] > warmed_up), key=lambda c: c["at"])

            def merged_rows() -> int:
                return sum(c["source_rows"] for c in merged_since_warmup())

            target = len(keys)
            for phase, sql in statements.items():
                # The previous phase (or the latency rows) in the table first: its rows would count.
                wait_until(lambda: merged_rows() >= target, args.drain, "the tables query to catch up", job)
                target += len(bulk)
                seen_before = {k: len(writes.writes.get(k, ())) for k in bulk}
                arrived_before = {k: len(arrivals.arrivals.get(k, ())) for k in bulk}
                first_commit = now_micros()
                for i in range(0, len(bulk), per_tx):
                    conn.execute(sql, [bulk[i:i + per_tx]])
                    conn.commit()
                last_commit = now_micros()
                log.info("%s: %d rows committed in %.1fs", phase, len(bulk), (last_commit - first_commit) / 1e6)
                wait_until(lambda: all(len(writes.writes.get(k, ())) > seen_before[k] for k in bulk), args.drain,
                           f"{phase} in Redis", job)
                redis_done = max(writes.writes[k][seen_before[k]] for k in bulk)
                kafka_done = max(arrivals.arrivals[k][arrived_before[k]] for k in bulk)
                wait_until(lambda: merged_rows() >= target, args.drain, f"{phase} in the current table", job)
                total, current_done = 0, None
                for commit in merged_since_warmup():
                    total += commit["source_rows"]
                    if total >= target:
                        current_done = commit["at"]
                        break
                seconds = {"kafka": (kafka_done - first_commit) / 1e6, "current_table": (current_done - first_commit) / 1e6,
                           "redis": (redis_done - first_commit) / 1e6}
                result["bulk"][phase] = {
                    "changes": len(bulk), "transactions": -(-len(bulk) // per_tx),
                    "commit_seconds": (last_commit - first_commit) / 1e6, "seconds": seconds,
                    "events_per_second": {name: len(bulk) / value for name, value in seconds.items()},
                }
                log.info("%s: %s", phase, result["bulk"][phase])
        # MERGE cost per batch after the warm-up (every batch had changes: an empty one writes nothing).
        result["merge_ms_per_batch"] = {}
        for table in ("current", "history"):
            commits = [c for c in merge_commits(Path(settings.storage.cdc_path(topic, table))) if c["at"] > warmed_up]
            result["merge_ms_per_batch"][table] = {
                "batches": len(commits),
                "execution_ms": summary([c["execution_ms"] for c in commits]),
                "source_rows": summary([c["source_rows"] for c in commits]),
            }
        result["machine"]["load_at_end"] = os.getloadavg()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGTERM)
            try:
                job.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
        arrivals.stop()
        writes.stop()
        control.config_set("notify-keyspace-events", previous_events)
        connect.delete(settings.cdc.connector)
        deadline = time.monotonic() + 60
        while not postgres.drop_slot(settings.cdc.slot) and time.monotonic() < deadline:
            time.sleep(0.5)
        with postgres.connect(settings.cdc.database.dbname, appdb.APP_ROLE) as conn:
            conn.execute("delete from accounts where account_id like any(%s)",
                         [[f"{kind}-{tag}-%" for kind in ("warm", "lat", "bulk")]])
        for key in control.scan_iter(f"{key_prefix}*", count=1000):
            control.delete(key)
    out = PROJECT_ROOT / "bench" / "results" / f"cdc-{run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except psycopg.Error as error:
        sys.exit(f"database: {error}")
