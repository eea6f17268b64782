"""Event-to-Redis latency of a trailing view at fixed input rates: the live path (``fp-live``)
and the durable bronze path (``fp-ingest`` + ``fp-features``), in the same run.

For each rate, events are produced at that rate for ``--seconds``, each stamped with its send
time as event time, into a fresh topic that both paths read, each writing its own Redis
namespace. A Redis keyspace subscriber per namespace notes the moment each online hash is
written and the event time it then holds. An event's latency is the time from its event time
(= send time) to the first write of its entity holding that event time or a later one. The
first ``--warmup`` seconds of events are left out. Reported as p50/p95/p99 per path and rate;
with ``--alone`` the live path is measured again with the durable path stopped.

The live path also serves the sliding and session views of the topic (``merchant_hourly``,
``account_sessions``), shortened in the run's copy of the conf (:data:`WINDOWED`) so that
windows close every few seconds. For each, the latency of a window is from the moment the
watermark passed its end (the send of the first event at or after end + allowed lateness) to
its first write in Redis.

Each path runs as it is deployed: ``fp-live`` (its real-time-mode validation stage and its
consumer), ``fp-ingest`` and ``fp-features`` are job processes of their own (each its own Spark
driver, ``local[2]``), started with ``--set`` overrides for the run's topic, lake and Redis
namespace; on this machine they share its two cores. ``--durable-nice`` lowers the durable
jobs' priority for the whole of their sessions (see :func:`lower_session_priority`). A durable
job that ends during a run (on two cores it can be starved at high rates) is logged and reported
in the bronze figures (``failed``: its exit and the events it wrote until then), and the live
path is still measured; the live job ending fails the run. The last line printed is JSON: ``{"online": {"1000": {"p50": ..., "p95": ..., "p99": ...},
...}, "bronze": {...}, "merchant_hourly": {...}, "account_sessions": {...}, and with
``--alone`` the same keys of the live path suffixed ``_alone``}`` (seconds).

Usage: python bench/feature_latency.py --env local [--rates 1000,5000] [--seconds 300] [--alone]
       [--durable-nice 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform as host
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import redis
import yaml

from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args
from pipelines.core.config import deep_merge, parse_overrides
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.core.times import micros, parse_duration
from pipelines.local.services import descendants
from pipelines.online.store import EVENT_TIME_FIELD, entity_from_key, redis_client

log = logging.getLogger("bench")
VIEW = "account_velocity"


def now_micros() -> int:
    return time.time_ns() // 1000


class OnlineWrites(threading.Thread):
    """Records every write of the view's hashes: (entity, when written, event time held)."""

    def __init__(self, client: redis.Redis, namespace: str, view: str = VIEW):
        super().__init__(daemon=True)
        self.client = client
        self.namespace, self.view = namespace, view
        self.prefix = f"{namespace}:{view}:"
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"__keyspace@{client.connection_pool.connection_kwargs.get('db', 0)}__:{self.prefix}*")
        self.writes: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            # Every notification already here, then one round trip for the values they wrote:
            # the listener keeps up under load, and the time noted is when the value was read
            # (never before it was written).
            keys = []
            while message is not None:
                if message["data"] == b"hset":
                    keys.append(message["channel"].decode().split(":", 1)[1])
                if len(keys) >= 1000:
                    break
                message = self.pubsub.get_message(timeout=0)
            if not keys:
                continue
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hget(key, EVENT_TIME_FIELD)
            held_values = pipe.execute()
            seen = now_micros()
            for key, held in zip(keys, held_values):
                if held is not None:
                    self.writes[entity_from_key(key, self.namespace, self.view)].append((seen, int(held)))

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.pubsub.close()


