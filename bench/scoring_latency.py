"""Event -> prediction latency of ``fp-score`` at fixed input rates, with the features path
(``fp-live``) running, beside a baseline in the same run.

For each rate, transactions are produced at that rate for ``--seconds``, each stamped with its
send time as event time, into a fresh topic. ``fp-live`` (``account_velocity``) and ``fp-score``
run as the jobs they are (each its own Spark driver), on the run's topic, lake and Redis
namespace; the model is a small classifier over ``amount_usd`` and ``account_velocity``'s
features, registered for the run in its own MLflow store (``models:/fraud_bench@champion``).

* **fp-score**: a ``read_committed`` consumer of the predictions topic (a process of its own)
  notes when each prediction becomes visible; an event's latency is that moment minus its event
  time. The predictions' own ``features_ready_time`` gives the features path's share (event ->
  its own row computed in Redis), their ``scored_time`` the scorer's (event -> the model's
  output, before the Kafka commit).
* **baseline**: one Python process that consumes the raw topic,
  parses each JSON event, reads the entity's current ``account_velocity`` hash from the live
  path's Redis (no validation, no de-duplication, no own row: whatever the hash holds) and calls
  the same model on each poll's events (its native threads capped as fp-score's are); its
  latency is the moment the score is computed minus the event time.

The two run in phases of their own, on the same run's topic and features path: fp-score first
(``--seconds`` of events at the rate, then its drain; it is stopped), then the baseline on as many
new events at the same rate, with ``fp-live`` still applying the topic to Redis.

The first ``--warmup`` seconds of events are left out. The last line printed is JSON:
``{"score": {"1000": {"p50": ..., "p95": ..., "p99": ...}, ...}, "features_ready": {...},
"scored": {...}, "baseline": {...}}`` (seconds).

Usage: python bench/scoring_latency.py --env local [--rates 1000,5000] [--seconds 300]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import platform as host
import shutil
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient
from feature_latency import (
    Job,
    bench_conf,
    overrides_for,
    percentile,
    produce_at_rate,
    set_arguments,
    wait_for_aof_rewrite,
)
from sklearn.ensemble import HistGradientBoostingClassifier

from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args
from pipelines.core.config import deep_merge, parse_overrides
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.core.times import epoch_micros
from pipelines.local.platform import LocalPlatform
from pipelines.local.services import descendants
from pipelines.online.store import read_online, redis_client
from pipelines.scoring.model import limit_model_threads, register_version

log = logging.getLogger("bench")
MODEL = "fraud_bench"
INPUTS = ["amount_usd", "account_velocity__count_1h", "account_velocity__sum_amount_usd_1h",
          "account_velocity__avg_amount_usd_1d", "account_velocity__max_amount_usd_1d",
          "account_velocity__approx_count_distinct_merchant_id_1d"]


def register_bench_model(tracking: str, artifacts: Path) -> str:
    """A small gradient-boosted classifier over :data:`INPUTS`, registered as ``fraud_bench``
    with alias ``champion``; its pyfunc returns probabilities. Returns the version."""
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({n: rng.gamma(2.0, 50.0, 2000) for n in INPUTS})
    labels = (frame["amount_usd"] + 3 * frame["account_velocity__count_1h"] + rng.normal(0, 40, 2000) > 200).astype(int)
    model = HistGradientBoostingClassifier(max_iter=100, random_state=1).fit(frame, labels)
    client = mlflow.MlflowClient(tracking)
    experiment_id = client.create_experiment("scoring-bench", artifact_location=artifacts.as_uri())
    return register_version(client, experiment_id, lambda path: mlflow.sklearn.save_model(
        model, path, input_example=frame.head(3), pyfunc_predict_fn="predict_proba",
        skops_trusted_types=["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]), MODEL, "champion")


def poll_available(consumer: Consumer, limit: int = 1000) -> list:
    """The messages available now (at most ``limit``), waiting up to 0.2 s for the first.
    ``consume(limit, timeout)`` alone would wait for ``limit`` messages or the whole timeout:
    at 1,000 predictions/s in batches of tens that added 0.1 s at p50 to every figure."""
    first = consumer.consume(1, timeout=0.2)
    return first + consumer.consume(limit - 1, timeout=0) if first else first


def watch_predictions(props: dict, topic: str, out: str, stop, count) -> None:
    """Notes when each prediction of ``topic`` becomes visible to a read_committed consumer (a
    process of its own: in the bench's process it would share the producer's GIL); writes
    [visible, event, features ready, scored] µs per event id to ``out`` and counts them in
    ``count``."""
    consumer = Consumer({**props, "group.id": f"bench-{topic}", "isolation.level": "read_committed",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.subscribe([topic])
    seen: dict[str, tuple[int, int, int, int]] = {}
    while not stop.is_set():
        for message in poll_available(consumer):
            if message.error() is None:
                visible = time.time_ns() // 1000
                p = json.loads(message.value())
                if p["event_id"] not in seen:
                    seen[p["event_id"]] = (visible, iso_micros(p["event_time"]), iso_micros(p["features_ready_time"]),
                                           iso_micros(p["scored_time"]))
                    count.value += 1
    consumer.close()
    Path(out).write_text(json.dumps(list(seen.values())))


def iso_micros(text: str) -> int:
    return epoch_micros(datetime.fromisoformat(text.replace("Z", "+00:00")))


def baseline(settings_args: tuple[str, str | None, dict], topic: str, tracking: str, version: str, out: str,
             stop) -> None:
    """The baseline consumer (a process of its own): raw topic -> JSON -> the entity's current
    hash in Redis -> the model, per poll; writes [event µs, scored µs] pairs to ``out``."""
    env, conf_dir, overrides = settings_args
    settings = load_settings(env, conf_dir, overrides)
    client = redis_client(settings.redis)
    model = mlflow.pyfunc.load_model(mlflow.MlflowClient(tracking).get_model_version_download_uri(MODEL, version))
    limit_model_threads(settings.scoring.model_threads)  # as fp-score does: the same model, the same threads
    features = [n.split("__", 1)[1] for n in INPUTS if "__" in n]
    consumer = Consumer({**settings.kafka.client_properties(), "group.id": f"bench-baseline-{topic}",
                         "auto.offset.reset": "latest", "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.subscribe([topic])
    pairs = []
    while not stop.is_set():
        messages = [m for m in poll_available(consumer) if m.error() is None]
        if not messages:
            continue
        events = [json.loads(m.value()) for m in messages]
        rows = read_online(client, settings.redis.namespace, "account_velocity", features,
                           [e["account_id"] for e in events])
        frame = pd.DataFrame({"amount_usd": [float(e["amount_usd"]) for e in events],
                              **{f"account_velocity__{f}": [np.nan if r[f] is None else float(r[f]) for r in rows]
                                 for f in features}})[INPUTS]
        model.predict(frame)
        scored = time.time_ns() // 1000
        pairs += [(iso_micros(e["event_time"]), scored) for e in events]
    consumer.close()
    Path(out).write_text(json.dumps(pairs))


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None, children: bool = False) -> float:
    """CPU time (user + system) of ``pid``, or with ``children`` of its live descendants (a job's
    Spark JVM), in seconds."""
    if pid is None:
        return 0.0
    total = 0
    for each in descendants(pid) if children else [pid]:
        try:
            stat = Path(f"/proc/{each}/stat").read_text()
        except OSError:  # gone
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all but idle and iowait), from ``/proc/stat``."""
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICKS


