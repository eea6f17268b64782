"""The live views' Redis cost per batch: server CPU and append-only-file bytes, per view.

Applies synthetic batches of valid events (``--batch`` events each, event times advancing one
second per batch, up to 3 s out of order; ``--accounts`` accounts, ``--merchants`` merchants)
with :class:`pipelines.online.live_consumer.LiveViews`, the live path's own code, one view at
a time, to the Redis of ``--env`` under a fresh namespace of its own (deleted after). Per
batch after the first third (the windows fill up): the server's CPU (``INFO cpu``), the
scripts' time (``INFO commandstats``, ``evalsha``), the growth of the append-only file (``INFO
persistence``: every write of a script is appended to it) and the client's wall time; medians
are reported. ``--windows bench`` shortens the windowed views as ``bench/feature_latency.py``
does (1 min every 20 s, 1 s sessions), ``conf`` keeps the conf's (``merchant_hourly``: 1 h every
15 min, so its windows fill for the whole run and its distinct accounts grow).

The Redis must be otherwise idle (CPU and AOF growth are the server's). Results go to
``bench/results/live-views-<time>.json`` and a Markdown table on stdout.

Usage: python bench/live_views_redis.py --env local [--batches 60] [--windows bench|conf]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as host
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from feature_latency import bench_conf

from pipelines.contracts.spark_schema import spark_type
from pipelines.core.cli import add_settings_arguments, configure_logging
from pipelines.core.config import parse_overrides
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.online.live_consumer import LiveViews
from pipelines.online.live_metrics import LiveMetrics
from pipelines.online.store import redis_client

log = logging.getLogger("bench.live_views_redis")

VIEWS = ("account_velocity", "merchant_hourly", "account_sessions")


def batches(count: int, size: int, accounts: int, merchants: int, columns: list[str], seed: int):
    """``count`` batches in :meth:`LiveViews.apply`'s shape."""
    rng = random.Random(seed)
    now = 1_795_000_000_000_000
    for _ in range(count):
        data: dict[str, list] = {name: [] for name in ("_append_micros", "_event_micros", "_event_id", *columns)}
        for _ in range(size):
            now += 1_000_000 // size
            event = {"account_id": f"acct-{rng.randrange(accounts):06d}", "merchant_id": f"merch-{rng.randrange(merchants):05d}",
                     "amount_usd": round(rng.uniform(1, 500), 2), "merchant_category_code": rng.choice(["5411", "5812", "6011"]),
                     "balance_usd": round(rng.uniform(0, 5000), 2)}
            data["_append_micros"].append(now)
            data["_event_micros"].append(now - rng.randrange(0, 3_000_000))
            data["_event_id"].append(str(uuid.UUID(int=rng.getrandbits(128), version=4)))
            for column in columns:
                data[column].append(event[column])
        yield data


def server_counters(client) -> dict[str, float]:
    """Redis's CPU (ms), its scripts' time (ms) and its append-only file's size (KB) so far."""
    cpu = client.info("cpu")
    return {"redis_cpu_ms": 1000 * (cpu["used_cpu_user"] + cpu["used_cpu_sys"]),
            "evalsha_ms": client.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0) / 1000,
            "aof_kb": client.info("persistence").get("aof_current_size", 0) / 1024}


def measure(client, settings, view_name: str, args) -> dict:
    namespace = f"bench-live-views-{uuid.uuid4().hex[:8]}"
    types = {f.name: spark_type(f).simpleString() for f in settings.contract_for("transactions").fields}
    live = LiveViews(client, namespace, [settings.views[view_name]], types, LiveMetrics("bench", 1e9))
    samples: dict[str, list[float]] = {"redis_cpu_ms": [], "evalsha_ms": [], "aof_kb": [], "wall_ms": []}
    try:
        for batch_id, data in enumerate(batches(args.batches, args.batch, args.accounts, args.merchants, live.columns, 7)):
            before = server_counters(client)
            started = time.perf_counter()
            live.apply(batch_id, data)
            wall = time.perf_counter() - started
            if batch_id < args.batches // 3:
                continue
            for name, value in server_counters(client).items():
                samples[name].append(value - before[name])
            samples["wall_ms"].append(1000 * wall)
        memory = client.info("memory")["used_memory"]
    finally:
        for key in client.scan_iter(f"{namespace}:*", count=1000):
            client.unlink(key)
    result = {name: round(statistics.median(values), 1) for name, values in samples.items()}
    result["used_memory_mb"] = round(memory / 2**20, 1)
    log.info("%s: %s", view_name, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--views", default=",".join(VIEWS))
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1000, help="events per batch (one second of event time)")
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--windows", choices=("bench", "conf"), default="bench")
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    conf_dir = Path(args.conf_dir) if args.conf_dir else PROJECT_ROOT / "conf"
    if args.windows == "bench":
        conf_dir = bench_conf(conf_dir, Path(tempfile.mkdtemp(prefix="live-views-")) / "conf")
    settings = load_settings(args.env, conf_dir, parse_overrides(args.set))
    client = redis_client(settings.redis)
    if not client.info("persistence").get("aof_enabled"):
        log.warning("the append-only file is off on this Redis: its growth reads 0")
    results = {view: measure(client, settings, view, args) for view in args.views.split(",")}
    run = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = PROJECT_ROOT / "bench" / "results" / f"live-views-{run}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run, "args": vars(args), "views": results,
                               "machine": {"cpus": os.cpu_count(), "python": host.python_version()}}, indent=2))
    print(f"\nper batch of {args.batch:,} events, medians ({args.windows} windows)\n")
    print("| view | Redis CPU ms | scripts ms | AOF KB | client wall ms | Redis memory MB |\n|---|---|---|---|---|---|")
    for view, r in results.items():
        print(f"| {view} | {r['redis_cpu_ms']} | {r['evalsha_ms']} | {r['aof_kb']:.0f} | {r['wall_ms']} | {r['used_memory_mb']} |")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
