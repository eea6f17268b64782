"""The chaos run (``make chaos``): the four streaming jobs on the local cluster while events
arrive at a steady rate, and faults injected one after another at random instants; then the
platform is checked for exactness.

Usage: python -m tests.chaos [--faults 24] [--rate 10] [--seed 1] [--root .local/chaos] [--keep]

* The platform: ``local.mode: cluster`` (three KRaft nodes, topics replicated 3 with two in
  sync to write, a Redis Cluster of three masters and their replicas, Spark standalone with two
  workers) on free loopback ports, its data under ``--root``.
* The jobs, each a process group as ``spark-submit`` would run it: fp-ingest on the standalone
  master with one executor (a worker's death takes it), fp-features, fp-live and fp-score on local
  Spark (measured: with fp-features' executors on the workers too, this 2-core machine ran 14
  JVMs and fp-ingest committed no batch in five minutes). A job that ends on its own is
  restarted, as its supervisor would, and counted.
* The events: the generator's realistic disorder (out-of-order, late, duplicate and invalid
  records, labels) at ``--rate`` records a second, acks=all, for the whole run; their event
  times end two days before today, so that every day the end's late recompute must correct is
  over (a day a stream still writes waits for its end: ``pipelines/batch/late.py``).
* The faults, ``--faults`` of them spread evenly over the kinds of :mod:`tests.faults` in a
  seeded random order, each after a random pause: a job SIGKILLed (and restarted at once), the
  leader broker of a random partition SIGKILLed, a Redis master SIGKILLed (failover) or
  restarted, a Spark worker SIGKILLed. After each: the recovery time (until every job the
  fault touched has made progress twice: a whole batch begun after it), the node brought back,
  and no event twice in bronze or among the predictions so far.
* At the end (the producer stopped, the jobs drained): reconciliation exact per topic (Kafka
  = bronze + dead letters + duplicates, each against what was sent), every feature table equal
  to a fault-free run over the same bronze, Redis equal to the tables' latest rows, every valid
  transaction predicted exactly once. The figures are printed (RELIABILITY.md's table) and
  written to ``bench/results/chaos.json``; the exit code is 0 only if every check held.

Its CI subset is ``tests/integration/test_cluster.py`` (and the scorer's SIGKILL tests in
``tests/integration/test_score.py``)."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from deltalake import DeltaTable

from pipelines.batch.backfill import DayRange, backfill
from pipelines.batch.late import recompute_late
from pipelines.batch.sources import BronzeSnapshot
from pipelines.core.kafka_admin import topic_offsets
from pipelines.core.session import build_session
from pipelines.core.settings import PROJECT_ROOT, Settings, load_settings
from pipelines.core.times import day_start
from pipelines.ingest.reconcile import format_report, reconcile
from pipelines.local.generator import VALID_KINDS, GeneratorSpec, GeneratorSummary, Record, generate, produce
from pipelines.local.jars import DEFAULT_ROOT as JARS_ROOT
from pipelines.local.jars import fetch
from pipelines.local.platform import LocalPlatform
from pipelines.online.store import redis_client
from pipelines.scoring.sinks import predictions_path
from tests import faults
from tests.models import INPUTS, committed_predictions, register_model, score_job_args
from tests.support import (
    assert_online_equals_tables,
    clock_records,
    cluster_overrides,
    delta_versions,
    isolation,
    latest_rows,
    rounded_rows,
    start_job,
    topic_names,
    unmatched_rows,
    wait_for,
)

log = logging.getLogger("chaos")

#: The views fp-features computes (a trailing and a sliding one) and those fp-live serves the scorer.
FEATURE_VIEWS = ("account_velocity", "merchant_hourly")
LIVE_VIEWS = ("account_velocity", "account_fraud_history")
#: Which jobs a fault of each kind stops or disturbs: recovery waits for each to progress.
TOUCHES = {
    faults.KILL_INGEST: ("ingest",), faults.KILL_FEATURES: ("features",), faults.KILL_LIVE: ("live",),
    faults.KILL_SCORE: ("score",),
    faults.KILL_LEADER_BROKER: ("ingest", "live", "score"),
    faults.KILL_REDIS_MASTER: ("features", "live", "score"),
    faults.RESTART_REDIS_MASTER: ("features", "live", "score"),
    faults.KILL_SPARK_WORKER: ("ingest",),
}
#: How long a fault may take to recover from before the run fails.
RECOVERY_TIMEOUT = 600.0


@dataclasses.dataclass
class FaultRecord:
    kind: str
    target: str
    at: float  # seconds since the run started
    recovery_s: float


class Jobs:
    """The four streaming jobs as process groups; restarts one that ended without being asked
    (counted in ``unplanned_exits``), as a supervisor with Restart=always would."""

    def __init__(self, conf_dir: Path, logs: Path, args: dict[str, list[str]]):
        self.conf_dir, self.logs, self.args = conf_dir, logs, args
        self.running: dict[str, subprocess.Popen] = {}
        self.unplanned_exits: Counter = Counter()

    def start(self, name: str) -> None:
        self.running[name] = start_job(name, self.conf_dir, self.logs / f"{name}.log", *self.args[name])

    def kill(self, name: str, progress: Progress) -> dict[str, int]:
        """The fault: SIGKILL, then the supervisor's restart; the job's progress marker between
        the two (records the dead job had on the wire may still land: they are not the new
        one's progress)."""
        faults.kill_job(self.running[name])
        time.sleep(1.0)
        since = progress.read((name,))
        self.start(name)
        return since

    def supervise(self) -> None:
        for name, job in list(self.running.items()):
            code = job.poll()
            if code is not None:
                log.warning("%s exited on its own (code %s): restarting it (its log: %s)", name, code,
                            self.logs / f"{name}.log")
                self.unplanned_exits[name] += 1
                self.start(name)

    def stop_all(self, timeout: float = 300) -> dict[str, int]:
        """SIGTERM every job's process group (each ends after its batch); their exit codes
        (SIGKILL, and -9, after ``timeout``)."""
        for job in self.running.values():
            signal_group(job, signal.SIGTERM)
        codes = {}
        for name, job in self.running.items():
            try:
                codes[name] = job.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                signal_group(job, signal.SIGKILL)
                codes[name] = job.wait(timeout=60)
        self.running.clear()
        return codes


def signal_group(job: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(job.pid, signum)
    except ProcessLookupError:  # already gone
        pass


class Producer(threading.Thread):
    """The generator's records at ``rate`` a second until :meth:`stop`; keeps what it sent."""

    def __init__(self, settings: Settings, spec: GeneratorSpec, rate: float):
        super().__init__(name="producer", daemon=True)
        self.settings, self.spec, self.rate = settings, spec, rate
        self.records: list[Record] = []
        self.summary: GeneratorSummary | None = None
        self.error: BaseException | None = None
        self._stopping = threading.Event()

    def _until_stopped(self) -> Iterator[Record]:
        for record in generate(self.spec):
            if self._stopping.is_set():
                return
            self.records.append(record)
            yield record

    def run(self) -> None:
        try:
            self.summary = produce(self._until_stopped(), self.settings.kafka.producer_properties(), rate=self.rate,
                                   topic_names=topic_names(self.settings))
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop_now(self) -> None:
        """Stop sending (a run that failed); what was sent is not needed."""
        self._stopping.set()
        self.join(timeout=60)

    def stop(self) -> GeneratorSummary:
        self._stopping.set()
        self.join(timeout=300)
        if self.error is not None:
            raise RuntimeError("the producer failed") from self.error
        assert self.summary is not None
        return self.summary


class Progress:
    """Each job's progress marker, read from outside it: bronze commits (ingest), feature-table
    commits (features), the end offsets of the live events topic (live) and of the predictions
    topic (score)."""

    def __init__(self, settings: Settings):
        kafka = settings.kafka.client_properties()
        tx = settings.ingest.topics[0]
        bronze = settings.storage.bronze_path(tx)
        velocity = settings.storage.feature_path("account_velocity")
        events, predictions = settings.live.events_topic(tx), settings.scoring.predictions_topic

        def ends(topic: str) -> Callable[[], int]:
            return lambda: sum(end for _, end in topic_offsets(kafka, topic, timeout=10).values())

        self.markers: dict[str, Callable[[], int]] = {
            "ingest": lambda: delta_versions(bronze), "features": lambda: delta_versions(velocity),
            "live": ends(events), "score": ends(predictions)}

    def read(self, jobs: tuple[str, ...]) -> dict[str, int]:
        return {job: self._read(job) for job in jobs}

    def _read(self, job: str) -> int:
        try:
            return self.markers[job]()
        except Exception:  # noqa: BLE001 - a broker being elected: no progress seen this time
            return -1

    def wait_advanced(self, since: dict[str, int], times: int, jobs_: Jobs, timeout: float) -> float:
        """Block until each job of ``since`` has moved its marker past ``since`` ``times`` times
        (a move seen at one poll counts once); the seconds it took."""
        started = time.monotonic()
        last = dict(since)
        moves = Counter()
        while any(moves[job] < times for job in since):
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"no progress of {sorted(j for j in since if moves[j] < times)} within "
                                   f"{timeout:.0f} s")
            jobs_.supervise()
            for job in since:
                value = self._read(job)
                if value > last[job]:
                    moves[job] += 1
                    last[job] = value
            time.sleep(0.5)
        return time.monotonic() - started


def no_duplicates_so_far(settings: Settings, model: str) -> None:
    """No event twice in bronze, no dead letter twice, no event predicted twice (Delta table),
    as the tables stand now."""
    for topic in settings.ingest.topics:
        path = settings.storage.bronze_path(topic)
        if delta_versions(path):
            ids = DeltaTable(path).to_pyarrow_table(columns=[settings.contract_for(topic).id_field]).column(0)
            assert len(ids) == len(ids.unique()), f"an event twice in bronze of {topic}"
    path = settings.storage.dead_letter_path
    if delta_versions(path):
        rows = DeltaTable(path).to_pyarrow_table(columns=["kafka_topic", "kafka_partition", "kafka_offset"])
        assert rows.num_rows == len(set(zip(*(rows.column(i).to_pylist() for i in range(3))))), "a dead letter twice"
    path = predictions_path(settings, model)
    if delta_versions(path):
        ids = DeltaTable(path).to_pyarrow_table(columns=["event_id"]).column(0)
        assert len(ids) == len(ids.unique()), "an event predicted twice (predictions table)"


def drain(conf_dir: Path, logs: Path, job: str, *extra: str) -> None:
    """Run ``job`` to its end (``--available-now`` or ``--until-end`` in ``extra``); it must exit 0."""
    code = start_job(job, conf_dir, logs / f"{job}.log", *extra).wait(timeout=1800)
    if code != 0:
        raise RuntimeError(f"the {job} drain exited {code}: see {logs / f'{job}.log'}")


def fault_plan(count: int, rng: random.Random) -> list[str]:
    """``count`` fault kinds, every kind as often as the others (+-1), in a random order."""
    kinds = list(TOUCHES)
    plan = [kinds[i % len(kinds)] for i in range(count)]
    rng.shuffle(plan)
    return plan


def inject(kind: str, cluster: LocalPlatform, settings: Settings, jobs: Jobs, progress: Progress,
           since: dict[str, int], rng: random.Random) -> tuple[str, Any]:
    """Inject one fault; (what it hit, the node to bring back afterwards or None). A job kill
    updates ``since`` to the marker read after the kill."""
    job = {v: k for k, v in faults.JOB_KILLS.items()}.get(kind)
    if job is not None:
        since.update(jobs.kill(job, progress))
        return job, None
    if kind == faults.KILL_LEADER_BROKER:
        topic = rng.choice([*settings.ingest.topics, settings.live.events_topic(settings.ingest.topics[0])])
        partition = rng.randrange(settings.kafka.topics[settings.ingest.topics[0]].partitions)
        node = faults.kill_leader_broker(cluster, settings, topic, partition)
        return f"{node.name} (leader of {topic}/{partition})", node
    if kind in (faults.KILL_REDIS_MASTER, faults.RESTART_REDIS_MASTER):
        client = redis_client(settings.redis)
        keys = [k.decode() for k in itertools.islice(client.scan_iter(f"{settings.redis.namespace}:*", count=500), 500)]
        key = rng.choice(keys) if keys else f"{settings.redis.namespace}:account_velocity:{{acct-000001}}"
        if kind == faults.KILL_REDIS_MASTER:
            node = faults.kill_redis_master(cluster, settings, key)
            return f"{node.name} (master of {key})", node
        node = faults.restart_redis_master(cluster, settings, key)
        return f"{node.name} (master of {key})", None
    if kind == faults.KILL_SPARK_WORKER:
        # A worker that runs one of fp-ingest's executors (the others may run none).
        index = rng.choice(faults.busy_workers(cluster) or [0])
        node = faults.kill_spark_worker(cluster, index)
        return node.name, node
    raise ValueError(f"unknown fault kind {kind!r}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def report(injected: list[FaultRecord], outcome: dict[str, Any]) -> str:
    lines = ["| fault | injected | recovery p50 (s) | recovery max (s) |", "|---|---|---|---|"]
    by_kind: dict[str, list[float]] = {}
    for record in injected:
        by_kind.setdefault(record.kind, []).append(record.recovery_s)
    for kind, values in by_kind.items():
        lines.append(f"| {kind} | {len(values)} | {statistics.median(values):.1f} | {max(values):.1f} |")
    every = [r.recovery_s for r in injected]
    if every:
        lines.append(f"| **all** | **{len(every)}** | **{statistics.median(every):.1f}** | **{max(every):.1f}** |")
    lines.append("")
    lines += [f"- {key}: {value}" for key, value in outcome.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=24, help="faults to inject (default 24: three of each kind)")
    parser.add_argument("--rate", type=float, default=10.0, help="records a second sent for the whole run")
    parser.add_argument("--seed", type=int, default=1, help="the faults' order, targets and pauses; the events")
    parser.add_argument("--pause", type=float, nargs=2, default=(5.0, 25.0), metavar=("MIN", "MAX"),
                        help="seconds between one fault's recovery and the next fault (uniform)")
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT / ".local" / "chaos",
                        help="the run's platform data, lake and logs (deleted first)")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "bench" / "results" / "chaos.json")
    parser.add_argument("--keep", action="store_true", help="leave the platform running at the end")
    args = parser.parse_args(argv)
    if args.faults < 1 or args.rate <= 0:
        parser.error("--faults must be >= 1 and --rate > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    rng = random.Random(args.seed)

    shutil.rmtree(args.root, ignore_errors=True)
    (args.root / "logs").mkdir(parents=True)
    fetch("kafka", JARS_ROOT)
    fetch("spark", JARS_ROOT)
    base = {"spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "1g",
                      "jars_dir": str(JARS_ROOT / "spark")},
            "storage": {"root": str(args.root / "lake")},
            "mlflow": {"tracking_uri": f"sqlite:///{args.root}/mlflow.db", "artifact_location": str(args.root / "artifacts")}}
    overrides = cluster_overrides(base, args.root / "services")
    make = isolation(overrides, args.root)
    cluster = LocalPlatform(load_settings("local", PROJECT_ROOT / "conf", overrides).local, jars_root=JARS_ROOT,
                            with_registry=False, with_cdc=False)
    started = time.monotonic()
    cluster.up()
    log.info("cluster up in %.0f s", time.monotonic() - started)
    jobs: Jobs | None = None
    producer: Producer | None = None
    try:
        # Live rows kept for a day: the events are the last hours' (the scorer joins them as of their time).
        # fp-ingest: one executor on the workers (with one per worker, each job would need
        # another JVM this 2-core machine cannot run beside the rest).
        settings = make(partitions=3, ingest={"max_offsets_per_trigger": 2000, "trigger_interval": "5s"},
                        features={"trigger_interval": "5s"}, live={"served_retention": "1d"},
                        spark={"conf": {"spark.cores.max": "1"}})
        tx = settings.ingest.topics[0]
        settings = dataclasses.replace(settings, scoring=dataclasses.replace(
            settings.scoring, topic=tx, predictions_topic=f"predictions_{uuid.uuid4().hex[:8]}"))
        conf_dir = make.conf_dir(settings, args.root / "conf")
        tracking = f"sqlite:///{args.root / 'mlflow.db'}"
        model = f"fraud_{uuid.uuid4().hex[:6]}"
        register_model(tracking, args.root / "artifacts", model, INPUTS, seed=args.seed)
        local_spark = ["--set", "local.spark_workers=0"]
        jobs = Jobs(conf_dir, args.root / "logs", {
            "ingest": [],
            "features": ["--views", ",".join(FEATURE_VIEWS), *local_spark],
            "live": ["--views", ",".join(LIVE_VIEWS), *local_spark],
            "score": [*score_job_args(settings, tracking, f"models:/{model}@champion", batch=200), *local_spark],
        })
        expected_seconds = args.faults * (60 + sum(args.pause) / 2) + 600
        # The events' times end two days before today: every day a late event can change (up to
        # a day after it, the longest window) is then over once the clock reaches today, so the
        # end's late recompute replaces them all. A day the stream still writes (today's, with
        # recent events) waits for its end by design, and could not be compared yet.
        events_end = day_start(datetime.now(timezone.utc).date()) - timedelta(days=2)
        spec = GeneratorSpec(count=int(args.rate * expected_seconds * 2), accounts=300, merchants=40, seed=args.seed,
                             end=events_end, span=timedelta(hours=8),
                             bad_rate=0.03, duplicate_rate=0.03, label_rate=0.2,
                             label_delay=(timedelta(minutes=5), timedelta(hours=2)))
        producer = Producer(settings, spec, args.rate)
        producer.start()
        # fp-features reads bronze tables fp-ingest creates (started before them, it says so and exits).
        jobs.start("ingest")
        jobs.start("live")
        bronze = [settings.storage.bronze_path(topic) for topic in settings.ingest.topics]
        wait_for(lambda: all(delta_versions(path) for path in bronze), RECOVERY_TIMEOUT, "bronze tables")
        jobs.start("features")
        jobs.start("score")
        progress = Progress(settings)
        warm = progress.wait_advanced(progress.read(tuple(jobs.running)), 1, jobs, RECOVERY_TIMEOUT)
        log.info("every job has made progress (%.0f s after their start)", warm)

        injected: list[FaultRecord] = []
        for n, kind in enumerate(fault_plan(args.faults, rng), 1):
            pause = rng.uniform(*args.pause)
            deadline = time.monotonic() + pause
            while time.monotonic() < deadline:
                jobs.supervise()
                time.sleep(0.5)
            touched = TOUCHES[kind]
            since = progress.read(touched)
            at = time.monotonic()
            target, node = inject(kind, cluster, settings, jobs, progress, since, rng)
            # The killed job must progress once after its restart; a fault under running jobs
            # twice (the first commit may be a batch that was nearly done when it hit).
            times = 1 if kind in faults.JOB_KILLS.values() else 2
            progress.wait_advanced(since, times, jobs, RECOVERY_TIMEOUT)
            recovery = time.monotonic() - at
            injected.append(FaultRecord(kind, target, round(at - started, 1), round(recovery, 2)))
            log.info("fault %d/%d: %s on %s, recovered in %.1f s", n, args.faults, kind, target, recovery)
            if node is not None:
                faults.repair(cluster, node)
            no_duplicates_so_far(settings, model)

        # The end: no more events; every job stopped after its batch.
        sent = producer.stop()
        events = list(producer.records)
        codes = jobs.stop_all()
        log.info("jobs stopped: %s; draining", codes)
        # Then the clock moves on twice (a record at now - 5 min, one at now), each drained by
        # the ingest and features jobs: every watermark passes the history and the second batch
        # runs under it (the last windows close). Then fp-live and fp-score to the end.
        now = datetime.now(timezone.utc)
        for n, moment in enumerate((now - timedelta(minutes=5), now)):
            clock = clock_records(moment, n)
            events += clock
            sent.extend(produce(clock, settings.kafka.producer_properties(), topic_names=topic_names(settings)))
            drain(conf_dir, jobs.logs, "ingest", "--available-now")
            drain(conf_dir, jobs.logs, "features", "--available-now", *jobs.args["features"])
        drain(conf_dir, jobs.logs, "live", "--available-now", *jobs.args["live"])
        drain(conf_dir, jobs.logs, "score", "--until-end", *jobs.args["score"])
        history = DayRange((spec.end - spec.span - spec.late_by[1]).date(), now.date() + timedelta(days=1))
        outcome = check(settings, model, sent, events, history, args.root)
        outcome["unplanned job exits"] = dict(jobs.unplanned_exits) or 0
        outcome["duration (min)"] = round((time.monotonic() - started) / 60, 1)
        text = report(injected, outcome)
        print(text)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[1:],
            "faults": [dataclasses.asdict(r) for r in injected], "outcome": outcome}, indent=2, default=str))
        return 0
    finally:
        if producer is not None and producer.is_alive():
            producer.stop_now()
        if jobs is not None:
            jobs.stop_all(timeout=60)
        if not args.keep:
            cluster.down()


