"""Event-to-Redis latency of a trailing view at a fixed input rate, by the path the events take.

Events are produced at ``--rate`` per second, each stamped with its send time as event time,
while the streams run. A Redis keyspace subscriber notes the moment each online hash is
written and the event time it then holds. An event's latency is the time from its event time
(= send time) to the first Redis write of its entity holding that event time or a later one:
how long the online store takes to reflect it. Reported as p50/p95/p99 over the events sent
after a warm-up, per path:

* **bronze** (what ``fp-ingest`` + ``fp-features`` do): Kafka -> ingest (validate, dedupe,
  bronze Delta) -> the view's stream of the bronze table -> feature table + Redis;
* **kafka** (the alternative, lower bound): Kafka -> the same validation -> the view's stream
  -> feature table + Redis, in one query; the ingest runs beside it (bronze and the dead-letter
  table are needed either way). No duplicate filter: Spark allows one watermark per query
  chain, and the filter's (7 days of event age) and the view's (minutes) cannot both hold, so
  this path is measured without it: it can only be slower with one.

Every path runs in one Spark session (``local[2]``), one after the other (bronze first), on a
fresh topic. Only the bronze path has the feature-metrics listener (a Delta append per batch
on the same cores): a handicap on the shipped path, not on the alternative. An event counts as
reflected by the first write of its account holding its event time or a later one, so an
event superseded within a batch is reflected by that batch's write.

Usage: python bench/feature_latency.py --env local [--rate 100] [--seconds 120] [--trigger 1s]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as host
import random
import shutil
import sys
import threading
import time
import uuid
from bisect import bisect_left
from collections import defaultdict
from datetime import datetime, timezone

import redis

from pipelines.contracts.validation import ValidationRules
from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args
from pipelines.core.config import deep_merge, parse_overrides
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.runner import stop_between_batches
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.core.times import parse_duration
from pipelines.features.sinks import FeatureBatchWriter
from pipelines.features.stream import start_features
from pipelines.features.trailing_state import trailing_features_stream
from pipelines.ingest.bronze import bronze_rows
from pipelines.ingest.json_records import validate_records
from pipelines.ingest.sources import read_kafka_stream
from pipelines.ingest.stream import start_ingest
from pipelines.online.store import EVENT_TIME_FIELD, redis_client

log = logging.getLogger("bench")
VIEW = "account_velocity"
PATHS = ("bronze", "kafka")


def now_micros() -> int:
    return time.time_ns() // 1000


class OnlineWrites(threading.Thread):
    """Records every write of the view's hashes: (entity, when written, event time held)."""

    def __init__(self, client: redis.Redis, namespace: str):
        super().__init__(daemon=True)
        self.client = client
        self.prefix = f"{namespace}:{VIEW}:"
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"__keyspace@{client.connection_pool.connection_kwargs.get('db', 0)}__:{self.prefix}*")
        self.writes: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.stopping = threading.Event()

    def run(self) -> None:
        reader = self.client
        while not self.stopping.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message is None or message["data"] != b"hset":
                continue
            seen = now_micros()
            key = message["channel"].decode().split(":", 1)[1]
            held = reader.hget(key, EVENT_TIME_FIELD)
            if held is not None:
                self.writes[key[len(self.prefix):]].append((seen, int(held)))

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.pubsub.close()