class CpuMeter:
    """Who used the CPU over a phase: each named process tree's CPU seconds, and the machine's.
    Where the cores go at a rate is what says whether a path can keep up on this machine."""

    def __init__(self, pids: dict[str, tuple[int | None, bool]]):
        """``pids``: name -> (pid, whether its descendants are meant rather than the pid itself)."""
        self.pids = pids
        self.start = self.sample()

    def sample(self) -> tuple[float, float, dict[str, float]]:
        return (time.monotonic(), machine_busy_seconds(),
                {name: cpu_seconds(pid, children) for name, (pid, children) in self.pids.items()})

    def report(self, events: int) -> dict:
        """Per process tree and for the machine: cores used on average, and CPU ms per 1,000 events."""
        (t0, busy0, by0), (t1, busy1, by1) = self.start, self.sample()
        wall = t1 - t0
        used = {name: by1[name] - by0.get(name, 0.0) for name in by1}
        used["other"] = max(0.0, (busy1 - busy0) - sum(used.values()))
        used["machine"] = busy1 - busy0
        return {"seconds": round(wall, 1), "events": events,
                **{name: {"cores": round(cpu / wall, 2), "ms_per_1000_events": round(cpu * 1e6 / max(events, 1), 1)}
                   for name, cpu in used.items()}}


