"""Batch jobs: backfill throughput against the streaming job on the same events, and the late
recompute of one day of a 30-day table against recomputing all 30 days.

1. **throughput** (``--part throughput``): clean transactions (no late, duplicate or bad
   records) through Kafka; the ingest writes bronze. Then, for the transaction views
   ``account_velocity`` (trailing), ``merchant_hourly`` (sliding) and ``account_sessions``
   (session), timed one after the other:
   * the feature stream over bronze (``availableNow``: one query per view, as ``fp-features``);
   * a backfill of the same days from bronze (``fp-backfill --source bronze``);
   * a backfill from a Kafka replay (validation and duplicate filter included), against
     ingest + feature stream.
   Each backfill's rows are checked equal to the stream's (time travel, ``computed_at`` aside).
2. **late** (``--part late``): a 30-day bronze table written directly (``--per-day`` events a
   day, one ingest batch), its three feature tables built by a 30-day backfill (the full
   recompute, timed), a first late-recompute run (the cursor), then ``--late`` late events on
   day 15 arrive in a new ingest batch and the late recompute runs (timed).

Results go to ``bench/results/backfill-<time>.json`` and tables on stdout.

Usage: python bench/backfill.py --env local [--part all|throughput|late] [--count 100000] [--per-day 10000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as host
import shutil
import time
from datetime import date, datetime, timedelta, timezone

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.batch.backfill import DayRange, backfill
from pipelines.batch.late import recompute_late
from pipelines.batch.sources import BronzeSnapshot, KafkaReplay
from pipelines.contracts.validation import ValidationRules
from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args
from pipelines.core.config import deep_merge, parse_overrides
from pipelines.core.delta import ensure_delta_table
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.features.stream import run_features
from pipelines.ingest.bronze import table_schemas
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from pipelines.online.store import redis_client

log = logging.getLogger("bench")
VIEWS = ("account_velocity", "merchant_hourly", "account_sessions")


def bench_settings(args, run_id: str, part: str):
    tx, lb = f"bench_bf_tx_{part}_{run_id.lower()}", f"bench_bf_lb_{part}_{run_id.lower()}"
    root = PROJECT_ROOT / ".local" / "bench" / f"backfill-{part}-{run_id}"
    base = settings_from_args(args)
    overrides = deep_merge(parse_overrides(args.set), {
        "kafka": {"topics": {tx: {"contract": "transactions", "partitions": 4, "replication_factor": 1},
                             lb: {"contract": "labels", "partitions": 4, "replication_factor": 1}}},
        "ingest": {"topics": [tx, lb], "max_offsets_per_trigger": 500_000, "max_event_age": "40d"},
        "storage": {"root": str(root / "lake")},
        "redis": {"namespace": f"bench-backfill-{part}-{run_id}"},
    })
    return load_settings(base.env, args.conf_dir, overrides), root


def rounded(frame: DataFrame) -> DataFrame:
    """``computed_at`` dropped, doubles to 6 decimals: sums in another order differ in last bits."""
    return frame.drop("computed_at").select(*[
        F.round(c, 6).alias(c) if t == "double" else F.col(c) for c, t in frame.drop("computed_at").dtypes])


def same_rows(spark, path: str, version_a: int, version_b: int) -> bool:
    a = rounded(spark.read.format("delta").option("versionAsOf", version_a).load(path))
    b = rounded(spark.read.format("delta").option("versionAsOf", version_b).load(path))
    return a.exceptAll(b).count() == 0 and b.exceptAll(a).count() == 0


def table_version(spark, path: str) -> int:
    return spark.sql(f"DESCRIBE HISTORY delta.`{path}` LIMIT 1").collect()[0]["version"]


def throughput(spark, args, run_id: str) -> dict:
    settings, root = bench_settings(args, run_id, "tp")
    tx, lb = settings.ingest.topics
    ensure_topics(settings.kafka.client_properties(), [
        TopicSpec(t, 4, 1) for t in (tx, lb, settings.kafka.dlq_topic_for(tx), settings.kafka.dlq_topic_for(lb))])
    end = datetime.combine(datetime.now(timezone.utc).date(), datetime.min.time(), timezone.utc) - timedelta(hours=1)
    spec = GeneratorSpec(count=args.count, accounts=args.accounts, seed=11, end=end, span=timedelta(days=2),
                         late_rate=0.0, out_of_order_rate=0.0, duplicate_rate=0.0, bad_rate=0.0, label_rate=0.0)
    sent = produce(generate(spec), settings.kafka.client_properties(), topic_names={"transactions": tx, "labels": lb})
    events = sent.sent(tx)
    views = [settings.views[name] for name in VIEWS]
    days = DayRange((end - spec.span).date(), end.date() + timedelta(days=1))

    started = time.monotonic()
    run_ingest(spark, settings, available_now=True)
    ingest_seconds = time.monotonic() - started
    started = time.monotonic()
    run_features(spark, settings, views, available_now=True)
    stream_seconds = time.monotonic() - started
    paths = {v.name: settings.storage.feature_path(v.name) for v in views}
    streamed = {name: table_version(spark, path) for name, path in paths.items()}

    started = time.monotonic()
    from_bronze = backfill(spark, settings, views, [days], BronzeSnapshot())
    bronze_seconds = time.monotonic() - started
    bronze_versions = {name: table_version(spark, path) for name, path in paths.items()}
    started = time.monotonic()
    from_kafka = backfill(spark, settings, views, [days], KafkaReplay())
    kafka_seconds = time.monotonic() - started
    for name, path in paths.items():
        assert same_rows(spark, path, streamed[name], bronze_versions[name]), f"{name}: bronze backfill != stream"
        assert same_rows(spark, path, streamed[name], table_version(spark, path)), f"{name}: Kafka backfill != stream"
    rows = {o.view: o.rows for o in from_bronze}
    assert rows == {o.view: o.rows for o in from_kafka}
    shutil.rmtree(root, ignore_errors=True)

    def rate(seconds: float) -> dict:
        return {"seconds": round(seconds, 1), "events_per_second": round(events / seconds)}

    return {"events": events, "accounts": args.accounts, "days": str(days), "rows_per_view": rows,
            "stream_features": rate(stream_seconds), "backfill_bronze": rate(bronze_seconds),
            "ingest_plus_stream": rate(ingest_seconds + stream_seconds), "backfill_kafka": rate(kafka_seconds)}


def bronze_days(spark, settings, topic: str, first: date, days: int, per_day: int, ingested_at: datetime,
                seed: int, accounts: int, merchants: int) -> DataFrame:
    """``per_day`` synthetic valid transactions a day as bronze rows of one ingest batch."""
    contract = settings.contract_for(topic)
    bronze_schema, _ = table_schemas(spark, contract, ValidationRules.of(settings.ingest))
    start = datetime.combine(first, datetime.min.time(), timezone.utc)
    total, step = days * per_day, 86_400 / per_day
    rows = spark.range(total).select(
        F.concat(F.lit(f"tx-{seed}-"), F.col("id").cast("string")).alias("transaction_id"),
        F.format_string("acct-%06d", (F.hash("id", F.lit(seed)) % accounts + accounts) % accounts).alias("account_id"),
        F.format_string("merch-%05d", (F.hash(F.lit(seed), "id") % merchants + merchants) % merchants).alias("merchant_id"),
        F.round(F.rand(seed) * 200, 2).alias("amount_usd"),
        F.element_at(F.array(*[F.lit(c) for c in ("5411", "5812", "6011", "5999")]),
                     (F.col("id") % 4 + 1).cast("int")).alias("merchant_category_code"),
        F.round(F.rand(seed + 1) * 5000, 2).alias("balance_usd"),
        F.lit(None).cast("string").alias("device_fingerprint"),
        (F.lit(start) + F.make_dt_interval(secs=F.col("id") * step)).alias("event_time"),
        F.lit(topic).alias("kafka_topic"), (F.col("id") % 4).cast("int").alias("kafka_partition"),
        F.col("id").alias("kafka_offset"), F.lit(ingested_at).alias("kafka_timestamp"),
        F.lit(None).cast(bronze_schema["kafka_headers"].dataType).alias("kafka_headers"),
        F.lit(ingested_at).alias("ingested_at"),
    ).withColumn("event_date", F.to_date("event_time"))
    return rows.select(*bronze_schema.fieldNames())


def late_recompute(spark, args, run_id: str) -> dict:
    settings, root = bench_settings(args, run_id, "late")
    tx = settings.ingest.topics[0]
    views = [settings.views[name] for name in VIEWS]
    bronze_path = settings.storage.bronze_path(tx)
    today = datetime.now(timezone.utc).date()
    first = today - timedelta(days=31)
    month = DayRange(first, first + timedelta(days=30))
    bronze_schema, _ = table_schemas(spark, settings.contract_for(tx), ValidationRules.of(settings.ingest))
    ensure_delta_table(spark, bronze_path, bronze_schema, ["event_date"])
    t0 = datetime.now(timezone.utc) - timedelta(hours=1)
    bronze_days(spark, settings, tx, first, 30, args.per_day, t0, 1, args.accounts, 500) \
        .write.format("delta").mode("append").save(bronze_path)

    started = time.monotonic()
    full = backfill(spark, settings, views, [month], BronzeSnapshot())
    full_seconds = time.monotonic() - started
    started = time.monotonic()
    baseline_run = recompute_late(spark, settings, views)
    cursor_seconds = time.monotonic() - started
    assert all(o.late_events == 0 for o in baseline_run)

    # The late batch: events of day 15 arriving now, long after the stream passed that day.
    late_day = first + timedelta(days=14)
    bronze_days(spark, settings, tx, late_day, 1, args.late, datetime.now(timezone.utc), 2, args.accounts, 500) \
        .write.format("delta").mode("append").save(bronze_path)
    started = time.monotonic()
    late_run = recompute_late(spark, settings, views)
    late_seconds = time.monotonic() - started
    assert all(o.late_events == args.late for o in late_run), [o.late_events for o in late_run]

    client = redis_client(settings.redis)
    for key in client.scan_iter(f"{settings.redis.namespace}:*", count=1000):
        client.unlink(key)
    shutil.rmtree(root, ignore_errors=True)
    return {"events": 30 * args.per_day, "late_events": args.late, "late_day": str(late_day),
            "full_30_days": {"seconds": round(full_seconds, 1), "rows": {o.view: o.rows for o in full}},
            "first_late_run_cursor": {"seconds": round(cursor_seconds, 1)},
            "late_recompute": {"seconds": round(late_seconds, 1),
                               "days": {o.view: [str(d) for d in o.days] for o in late_run},
                               "rows": {o.view: o.rows_written for o in late_run},
                               "online_restated": {o.view: o.online_restated for o in late_run}}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--part", choices=("all", "throughput", "late"), default="all")
    parser.add_argument("--count", type=int, default=100_000, help="throughput: transactions over 2 days")
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--per-day", type=int, default=10_000, help="late: events a day in the 30-day table")
    parser.add_argument("--late", type=int, default=200, help="late: late events on day 15")
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    from pipelines.core.session import build_session

    spark = build_session(settings_from_args(args).spark)
    results: dict = {"run": run_id, "machine": {"cpus": os.cpu_count(), "python": host.python_version(),
                                                "system": host.platform()}}
    if args.part in ("all", "throughput"):
        results["throughput"] = throughput(spark, args, run_id)
    if args.part in ("all", "late"):
        results["late"] = late_recompute(spark, args, run_id)
    out = PROJECT_ROOT / "bench" / "results" / f"backfill-{run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if "throughput" in results:
        r = results["throughput"]
        print(f"\n{r['events']:,} transactions over {r['days']}, views {', '.join(VIEWS)}\n")
        print("| path | seconds | events/s | vs stream |\n|---|---|---|---|")
        for key, label, against in (
                ("stream_features", "feature stream over bronze (availableNow)", "stream_features"),
                ("backfill_bronze", "backfill from bronze", "stream_features"),
                ("ingest_plus_stream", "ingest + feature stream", "ingest_plus_stream"),
                ("backfill_kafka", "backfill from a Kafka replay", "ingest_plus_stream")):
            row, base = r[key], r[against]
            print(f"| {label} | {row['seconds']} | {row['events_per_second']:,} | "
                  f"{row['events_per_second'] / base['events_per_second']:.2f}x |")
    if "late" in results:
        r = results["late"]
        print(f"\n30-day table, {r['events']:,} events; {r['late_events']} late events on {r['late_day']}\n")
        print("| run | seconds |\n|---|---|")
        print(f"| full recompute, 30 days, 3 views | {r['full_30_days']['seconds']} |")
        print(f"| late recompute (days {r['late_recompute']['days']}) | {r['late_recompute']['seconds']} |")
        print(f"| late recompute's first run (cursor over all 30 days, nothing late) | "
              f"{r['first_late_run_cursor']['seconds']} |")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