def produce_at_rate(settings, topic: str, rate: float, seconds: float, accounts: int, seed: int,
                    check: Callable[[], None] = lambda: None) -> list[tuple[str, int]]:
    """Send ``rate`` events per second for ``seconds``, each with event time = send time;
    ``check()`` once a second (it raises to end the run)."""
    from confluent_kafka import Producer

    producer = Producer({**settings.kafka.client_properties(), "enable.idempotence": True, "linger.ms": 5})
    rng = random.Random(seed)
    sent: list[tuple[str, int]] = []
    started = time.monotonic()
    total = int(rate * seconds)
    for n in range(total):
        if n % int(rate) == 0:
            check()
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
    # Writes in the order seen; the held event time only grows (newer wins). Each entity's
    # held times once, not once per event (that was quadratic: minutes at 5,000 events/s).
    # (A copy of the dict: the listener thread adds entities meanwhile; each list only grows.)
    held_by_entity = {entity: [h for _, h in history] for entity, history in dict(writes).items()}
    for account, event_micros in sent:
        history = writes.get(account, [])
        held = held_by_entity.get(account, [])
        i = bisect_left(held, event_micros)
        if i == len(held):
            missing += 1
            continue
        result.append((history[i][0] - event_micros) / 1e6)
    return result, missing


def window_latencies(writes: dict[str, list[tuple[int, int]]], lateness: int, since: int, until: int) -> list[float]:
    """Seconds from the moment the watermark passed each window's end (the send, = event time,
    of the first event at or after ``end + lateness``) to the first write of that window, for
    windows whose end + lateness falls in ``[since, until]``."""
    result = []
    for history in writes.values():
        first: dict[int, int] = {}
        for seen, held in history:
            first.setdefault(held, seen)
        result += [(seen - (end + lateness)) / 1e6 for end, seen in first.items() if since <= end + lateness <= until]
    return result


#: Windowed views measured beside the trailing one, shortened so that windows close every few
#: seconds at the bench's rates (their conf: the run's copy of conf/features/payments.yaml).
WINDOWED = {"merchant_hourly": {"window": "1m", "slide": "20s", "allowed_lateness": "5s"},
            "account_sessions": {"gap": "1s", "allowed_lateness": "5s"}}


def bench_conf(source: Path, dest: Path) -> Path:
    """A copy of the conf folder whose windowed payments views close within seconds."""
    shutil.copytree(source, dest)
    views_file = dest / "features" / "payments.yaml"
    document = yaml.safe_load(views_file.read_text())
    for view in document["views"]:
        view.update(WINDOWED.get(view["name"], {}))
    views_file.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return dest


def finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def overrides_for(args, run_id: str, rate: int, label: str) -> tuple[dict, Path]:
    """The run's own topic (2 partitions), lake and Redis namespaces, as config overrides."""
    topic = f"bench_lat_{run_id.lower()}_{label.replace('-', '_')}"
    root = PROJECT_ROOT / ".local" / "bench" / f"latency-{run_id}" / label
    overrides = deep_merge(parse_overrides(args.set), {
        "kafka": {"topics": {topic: {"contract": "transactions", "partitions": 2, "replication_factor": 1}}},
        # The labels topic keeps the labels views computable (every view needs its topic).
        "ingest": {"topics": [topic, "labels"], "trigger_interval": args.trigger, "starting_offsets": "earliest"},
        "features": {"trigger_interval": args.trigger},
        "live": {"starting_offsets": "earliest"},
        "storage": {"root": str(root / "lake")},
        "redis": {"namespace": f"bench-latency-{run_id}-{label}-live"},
    })
    return overrides, root


def set_arguments(overrides: dict, prefix: str = "") -> list[str]:
    """``--set`` arguments that rebuild ``overrides`` (leaves as JSON, which YAML reads)."""
    result = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            result += set_arguments(value, f"{prefix}{key}.")
        else:
            result += ["--set", f"{prefix}{key}={json.dumps(value)}"]
    return result