def figures(values: list[float], missing: int = 0) -> dict:
    ranked = sorted(values) + [math.inf] * missing
    if not ranked:
        return {"events": 0}
    return {"events": len(ranked), "missing": missing,
            **{f"p{q}": None if math.isinf(v := percentile(ranked, q)) else round(v, 3) for q in (50, 95, 99)}}


def measure_rate(args, run_id: str, rate: int) -> dict[str, dict]:
    label = f"score-{rate}"
    overrides, root = overrides_for(args, run_id, rate, label)
    root.mkdir(parents=True, exist_ok=True)
    conf_dir = bench_conf(Path(args.conf_dir) if args.conf_dir else PROJECT_ROOT / "conf", root / "conf")
    project_settings = load_settings(args.env, args.conf_dir, parse_overrides(args.set))
    jars_dir = project_settings.spark.jars_dir
    # The broker's and Redis's pid files, where `python -m pipelines.local up` put them (the
    # bench's copy of the conf resolves relative paths elsewhere).
    platform = LocalPlatform(project_settings.local) if project_settings.local else None
    topic = next(iter(overrides["kafka"]["topics"]))
    predictions = f"{topic}_predictions"
    overrides = deep_merge(overrides, {"spark": {"jars_dir": jars_dir} if jars_dir else {},
                                       "scoring": {"topic": topic, "predictions_topic": predictions}})
    settings = load_settings(args.env, conf_dir, overrides)
    ensure_topics(settings.kafka.client_properties(), [TopicSpec(topic, 2, 1), TopicSpec(settings.kafka.dlq_topic_for(topic), 2, 1)])
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    version = register_bench_model(tracking, root / "artifacts")
    common = ["--env", args.env, "--conf-dir", str(conf_dir)]
    jobs = [Job("live", [*common, *set_arguments(overrides), "--views", "account_velocity"], root / "live.log")]
    client = redis_client(settings.redis)
    spawn = multiprocessing.get_context("spawn")  # not a fork of this process's Kafka and Redis clients
    stop_baseline, stop_visible, visible_count = spawn.Event(), spawn.Event(), spawn.Value("q", 0)
    visible_out = root / "visible.json"
    visible = spawn.Process(target=watch_predictions, args=(settings.kafka.client_properties(), predictions,
                                                            str(visible_out), stop_visible, visible_count))
    baseline_out = root / "baseline.json"
    baseline_process = spawn.Process(
        target=baseline, args=((args.env, str(conf_dir), overrides), topic, tracking, version, str(baseline_out),
                               stop_baseline))
    try:
        # fp-score needs the events topic fp-live creates.
        deadline = time.monotonic() + 300
        admin = AdminClient(settings.kafka.client_properties())
        while settings.live.events_topic(topic) not in admin.list_topics(timeout=10).topics:
            jobs[0].check()
            assert time.monotonic() < deadline, "fp-live did not create its events topic"
            time.sleep(1)
        # --score-master: the scorer's Spark (the predictions table, the metrics rows) on fewer cores.
        master = ["--set", f"spark.master={args.score_master}"] if args.score_master else []
        score = Job("score", [*common, *set_arguments(overrides), *master, "--model", f"models:/{MODEL}@champion",
                              "--tracking-uri", tracking], root / "score.log")
        jobs.append(score)
        visible.start()
        time.sleep(args.settle)
        wait_for_aof_rewrite(client)

        def check_jobs() -> None:
            for job in jobs:
                job.check()

        # Phase 1: fp-score, with the features path.
        check_jobs()
        log.info("%s: fp-score: producing %d events/s for %ds", label, rate, args.seconds)
        meter = CpuMeter({"producer (bench)": (os.getpid(), False),
                          "fp-live": (jobs[0].process.pid, False), "fp-live JVM": (jobs[0].process.pid, True),
                          "fp-score": (score.process.pid, False), "fp-score JVM": (score.process.pid, True),
                          "kafka": (platform and platform.kafka.pid(), False),
                          "redis": (platform and platform.redis.pid(), False),
                          "watcher (bench)": (visible.pid, False)})
        sent = produce_at_rate(settings, topic, rate, args.seconds, args.accounts, seed=23, check=check_jobs)
        cpu = meter.report(len(sent))
        log.info("%s: CPU while producing: %s", label, json.dumps(cpu))
        deadline = time.monotonic() + args.drain
        while visible_count.value < len(sent) and time.monotonic() < deadline:
            check_jobs()
            time.sleep(1)
        score.stop()
        jobs.remove(score)
        # Phase 2: the baseline alone beside the same features path (fp-live goes on applying
        # the topic to Redis), on new events of the same rate.
        baseline_process.start()
        time.sleep(args.settle / 3)
        check_jobs()
        log.info("%s: baseline: producing %d events/s for %ds", label, rate, args.seconds)
        baseline_sent = produce_at_rate(settings, topic, rate, args.seconds, args.accounts, seed=29, check=check_jobs)
        time.sleep(5)
    finally:
        stop_baseline.set()
        stop_visible.set()
        for job in reversed(jobs):
            job.stop()
        if baseline_process.pid is not None:
            baseline_process.join(timeout=120)
        if visible.pid is not None:
            visible.join(timeout=120)
        for key in client.scan_iter(f"{settings.redis.namespace}:*", count=1000):
            client.unlink(key)
    since = sent[int(args.warmup * rate)][1]
    seen = json.loads(visible_out.read_text()) if visible_out.exists() else []
    counted = [v for v in seen if v[1] >= since]
    expected = len(sent) - int(args.warmup * rate)
    results = {
        "score": figures([(v[0] - v[1]) / 1e6 for v in counted], max(0, expected - len(counted))),
        "features_ready": figures([(v[2] - v[1]) / 1e6 for v in counted]),
        # The scorer's own clock: event time -> the model's output, before its Kafka commit.
        "scored": figures([(v[3] - v[1]) / 1e6 for v in counted]),
    }
    pairs = json.loads(baseline_out.read_text()) if baseline_out.exists() else []
    baseline_since = baseline_sent[int(args.warmup * rate)][1]
    baseline_counted = [(s - e) / 1e6 for e, s in pairs if e >= baseline_since]
    results["baseline"] = figures(baseline_counted,
                                  max(0, len(baseline_sent) - int(args.warmup * rate) - len(baseline_counted)))
    for path, result in results.items():
        log.info("%s %s: %s", path, label, result)
    results["cpu"] = cpu
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--rates", default="1000,5000", help="events per second, comma-separated")
    parser.add_argument("--seconds", type=int, default=300, help="how long to produce at each rate")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of events left out of the figures")
    parser.add_argument("--settle", type=float, default=45.0, help="seconds between job start and the first event")
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--trigger", default="1s", help="(unused here; the shared overrides take it)")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds to wait for the last predictions")
    parser.add_argument("--score-master", help="spark.master of fp-score's Spark session (e.g. local[1]: its "
                        "predictions table on one core); default: the conf's")
    parser.add_argument("--keep", action="store_true", help="keep each run's lake, checkpoints, MLflow store and logs")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    configure_logging(logging.INFO)
    settings_from_args(args)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    results: dict[str, dict[str, dict]] = {"score": {}, "features_ready": {}, "scored": {}, "baseline": {}, "cpu": {}}
    for rate in (int(r) for r in args.rates.split(",")):
        for path, result in measure_rate(args, run_id, rate).items():
            results[path][str(rate)] = result
    out = PROJECT_ROOT / "bench" / "results" / f"scoring-{run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run_id, "seconds": args.seconds, "warmup": args.warmup, "accounts": args.accounts,
                               "score_master": args.score_master, "set": args.set or [], "figures": results, "machine": {"cpus": os.cpu_count(), "python": host.python_version(),
                                                               "system": host.platform()}}, indent=2))
    print(f"\nevent -> prediction latency, {args.seconds}s per rate (seconds)\n")
    print("| path | events/s | events | p50 | p95 | p99 |\n|---|---|---|---|---|---|")
    latency = {path: by_rate for path, by_rate in results.items() if path != "cpu"}
    for path, by_rate in latency.items():
        for rate, r in by_rate.items():
            print(f"| {path} | {rate} | {r.get('events', 0):,} | {r.get('p50')} | {r.get('p95')} | {r.get('p99')} |")
    print("\nCPU while fp-score's phase produced (cores on average; CPU ms per 1,000 events)\n")
    print("| events/s | " + " | ".join(n for n in next(iter(results["cpu"].values()), {}) if n not in ("seconds", "events"))
          + " |")
    for rate, cpu in results["cpu"].items():
        print(f"| {rate} | " + " | ".join(f"{v['cores']} ({v['ms_per_1000_events']})" for n, v in cpu.items()
                                         if n not in ("seconds", "events")) + " |")
    print(f"\nresults: {out}")
    print(json.dumps({path: {rate: {k: r.get(k) for k in ("p50", "p95", "p99")} for rate, r in by_rate.items()}
                      for path, by_rate in latency.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
