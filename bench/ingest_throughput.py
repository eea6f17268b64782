"""Ingest throughput: the same events, three ways, in one run on the local platform.

1. **baseline**: one Python process with confluent-kafka: ``json`` parse and the contract
   checks of ``bench/python_validation.py`` (held to the same verdicts as the ingest's Spark SQL
   checks by a test), duplicates dropped with a set, valid rows and dead letters written to
   Parquet with pyarrow (no Delta, no exactly-once, no checkpoint).
2. **spark-copy**: Spark Kafka -> Delta copying the raw records (no parsing): the ceiling of
   Spark + Delta on this machine.
3. **ingest**: the real ingest query (validate, dedupe with state, bronze + dead letter in
   ``foreachBatch`` with transaction ids, metrics listener), ``availableNow``.

Each Spark run is timed from query start to its end (session start-up excluded, reported
apart). Results go to ``bench/results/ingest-<time>.json`` and a Markdown table on stdout.

Usage: python bench/ingest_throughput.py --env local [--count 1000000] [--partitions 4]
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
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# The baseline's Python validator, held to the ingest's verdicts by test_validation_parity
# (bench/ is on sys.path when a benchmark runs as a script).
from python_validation import RecordValidator

from pipelines.contracts.validation import ValidationRules
from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args
from pipelines.core.config import deep_merge, parse_overrides
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce

log = logging.getLogger("bench")


def bench_consumer(settings, topic: str):
    """A confluent-kafka consumer of ``topic`` from its start, in a group of its own, with large
    fetches (the baselines' reader)."""
    from confluent_kafka import Consumer

    consumer = Consumer({
        **settings.kafka.client_properties(), "group.id": f"bench-{time.time_ns()}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
        "fetch.max.bytes": 52428800, "max.partition.fetch.bytes": 10485760,
    })
    consumer.subscribe([topic])
    return consumer


def baseline(settings, topic: str, expected: int, out: Path) -> dict:
    """Single-process consumer doing the same parse + validation, Parquet instead of Delta."""
    contract = settings.contract_for(topic)
    validator = RecordValidator(contract, ValidationRules.of(settings.ingest))
    consumer = bench_consumer(settings, topic)
    names = contract.field_names
    seen: set[str] = set()
    valid_cols: dict[str, list] = {n: [] for n in names}
    dead: list[tuple] = []
    read = duplicates = files = 0
    out.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        nonlocal files
        if valid_cols[names[0]]:
            pq.write_table(pa.table(valid_cols), out / f"valid-{files:05d}.parquet")
            files += 1
            for column in valid_cols.values():
                column.clear()
        if dead:
            pq.write_table(pa.table(list(zip(*dead)), names=["partition", "offset", "value", "error_class", "error_reason"]),
                           out / f"dead-{files:05d}.parquet")
            files += 1
            dead.clear()

    started = time.monotonic()
    while read < expected:
        messages = consumer.consume(10_000, timeout=5)
        if not messages and time.monotonic() - started > 600:
            raise RuntimeError(f"baseline stalled at {read} of {expected}")
        batch_time = datetime.now(timezone.utc)
        for message in messages:
            if message.error():
                raise RuntimeError(message.error())
            read += 1
            verdict = validator.validate(message.value(), batch_time)
            if verdict.error_class:
                dead.append((message.partition(), message.offset(), message.value(), verdict.error_class, verdict.reason))
                continue
            event_id = verdict.values[contract.id_field]
            if event_id in seen:
                duplicates += 1
                continue
            seen.add(event_id)
            for name in names:
                valid_cols[name].append(verdict.values[name])
        if len(valid_cols[names[0]]) >= 100_000:
            flush()
    flush()
    elapsed = time.monotonic() - started
    consumer.close()
    return {"records": read, "seconds": round(elapsed, 2), "events_per_second": round(read / elapsed),
            "valid": len(seen), "duplicates": duplicates}


def spark_copy(spark, settings, topic: str, records: int, root: str) -> dict:
    """Kafka -> Delta, raw records, no parsing: the Spark + Delta ceiling."""
    from pipelines.ingest.sources import read_kafka_stream

    stream = read_kafka_stream(spark, settings.kafka, topic, settings.ingest)
    started = time.monotonic()
    query = (stream.writeStream.format("delta").option("checkpointLocation", f"{root}/_checkpoints/copy")
             .trigger(availableNow=True).start(f"{root}/copy"))
    query.awaitTermination()
    elapsed = time.monotonic() - started
    written = spark.read.format("delta").load(f"{root}/copy").count()
    assert written == records, f"copy wrote {written} of {records}"
    return {"records": records, "seconds": round(elapsed, 2), "events_per_second": round(records / elapsed)}


def spark_ingest(spark, settings, topic: str, records: int) -> dict:
    started = time.monotonic()
    run_ingest(spark, settings, topics=[topic], available_now=True)
    elapsed = time.monotonic() - started
    bronze = spark.read.format("delta").load(settings.storage.bronze_path(topic)).count()
    dead = spark.read.format("delta").load(settings.storage.dead_letter_path).count()
    # Steady state: full batches after the first (which pays JVM warm-up and Python worker start).
    full = [r for r in spark.read.format("delta").load(settings.storage.stream_metrics_path).collect()
            if r.batch_id > 0 and r.input_rows >= 0.99 * settings.ingest.max_offsets_per_trigger]
    steady = round(sum(r.input_rows for r in full) / (sum(r.batch_duration_ms for r in full) / 1000)) if full else None
    return {"records": records, "seconds": round(elapsed, 2), "events_per_second": round(records / elapsed),
            "steady_state_events_per_second": steady, "steady_state_batches": len(full),
            "bronze": bronze, "dead_letters": dead, "duplicates": records - bronze - dead}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--count", type=int, default=1_000_000, help="transactions to generate")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-offsets-per-trigger", type=int, default=250_000)
    parser.add_argument("--only", choices=["baseline", "copy", "ingest"], action="append",
                        help="run only these (default: all)")
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    for name in ("pipelines.ingest.sinks", "pipelines.progress"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    topic = f"bench_tx_{run_id.lower()}"
    root = PROJECT_ROOT / ".local" / "bench" / run_id
    base = settings_from_args(args)
    overrides = deep_merge(parse_overrides(args.set), {
        "kafka": {"topics": {topic: {"contract": "transactions", "partitions": args.partitions, "replication_factor": 1}}},
        # The labels topic keeps the labels views computable (every view needs its topic).
        "ingest": {"topics": [topic, "labels"], "max_offsets_per_trigger": args.max_offsets_per_trigger,
                   "publish_dlq_topic": True},
        "storage": {"root": str(root / "lake")},
    })
    settings = load_settings(base.env, args.conf_dir, overrides)
    ensure_topics(settings.kafka.client_properties(),
                  [TopicSpec(topic, args.partitions, 1), TopicSpec(settings.kafka.dlq_topic_for(topic), args.partitions, 1)])

    spec = GeneratorSpec(count=args.count, seed=1, label_rate=0.0, bad_rate=0.02, duplicate_rate=0.01)
    started = time.monotonic()
    sent = produce(generate(spec), settings.kafka.client_properties(), topic_names={"transactions": topic})
    records = sent.sent(topic)
    log.info("produced %d records in %.1fs", records, time.monotonic() - started)

    only = set(args.only or ["baseline", "copy", "ingest"])
    results: dict = {"run": run_id, "count": args.count, "records": records, "partitions": args.partitions,
                     "max_offsets_per_trigger": args.max_offsets_per_trigger,
                     "machine": {"cpus": os.cpu_count(), "python": host.python_version(), "system": host.platform()}}
    if "baseline" in only:
        results["baseline"] = baseline(settings, topic, records, root / "baseline")
        log.info("baseline: %s", results["baseline"])
    if only & {"copy", "ingest"}:
        from pipelines.core.session import build_session

        started = time.monotonic()
        spark = build_session(settings.spark)
        results["spark_session_start_seconds"] = round(time.monotonic() - started, 1)
        if "copy" in only:
            results["spark_copy"] = spark_copy(spark, settings, topic, records, str(root / "lake"))
            log.info("spark copy: %s", results["spark_copy"])
        if "ingest" in only:
            results["ingest"] = spark_ingest(spark, settings, topic, records)
            log.info("ingest: %s", results["ingest"])
            expected = (sent.expected_bronze(topic), sum(sent.expected_dead_letters(topic).values()))
            got = (results["ingest"]["bronze"], results["ingest"]["dead_letters"])
            assert got == expected, f"ingest wrote {got}, expected {expected}"

    out = PROJECT_ROOT / "bench" / "results" / f"ingest-{run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("\n| path | records | seconds | events/s | vs baseline |\n|---|---|---|---|---|")
    base_rate = results.get("baseline", {}).get("events_per_second")
    for key, label in (("baseline", "Python consumer -> Parquet (baseline)"), ("spark_copy", "Spark Kafka -> Delta, raw copy"),
                       ("ingest", "ingest: validate + dedupe + bronze/DLQ, exactly once")):
        if key in results:
            r = results[key]
            ratio = f"{r['events_per_second'] / base_rate:.2f}x" if base_rate else "-"
            print(f"| {label} | {r['records']:,} | {r['seconds']} | {r['events_per_second']:,} | {ratio} |")
    if results.get("ingest", {}).get("steady_state_events_per_second") and base_rate:
        steady = results["ingest"]["steady_state_events_per_second"]
        print(f"| ingest, steady state ({results['ingest']['steady_state_batches']} full batches after the first) "
              f"| | | {steady:,} | {steady / base_rate:.2f}x |")
    print(f"\nresults: {out}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