def produce_at_rate(settings, topic: str, rate: float, seconds: float, accounts: int, seed: int) -> list[tuple[str, int]]:
    """Send ``rate`` events per second for ``seconds``, each with event time = send time."""
    from confluent_kafka import Producer

    producer = Producer({**settings.kafka.client_properties(), "enable.idempotence": True, "linger.ms": 5})
    rng = random.Random(seed)
    sent: list[tuple[str, int]] = []
    started = time.monotonic()
    total = int(rate * seconds)
    for n in range(total):
        ahead = n / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
        account = f"acct-{rng.randrange(accounts):06d}"
        micros = now_micros()
        stamp = datetime.fromtimestamp(micros / 1e6, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        micros = micros // 1000 * 1000  # the event time as sent: milliseconds
        event = {"transaction_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "account_id": account,
                 "merchant_id": f"merch-{rng.randrange(200):05d}", "amount_usd": round(rng.uniform(1, 500), 2),
                 "merchant_category_code": "5411", "balance_usd": 1000.0, "event_time": stamp}
        producer.produce(topic, key=account.encode(), value=json.dumps(event).encode())
        producer.poll(0)
        sent.append((account, micros))
    if producer.flush(60):
        raise RuntimeError("events left unsent")
    return sent


def latencies(sent: list[tuple[str, int]], writes: dict[str, list[tuple[int, int]]]) -> tuple[list[float], int]:
    """Seconds from each event's time to the first write of its entity holding it (or newer);
    and how many events no write reflected."""
    result, missing = [], 0
    for account, event_micros in sent:
        history = writes.get(account, [])
        # Writes in the order seen; the held event time only grows (newer wins).
        held = [h for _, h in history]
        i = bisect_left(held, event_micros)
        if i == len(history):
            missing += 1
            continue
        result.append((history[i][0] - event_micros) / 1e6)
    return result, missing


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def start_kafka_direct(spark, settings, view):
    """The alternative path: the view's stream straight from Kafka (validation, valid rows only)."""
    topic = settings.ingest.topics[0]
    contract = settings.contract_for(topic)
    records = read_kafka_stream(spark, settings.kafka, topic, settings.ingest)
    events = bronze_rows(validate_records(records, contract, ValidationRules.of(settings.ingest)), contract)
    handler = FeatureBatchWriter(view, settings)
    interval = int(settings.features.trigger_interval.total_seconds() * 1000)
    return (trailing_features_stream(events, view).writeStream.queryName(f"kafka_direct_{view.name}")
            .foreachBatch(handler).option("checkpointLocation", settings.storage.checkpoint_path("kafka_direct", view.name))
            .trigger(processingTime=f"{interval} milliseconds").start())


def run_path(spark, base_args, path: str, run_id: str, args) -> dict:
    topic = f"bench_lat_{path}_{run_id.lower()}"
    root = PROJECT_ROOT / ".local" / "bench" / f"latency-{run_id}" / path
    trigger = args.trigger
    overrides = deep_merge(parse_overrides(base_args.set), {
        "kafka": {"topics": {topic: {"contract": "transactions", "partitions": 2, "replication_factor": 1}}},
        "ingest": {"topics": [topic], "trigger_interval": trigger, "starting_offsets": "earliest"},
        "features": {"trigger_interval": trigger},
        "storage": {"root": str(root / "lake")},
        "redis": {"namespace": f"bench-latency-{run_id}-{path}"},
    })
    settings = load_settings(base_args.env, base_args.conf_dir, overrides)
    ensure_topics(settings.kafka.client_properties(), [TopicSpec(topic, 2, 1), TopicSpec(settings.kafka.dlq_topic_for(topic), 2, 1)])
    view = settings.views[VIEW]
    client = redis_client(settings.redis)
    listener = OnlineWrites(client, settings.redis.namespace)
    listener.start()

    try:
        return measure_path(spark, settings, path, view, client, listener, args)
    finally:
        for key in client.scan_iter(f"{settings.redis.namespace}:*", count=1000):
            client.unlink(key)
        shutil.rmtree(root, ignore_errors=True)


def measure_path(spark, settings, path: str, view, client, listener: OnlineWrites, args) -> dict:
    """Run the path's queries while producing, and the latency of every event after the warm-up."""
    topic = settings.ingest.topics[0]
    ingest = start_ingest(spark, settings)
    queries = list(ingest.queries)
    if path == "bronze":
        feature_queries, feature_listener = start_features(spark, settings, [view])
        queries += feature_queries
    else:
        queries.append(start_kafka_direct(spark, settings, view))
        feature_listener = None
    time.sleep(args.settle)  # let every query start and run its first (empty) batches
    log.info("%s: producing %.0f events/s for %ds", path, args.rate, args.seconds)
    sent = produce_at_rate(settings, topic, args.rate, args.seconds, args.accounts, seed=17)
    # Wait until every event is reflected in Redis (or give up after a while).
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        measured, missing = latencies(sent, listener.writes)
        if not missing:
            break
        time.sleep(1)
    stop_between_batches(queries)
    for q in queries:
        q.awaitTermination()
    spark.streams.removeListener(ingest.listener)
    if feature_listener:
        spark.streams.removeListener(feature_listener)
    listener.stop()
    measured, missing = latencies(sent[int(args.warmup * args.rate):], listener.writes)
    if missing:
        raise RuntimeError(f"{path}: {missing} events never reached Redis")
    return {"events": len(measured), "p50": round(percentile(measured, 50), 2), "p95": round(percentile(measured, 95), 2),
            "p99": round(percentile(measured, 99), 2), "max": round(max(measured), 2),
            "mean": round(sum(measured) / len(measured), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument("--seconds", type=int, default=120, help="how long to produce")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of events left out of the figures")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds between query start and the first event")
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--trigger", default="1s", help="trigger interval of every query")
    parser.add_argument("--path", choices=PATHS, action="append", help="run only these paths (default: both)")
    args = parser.parse_args(argv)
    parse_duration(args.trigger, "--trigger")
    configure_logging(logging.INFO)
    base = settings_from_args(args)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")

    from pipelines.core.session import build_session

    spark = build_session(base.spark)
    control = redis_client(base.redis)
    previous = control.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
    control.config_set("notify-keyspace-events", "Kh")  # keyspace events of hash commands
    results: dict = {"run": run_id, "rate": args.rate, "seconds": args.seconds, "warmup": args.warmup,
                     "trigger": args.trigger, "accounts": args.accounts, "view": VIEW,
                     "machine": {"cpus": os.cpu_count(), "python": host.python_version(), "system": host.platform()}}
    try:
        for path in args.path or PATHS:
            results[path] = run_path(spark, args, path, run_id, args)
            log.info("%s: %s", path, results[path])
    finally:
        control.config_set("notify-keyspace-events", previous)

    out = PROJECT_ROOT / "bench" / "results" / f"latency-{run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nevent-to-Redis latency, {VIEW}, {args.rate:.0f} events/s, trigger {args.trigger} (seconds)\n")
    print("| path | events | p50 | p95 | p99 | max |\n|---|---|---|---|---|---|")
    for path in PATHS:
        if path in results:
            r = results[path]
            print(f"| {path} | {r['events']:,} | {r['p50']} | {r['p95']} | {r['p99']} | {r['max']} |")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