def lower_session_priority(pid: int, nice: int) -> bool:
    """Give the session of ``pid`` the niceness ``nice`` against other sessions too; False if
    the process is gone.

    With the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``), each
    session is a scheduling group with an equal share of the CPU, and a process's niceness only
    ranks it inside its group: a job started in a session of its own at ``nice 10`` still gets a
    full share against the live job's session. The group's own niceness is
    ``/proc/<pid>/autogroup``."""
    autogroup = Path(f"/proc/{pid}/autogroup")
    try:
        if autogroup.read_text().split()[-1] != str(nice):
            autogroup.write_text(str(nice))
            log.info("session of %d: %s", pid, autogroup.read_text().strip())
        return True
    except OSError:  # gone (or going)
        return False


class SessionPriority(threading.Thread):
    """Keeps every session of a job's process tree at one niceness: the job's Spark JVM runs
    in a session of its own (:func:`pipelines.core.session.launch_detached_gateway`), started
    seconds after the job, and it does the job's work. Before this, only the Python driver's
    session was lowered, and the durable JVMs kept a full share of the CPU."""

    def __init__(self, pid: int, nice: int):
        super().__init__(daemon=True)
        self.pid, self.nice = pid, nice
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(1.0) and lower_session_priority(self.pid, self.nice):
            for child in descendants(self.pid):
                lower_session_priority(child, self.nice)


