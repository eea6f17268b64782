"""Trailing-view throughput: the feature stream vs a single-process Python consumer, same events.

1. **baseline**: one Python process with confluent-kafka reading both topics, ``json`` parse,
   the trailing views (``account_velocity`` on transactions, ``account_fraud_history`` on
   labels) computed per event over per-entity lists of recent events (evicted past max window
   + delay), and each chunk's latest row per entity written to Redis with the project's
   pipelined newer-wins writer. No validation, no duplicate filter, no Delta, no checkpoint.
2. **spark**: the real jobs, one after the other: the ingest (``availableNow``: validate,
   dedupe, bronze), then the feature stream of the two views (``availableNow`` over bronze:
   ``transformWithState``, feature tables with transaction ids, Redis).

The events are clean and in order per entity (no late, duplicate or bad records), so both
must leave the same values in Redis: the script checks every entity of both views and fails
on any difference. Results go to ``bench/results/features-<time>.json`` and a table on stdout.

Usage: python bench/feature_throughput.py --env local [--count 200000] [--accounts 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as host
import shutil
import sys
import time
from bisect import bisect_right
from collections import defaultdict
from datetime import datetime, timedelta, timezone

from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args
from pipelines.core.config import deep_merge, parse_overrides
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.core.view_spec import feature_names
from pipelines.features.stream import run_features
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from pipelines.online.store import OnlineStoreWriter, entity_from_key, read_online, redis_client

log = logging.getLogger("bench")
VIEWS = ("account_velocity", "account_fraud_history")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _micros(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class PythonTrailingView:
    """One trailing view, per entity: times and values of the events a future event can need."""

    def __init__(self, view):
        self.view = view
        self.outputs = view.outputs()
        self.delay = int(view.delay.total_seconds() * 1_000_000)
        self.lookback = int(view.max_lookback.total_seconds() * 1_000_000)
        self.times: dict[str, list[int]] = defaultdict(list)
        self.events: dict[str, list[dict]] = defaultdict(list)

    def add(self, event: dict) -> dict:
        """Append ``event`` (in time order per entity) and return its feature row."""
        entity, micros = event[self.view.entity], _micros(event[self.view.event_time])
        times, events = self.times[entity], self.events[entity]
        times.append(micros)
        events.append(event)
        # Evict what no later event can reach (the input is in order per entity).
        cut = bisect_right(times, micros - self.lookback)
        if cut > 256:
            del times[:cut], events[:cut]
        row = {self.view.entity: entity, "_micros": micros}
        hi = bisect_right(times, micros - self.delay)
        for name, function, column, window in self.outputs:
            lo = bisect_right(times, micros - self.delay - int(window.total_seconds() * 1_000_000))
            if column == "*":
                row[name] = hi - lo
                continue
            values = [e[column] for e in events[lo:hi] if e.get(column) is not None]
            if function == "count":
                row[name] = len(values)
            elif function == "approx_count_distinct":
                row[name] = len(set(values))
            elif function == "sum":
                row[name] = sum(values) if values else 0
            elif not values:
                row[name] = None
            elif function == "avg":
                row[name] = sum(values) / len(values)
            elif function == "min":
                row[name] = min(values)
            elif function == "max":
                row[name] = max(values)
            elif function == "last":
                latest = max(times[i] for i in range(lo, hi) if events[i].get(column) is not None)
                row[name] = max(events[i][column] for i in range(lo, hi)
                                if times[i] == latest and events[i].get(column) is not None)
        return row


def baseline(settings, topics: dict[str, str], expected: int, namespace: str) -> dict:
    from confluent_kafka import Consumer

    views = {name: settings.views[name] for name in VIEWS}
    by_topic = {topics[views[name].source.contract]: PythonTrailingView(views[name]) for name in VIEWS}
    writers = {v.view.name: OnlineStoreWriter(redis_client(settings.redis), namespace, v.view.name, v.view.online.ttl)
               for v in by_topic.values()}
    consumer = Consumer({**settings.kafka.client_properties(), "group.id": f"bench-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "fetch.max.bytes": 52428800, "max.partition.fetch.bytes": 10485760})
    consumer.subscribe(list(by_topic))
    read = rows = 0
    started = time.monotonic()
    while read < expected:
        messages = consumer.consume(10_000, timeout=5)
        if not messages and time.monotonic() - started > 600:
            raise RuntimeError(f"baseline stalled at {read} of {expected}")
        latest: dict[str, dict[str, dict]] = defaultdict(dict)
        for message in messages:
            if message.error():
                raise RuntimeError(message.error())
            read += 1
            computer = by_topic[message.topic()]
            row = computer.add(json.loads(message.value()))
            rows += 1
            latest[computer.view.name][row[computer.view.entity]] = row
        for name, entities in latest.items():
            view = views[name]
            for row in entities.values():
                row["_time"] = _EPOCH + timedelta(microseconds=row["_micros"])
            writers[name].write(entities.values(), view.entity, "_time", feature_names(view), version=0)
    elapsed = time.monotonic() - started
    consumer.close()
    return {"records": read, "feature_rows": rows, "seconds": round(elapsed, 2), "events_per_second": round(read / elapsed)}


def compare_online(settings, namespace_a: str, namespace_b: str) -> int:
    """Both namespaces hold the same entities of both views, with the same values; entities checked."""
    client = redis_client(settings.redis)
    checked = 0

    def entities_in(namespace: str, view: str) -> list[str]:
        return sorted(entity_from_key(k, namespace, view) for k in client.scan_iter(f"{namespace}:{view}:*", count=1000))

    for name in VIEWS:
        view = settings.views[name]
        names = feature_names(view)
        entities = entities_in(namespace_a, name)
        assert entities and entities == entities_in(namespace_b, name), f"{name}: different entities online"
        a = read_online(client, namespace_a, name, names, entities)
        b = read_online(client, namespace_b, name, names, entities)
        for left, right in zip(a, b):
            assert left["event_time"] == right["event_time"], (name, left, right)
            for n in names:
                x, y = left[n], right[n]
                assert x == y or (isinstance(x, float) and abs(x - y) < 1e-6 * max(1.0, abs(x))), (name, n, x, y)
        checked += len(entities)
    return checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--count", type=int, default=200_000, help="transactions to generate")
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    tx, lb = f"bench_ft_tx_{run_id.lower()}", f"bench_ft_lb_{run_id.lower()}"
    root = PROJECT_ROOT / ".local" / "bench" / f"features-{run_id}"
    base = settings_from_args(args)
    spark_namespace, baseline_namespace = f"bench-spark-{run_id}", f"bench-python-{run_id}"
    overrides = deep_merge(parse_overrides(args.set), {
        "kafka": {"topics": {tx: {"contract": "transactions", "partitions": args.partitions, "replication_factor": 1},
                             lb: {"contract": "labels", "partitions": args.partitions, "replication_factor": 1}}},
        "ingest": {"topics": [tx, lb], "max_offsets_per_trigger": 500_000},
        "storage": {"root": str(root / "lake")},
        "redis": {"namespace": spark_namespace},
    })
    settings = load_settings(base.env, args.conf_dir, overrides)
    ensure_topics(settings.kafka.client_properties(), [
        TopicSpec(t, args.partitions, 1) for t in (tx, lb, settings.kafka.dlq_topic_for(tx), settings.kafka.dlq_topic_for(lb))])

    # Clean, in order per entity: both paths must compute exactly the same features.
    spec = GeneratorSpec(count=args.count, accounts=args.accounts, seed=3, late_rate=0.0, out_of_order_rate=0.0,
                         duplicate_rate=0.0, bad_rate=0.0, label_rate=0.3, label_delay=(timedelta(hours=1), timedelta(days=1)))
    sent = produce(generate(spec), settings.kafka.client_properties(), topic_names={"transactions": tx, "labels": lb})
    records = sent.sent(tx) + sent.sent(lb)
    log.info("produced %d transactions and %d labels", sent.sent(tx), sent.sent(lb))
    results: dict = {"run": run_id, "count": args.count, "accounts": args.accounts, "records": records,
                     "transactions": sent.sent(tx), "labels": sent.sent(lb), "partitions": args.partitions,
                     "views": list(VIEWS),
                     "machine": {"cpus": os.cpu_count(), "python": host.python_version(), "system": host.platform()}}

    results["baseline"] = baseline(settings, {"transactions": tx, "labels": lb}, records, baseline_namespace)
    log.info("baseline: %s", results["baseline"])

    from pipelines.core.session import build_session

    started = time.monotonic()
    spark = build_session(settings.spark)
    results["spark_session_start_seconds"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    run_ingest(spark, settings, available_now=True)
    ingest_seconds = time.monotonic() - started
    started = time.monotonic()
    run_features(spark, settings, [settings.views[name] for name in VIEWS], available_now=True)
    feature_seconds = time.monotonic() - started
    feature_rows = sum(spark.read.format("delta").load(settings.storage.feature_path(name)).count() for name in VIEWS)
    assert feature_rows == results["baseline"]["feature_rows"], (feature_rows, results["baseline"]["feature_rows"])
    results["spark_ingest"] = {"seconds": round(ingest_seconds, 2), "events_per_second": round(records / ingest_seconds)}
    results["spark_features"] = {"seconds": round(feature_seconds, 2), "events_per_second": round(records / feature_seconds),
                                 "feature_rows": feature_rows}
    total = ingest_seconds + feature_seconds
    results["spark_total"] = {"seconds": round(total, 2), "events_per_second": round(records / total)}
    results["entities_compared"] = compare_online(settings, spark_namespace, baseline_namespace)
    log.info("spark: ingest %.1fs, features %.1fs; %d entities equal in Redis", ingest_seconds, feature_seconds,
             results["entities_compared"])

    client = redis_client(settings.redis)
    for namespace in (spark_namespace, baseline_namespace):
        for key in client.scan_iter(f"{namespace}:*", count=1000):
            client.unlink(key)
    out = PROJECT_ROOT / "bench" / "results" / f"features-{run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    rate = results["baseline"]["events_per_second"]
    print(f"\n{records:,} records ({sent.sent(tx):,} transactions, {sent.sent(lb):,} labels), "
          f"{args.accounts:,} accounts, views {', '.join(VIEWS)}\n")
    print("| path | seconds | events/s | vs baseline |\n|---|---|---|---|")
    for key, label in (("baseline", "Python consumer, per-entity lists, pipelined Redis (baseline)"),
                       ("spark_features", "feature stream over bronze (transformWithState, Delta + Redis)"),
                       ("spark_ingest", "ingest to bronze (validate, dedupe, Delta)"),
                       ("spark_total", "ingest + feature stream")):
        r = results[key]
        print(f"| {label} | {r['seconds']} | {r['events_per_second']:,} | {r['events_per_second'] / rate:.2f}x |")
    print(f"\nRedis equal for {results['entities_compared']:,} entities. results: {out}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