def check(settings: Settings, model: str, sent: GeneratorSummary, records: list[Record], history: DayRange,
          root: Path) -> dict[str, Any]:
    """The end checks (AssertionError at the first that fails); the figures they counted."""
    # Counting and comparing on local Spark: the jobs are done, the cluster's workers need not be.
    spark = build_session(dataclasses.replace(settings.spark, master="local[2]"))
    results = reconcile(spark, settings, settings.ingest.topics, sent)
    print(format_report(results))
    assert all(r.ok for r in results), "reconciliation failed"
    views = [settings.views[name] for name in FEATURE_VIEWS]
    # The operator's late recompute: the events the streams' watermarks dropped, in their days.
    late = recompute_late(spark, settings, views)
    log.info("late recompute: %s", ", ".join(f"{o.view} {o.late_events} late events" for o in late))
    # The fault-free reference: a backfill of every day of the history from a copy of the same bronze.
    reference = dataclasses.replace(settings, storage=dataclasses.replace(settings.storage, root=str(root / "reference")),
                                    redis=dataclasses.replace(settings.redis, namespace=f"reference-{uuid.uuid4().hex[:8]}"))
    for topic in settings.ingest.topics:
        shutil.copytree(settings.storage.bronze_path(topic), reference.storage.bronze_path(topic))
    backfill(spark, reference, views, [history], BronzeSnapshot())
    compared = {}
    for view in views:
        streamed, columns = latest_rows(spark, settings.storage.feature_path(view.name), view)
        expected = rounded_rows(spark.read.format("delta").load(reference.storage.feature_path(view.name)).collect(),
                                columns)
        only_streamed, only_expected = unmatched_rows(streamed, expected)
        assert not only_streamed and not only_expected, (
            f"{view.name} differs from the fault-free backfill: {len(only_streamed)} rows only streamed, "
            f"{len(only_expected)} only in the backfill; e.g. {only_streamed[:1]} vs {only_expected[:1]}")
        compared[view.name] = sum(expected.values())
    entities = assert_online_equals_tables(spark, settings, views, redis_client(settings.redis))
    # Every valid transaction predicted once, in the topic (read_committed) and the table.
    valid = {r.event_id for r in records if r.topic == "transactions" and r.kind in VALID_KINDS}
    ids = [p["event_id"] for p in committed_predictions(settings)]
    duplicated = len(ids) - len(set(ids))
    assert duplicated == 0, f"{duplicated} duplicate predictions"
    assert set(ids) == valid, f"{len(valid - set(ids))} valid transactions without a prediction, " \
                              f"{len(set(ids) - valid)} predictions of no valid transaction"
    table = [r["event_id"] for r in spark.read.format("delta").load(predictions_path(settings, model)).collect()]
    assert sorted(table) == sorted(ids), "the predictions table differs from the topic"
    tx, lb = settings.ingest.topics
    return {
        "records sent": sum(sent.sent(t) for t in settings.ingest.topics),
        "bronze rows (transactions, labels)": (sent.expected_bronze(tx), sent.expected_bronze(lb)),
        "dead letters": sum(sum(sent.expected_dead_letters(t).values()) for t in settings.ingest.topics),
        "duplicates dropped": sum(sent.duplicates(t) for t in settings.ingest.topics),
        "records lost": 0, "records duplicated": 0,
        # Per view: both views read the same transactions, so one late event counts in each.
        "late events recomputed, per view": {o.view: o.late_events for o in late},
        "feature rows equal to the fault-free backfill": compared,
        "online entities equal to the tables": entities,
        "predictions (each valid transaction once)": len(ids),
    }


if __name__ == "__main__":
    sys.exit(main())