class Job:
    """One job process (``python jobs/<name>.py``), in a process group of its own; output to a log."""

    def __init__(self, name: str, args: list[str], log_path: Path, nice: int = 0):
        self.name, self.log_path = name, log_path
        command = [sys.executable, str(PROJECT_ROOT / "jobs" / f"{name}.py"), *args]
        self.process = subprocess.Popen(["nice", "-n", str(nice), *command] if nice else command,
                                        stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.priority = None
        if nice:
            lower_session_priority(self.process.pid, nice)
            self.priority = SessionPriority(self.process.pid, nice)
            self.priority.start()

    def failure(self) -> str | None:
        """Why the job ended (its exit code and the end of its log), or None while it runs."""
        if self.process.poll() is None:
            return None
        tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
        return f"{self.name} exited with {self.process.returncode}:\n" + "\n".join(tail)

    def check(self) -> None:
        failure = self.failure()
        if failure:
            raise RuntimeError(failure)

    def stop(self) -> None:
        if self.priority is not None:
            self.priority.stopping.set()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # stops the queries between batches
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def wait_for_aof_rewrite(client: redis.Redis, timeout: float = 600.0) -> None:
    """Log Redis's dataset and wait for an append-only-file rewrite in progress to end: it
    forks and rewrites the whole dataset, and would weigh on the first minutes of a run."""
    memory = client.info("memory")["used_memory_human"]
    log.info("redis: %s keys, %s used", f"{client.dbsize():,}", memory)
    deadline = time.monotonic() + timeout
    while client.info("persistence").get("aof_rewrite_in_progress") and time.monotonic() < deadline:
        log.info("redis: waiting for its append-only-file rewrite to end")
        time.sleep(5)


def measure_rate(args, run_id: str, rate: int, durable: bool) -> dict[str, dict]:
    """Run ``fp-live`` (and, if ``durable``, ``fp-ingest`` + ``fp-features`` beside it) while
    producing at ``rate``; the latency figures of each path."""
    label = f"{rate}{'' if durable else '-alone'}"
    overrides, root = overrides_for(args, run_id, rate, label)
    root.mkdir(parents=True, exist_ok=True)
    conf_dir = bench_conf(Path(args.conf_dir) if args.conf_dir else PROJECT_ROOT / "conf", root / "conf")
    # Relative paths of the copy would resolve against the run's folder: keep the checkout's jars.
    jars_dir = load_settings(args.env, args.conf_dir, parse_overrides(args.set)).spark.jars_dir
    overrides = deep_merge(overrides, {"spark": {"jars_dir": jars_dir}} if jars_dir else {})
    live = load_settings(args.env, conf_dir, overrides)
    bronze_overrides = deep_merge(overrides, {"redis": {"namespace": f"bench-latency-{run_id}-{label}-bronze"}})
    bronze = load_settings(args.env, conf_dir, bronze_overrides)
    topic = live.ingest.topics[0]
    ensure_topics(live.kafka.client_properties(), [TopicSpec(topic, 2, 1), TopicSpec(live.kafka.dlq_topic_for(topic), 2, 1)])
    client = redis_client(live.redis)
    listeners = {"online": OnlineWrites(client, live.redis.namespace)}
    listeners.update({view: OnlineWrites(client, live.redis.namespace, view) for view in WINDOWED})
    if durable:
        listeners["bronze"] = OnlineWrites(client, bronze.redis.namespace)
    for listener in listeners.values():
        listener.start()
    common = ["--env", args.env, "--conf-dir", str(conf_dir)]
    jobs = [Job("live", [*common, *set_arguments(overrides), "--views", ",".join([VIEW, *WINDOWED])], root / "live.log")]
    try:
        if durable:
            jobs.append(Job("ingest", [*common, *set_arguments(bronze_overrides), "--topics", topic], root / "ingest.log",
                            args.durable_nice))
            bronze_log = Path(bronze.storage.bronze_path(topic), "_delta_log")
            while not any(bronze_log.glob("*.json")):  # fp-features needs the table fp-ingest creates
                jobs[-1].check()
                time.sleep(1)
            jobs.append(Job("features", [*common, *set_arguments(bronze_overrides), "--views", VIEW], root / "features.log",
                            args.durable_nice))
        time.sleep(args.settle)  # every job started its session and queries
        wait_for_aof_rewrite(client)
        for job in jobs:
            job.check()
        log.info("%s: producing %d events/s for %ds (%s)", label, rate, args.seconds, ", ".join(j.name for j in jobs))
        # The live job ending is the run's failure; a durable job ending (e.g. starved of CPU at
        # high rates) is reported with the bronze figures, and the live path is still measured.
        failed: dict[str, str] = {}

        def check_jobs() -> None:
            jobs[0].check()
            for job in jobs[1:]:
                if job.name not in failed and (failure := job.failure()):
                    log.error("%s: the durable path's %s", label, failure)
                    failed[job.name] = failure.splitlines()[0]

        sent = produce_at_rate(live, topic, rate, args.seconds, args.accounts, seed=17, check=check_jobs)
        deadline = time.monotonic() + args.drain
        while time.monotonic() < deadline:
            check_jobs()
            waiting = ["online"] + (["bronze"] if durable and not failed else [])
            if all(not latencies(sent, listeners[path].writes)[1] for path in waiting):
                break
            time.sleep(1)
    finally:
        for job in jobs:
            job.stop()
        for listener in listeners.values():
            listener.stop()
        # Always, also after a failure: a run's live state (7 days of TTL) left behind makes every
        # later run's Redis bigger, and its append-only-file rewrites slower (measured: 1.6 GB
        # of leftovers made a rewrite take 82 s, and the live path's batches 5x slower meanwhile).
        for namespace in {live.redis.namespace, bronze.redis.namespace}:
            for key in client.scan_iter(f"{namespace}:*", count=1000):
                client.unlink(key)
    results = {}
    since, until = sent[int(args.warmup * rate)][1], sent[-1][1]
    for view in WINDOWED:
        measured = window_latencies(listeners[view].writes, micros(live.views[view].allowed_lateness), since, until)
        if not measured:
            raise RuntimeError(f"{view} at {rate}/s: no window closed during the run (logs: {root})")
        results[view] = {"windows": len(measured), **{f"p{q}": round(percentile(measured, q), 3) for q in (50, 95, 99)},
                         "max": round(max(measured), 3)}
        log.info("%s %s: %s", view, label, results[view])
    for path in ("online", "bronze"):
        if path not in listeners:
            continue
        measured, missing = latencies(sent[int(args.warmup * rate):], listeners[path].writes)
        # Events still missing at the drain deadline count as later than every measured one (a
        # percentile among them is null: unknown, beyond the deadline).
        ranked = sorted(measured) + [math.inf] * missing
        results[path] = {"events": len(ranked), "missing": missing,
                         **{f"p{q}": finite(round(percentile(ranked, q), 3)) for q in (50, 95, 99)},
                         "max": finite(round(ranked[-1], 3))}
        if path == "bronze" and failed:
            results[path]["failed"] = "; ".join(failed.values())
        log.info("%s %s: %s", path, label, results[path])
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--rates", default="1000,5000", help="events per second, comma-separated")
    parser.add_argument("--seconds", type=int, default=300, help="how long to produce at each rate")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds of events left out of the figures (JIT, first plans, catch-up after start)")
    parser.add_argument("--settle", type=float, default=45.0, help="seconds between job start and the first event")
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--trigger", default="1s", help="trigger interval of the durable path's queries")
    parser.add_argument("--alone", action="store_true", help="also measure the live path with the durable path stopped")
    parser.add_argument("--alone-only", action="store_true", help="measure the live path with the durable path stopped, only")
    parser.add_argument("--drain", type=float, default=600.0,
                        help="seconds to wait after the last event for every path to write it")
    parser.add_argument("--keep", action="store_true", help="keep each run's lake, checkpoints and job logs")
    parser.add_argument("--durable-nice", type=int, default=0, choices=range(0, 20), metavar="0..19",
                        help="run fp-ingest and fp-features at this OS niceness (the live path's CPU priority)")
    args = parser.parse_args(argv)
    parse_duration(args.trigger, "--trigger")
    # SIGTERM ends the run as Ctrl-C does: its jobs stopped, its Redis keys deleted.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rates = [int(r) for r in args.rates.split(",")]
    configure_logging(logging.INFO)
    base = settings_from_args(args)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")

    control = redis_client(base.redis)
    previous = control.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
    control.config_set("notify-keyspace-events", "Kh")  # keyspace events of hash commands
    figures: dict[str, dict[str, dict]] = {"online": {}, "bronze": {}, **{view: {} for view in WINDOWED}}
    try:
        for rate in rates if not args.alone_only else ():
            for path, result in measure_rate(args, run_id, rate, durable=True).items():
                figures[path][str(rate)] = result
        if args.alone or args.alone_only:
            for rate in rates:
                for path, result in measure_rate(args, run_id, rate, durable=False).items():
                    figures.setdefault(f"{path}_alone", {})[str(rate)] = result
    finally:
        control.config_set("notify-keyspace-events", previous)

    results = {"run": run_id, "seconds": args.seconds, "warmup": args.warmup, "trigger": args.trigger,
               "durable_nice": args.durable_nice,
               "accounts": args.accounts, "view": VIEW, "figures": figures,
               "machine": {"cpus": os.cpu_count(), "python": host.python_version(), "system": host.platform()}}
    out = PROJECT_ROOT / "bench" / "results" / f"latency-{run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nevent-to-Redis latency, {VIEW} (online, bronze), and watermark-to-Redis latency of the windowed views, "
          f"{args.seconds}s per rate (seconds)\n")
    print("| path | events/s | events | p50 | p95 | p99 | max |\n|---|---|---|---|---|---|---|")
    for path, by_rate in figures.items():
        for rate, r in by_rate.items():
            count = f"{r['events']:,}" if "events" in r else f"{r['windows']:,} windows"
            failed = f" (failed: {r['failed']})" if r.get("failed") else ""
            print(f"| {path} | {rate} | {count}{failed} | {r['p50']} | {r['p95']} | {r['p99']} | {r['max']} |")
    print(f"\nresults: {out}")
    print(json.dumps({path: {rate: {k: r[k] for k in ("p50", "p95", "p99")} for rate, r in by_rate.items()}
                      for path, by_rate in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
