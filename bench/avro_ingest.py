"""Avro vs JSON ingest on the same events, and a single-process Avro consumer, in one run.

The same generated transactions (same seed: the same events, 1% duplicate deliveries, no bad
records) go to two fresh topics, once as JSON and once as Confluent-framed Avro (the contract's
schema registered in the local registry, serialized with confluent-kafka's AvroSerializer).
Then, one after the other:

1. **ingest, JSON**: the real ingest query (Arrow UDF validation), ``availableNow``;
2. **ingest, Avro**: the real ingest query (wire header split and ``from_avro`` in the JVM,
   contract rules as Spark expressions), ``availableNow``;
3. **baseline**: one Python process, confluent-kafka ``Consumer`` + ``AvroDeserializer`` (schema
   looked up in the registry, cached), duplicates dropped with a set, valid rows to Parquet with
   pyarrow (no Delta, no checkpoint, no exactly-once).

Spark runs are timed from query start to end (session start-up reported apart); both ingests
are checked to write exactly the expected bronze rows. Results go to
``bench/results/avro-ingest-<time>.json`` and a Markdown table on stdout.

Usage: python bench/avro_ingest.py --env local [--count 500000] [--partitions 4]
(the platform with its registry must be up: ``make up``)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as host
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

# The same query timing and consumer as the JSON ingest benchmark (bench/ is on sys.path when
# the script runs).
from ingest_throughput import bench_consumer, spark_ingest

from pipelines.contracts.registry import SchemaRegistry, register_subject
from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args
from pipelines.core.config import deep_merge, parse_overrides
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.local.generator import AvroEncoder, GeneratorSpec, generate, produce

log = logging.getLogger("bench")


def avro_conf(source: Path, dest: Path) -> Path:
    """A copy of the conf folder whose transactions contract is Avro."""
    shutil.copytree(source, dest)
    path = dest / "contracts" / "transactions.yaml"
    contract = yaml.safe_load(path.read_text())
    contract["format"] = "avro"
    path.write_text(yaml.safe_dump(contract, sort_keys=False))
    return dest


def baseline(settings, topic: str, expected: int, out: Path) -> dict:
    """One process: consume, AvroDeserializer, drop duplicates, Parquet."""
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    contract = settings.contract_for(topic)
    deserialize = AvroDeserializer(SchemaRegistry(settings.schema_registry).client)
    context = SerializationContext(topic, MessageField.VALUE)
    consumer = bench_consumer(settings, topic)
    names = contract.field_names
    columns: dict[str, list] = {n: [] for n in names}
    seen: set[str] = set()
    read = files = 0
    out.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        nonlocal files
        if columns[names[0]]:
            pq.write_table(pa.table(columns), out / f"valid-{files:05d}.parquet")
            files += 1
            for column in columns.values():
                column.clear()

    started = time.monotonic()
    while read < expected:
        messages = consumer.consume(10_000, timeout=5)
        if not messages and time.monotonic() - started > 600:
            raise RuntimeError(f"baseline stalled at {read} of {expected}")
        for message in messages:
            if message.error():
                raise RuntimeError(message.error())
            read += 1
            event = deserialize(message.value(), context)
            event_id = event[contract.id_field]
            if event_id in seen:
                continue
            seen.add(event_id)
            for name in names:
                columns[name].append(event[name])
        if len(columns[names[0]]) >= 100_000:
            flush()
    flush()
    elapsed = time.monotonic() - started
    consumer.close()
    return {"records": read, "seconds": round(elapsed, 2), "events_per_second": round(read / elapsed),
            "valid": len(seen)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--count", type=int, default=500_000, help="transactions to generate")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-offsets-per-trigger", type=int, default=250_000)
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    root = PROJECT_ROOT / ".local" / "bench" / f"avro-{run_id}"
    base = settings_from_args(args)
    conf_dir = Path(args.conf_dir) if args.conf_dir else PROJECT_ROOT / "conf"
    scratch = Path(tempfile.mkdtemp(prefix="bench-avro-conf-"))
    topics = {"json": f"bench_json_{run_id.lower()}", "avro": f"bench_avro_{run_id.lower()}"}
    settings = {}
    for kind, topic in topics.items():
        overrides = deep_merge(parse_overrides(args.set), {
            "kafka": {"topics": {topic: {"contract": "transactions", "partitions": args.partitions,
                                         "replication_factor": 1}}},
            "ingest": {"topics": [topic], "max_offsets_per_trigger": args.max_offsets_per_trigger},
            "storage": {"root": str(root / kind)},
        })
        source = avro_conf(conf_dir, scratch / "avro") if kind == "avro" else conf_dir
        settings[kind] = load_settings(base.env, source, overrides)
        ensure_topics(settings[kind].kafka.client_properties(),
                      [TopicSpec(topic, args.partitions, 1),
                       TopicSpec(settings[kind].kafka.dlq_topic_for(topic), args.partitions, 1)])
    register_subject(SchemaRegistry(settings["avro"].schema_registry), settings["avro"], topics["avro"])

    common = dict(count=args.count, seed=1, label_rate=0.0, bad_rate=0.0, duplicate_rate=0.01)
    started = time.monotonic()
    sent_json = produce(generate(GeneratorSpec(**common)), settings["json"].kafka.client_properties(),
                        topic_names={"transactions": topics["json"]})
    produced_json = time.monotonic() - started
    encoder = AvroEncoder(settings["avro"].schema_registry,
                          {"transactions": settings["avro"].contract_for(topics["avro"])},
                          {"transactions": topics["avro"]})
    started = time.monotonic()
    sent_avro = produce(generate(GeneratorSpec(**common, avro_topics=frozenset({"transactions"}))),
                        settings["avro"].kafka.client_properties(), topic_names={"transactions": topics["avro"]},
                        encoder=encoder)
    produced_avro = time.monotonic() - started
    records = sent_json.sent(topics["json"])
    assert records == sent_avro.sent(topics["avro"])
    expected = sent_json.expected_bronze(topics["json"])
    log.info("produced %d records: JSON in %.1fs, Avro in %.1fs", records, produced_json, produced_avro)

    from pipelines.core.session import build_session

    results: dict = {"run": run_id, "count": args.count, "records": records, "partitions": args.partitions,
                     "max_offsets_per_trigger": args.max_offsets_per_trigger,
                     "produce_seconds": {"json": round(produced_json, 1), "avro": round(produced_avro, 1)},
                     "machine": {"cpus": os.cpu_count(), "python": host.python_version(), "system": host.platform()}}
    started = time.monotonic()
    spark = build_session(settings["json"].spark)
    results["spark_session_start_seconds"] = round(time.monotonic() - started, 1)
    for kind in ("json", "avro"):
        results[f"ingest_{kind}"] = spark_ingest(spark, settings[kind], topics[kind], records)
        log.info("ingest %s: %s", kind, results[f"ingest_{kind}"])
        assert results[f"ingest_{kind}"]["bronze"] == expected, f"{kind}: bronze rows differ from {expected}"
    results["baseline"] = baseline(settings["avro"], topics["avro"], records, root / "baseline")
    assert results["baseline"]["valid"] == expected
    log.info("baseline: %s", results["baseline"])

    out = PROJECT_ROOT / "bench" / "results" / f"avro-ingest-{run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("\n| path | records | seconds | events/s | steady state events/s | vs JSON ingest |\n|---|---|---|---|---|---|")
    json_rate = results["ingest_json"]["events_per_second"]
    for key, label in (("ingest_json", "ingest, JSON (Arrow UDF validation)"),
                       ("ingest_avro", "ingest, Avro (from_avro in the JVM)"),
                       ("baseline", "Python consumer + AvroDeserializer -> Parquet")):
        r = results[key]
        steady = r.get("steady_state_events_per_second")
        print(f"| {label} | {r['records']:,} | {r['seconds']} | {r['events_per_second']:,} | "
              f"{f'{steady:,}' if steady else '-'} | {r['events_per_second'] / json_rate:.2f}x |")
    print(f"\nresults: {out}")
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
