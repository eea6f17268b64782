"""Scaling: ingest and feature-stream throughput by Kafka partitions and Spark shape (issue 20, item 4).

Starts a platform of its own in cluster mode (three Kafka KRaft nodes, a Redis Cluster, Spark
standalone with ``max(--workers)`` workers of ``local.spark_worker_cores`` cores each) on free
loopback ports, its data in a temporary folder, and for each partition count P:

1. creates fresh ``transactions`` and ``labels`` topics of P partitions (replication factor 3)
   and produces ``--count`` transactions into them once (the generator's defaults: 2% bad
   records over all error classes, 1% duplicates, 2% late, 5% out of order, labels for 20%);
2. for each Spark shape W, on a fresh lake, checkpoints and Redis namespace:

   * W=0: local Spark ``local[2]`` (``--set local.spark_workers=0``): the single-node figure;
   * W>0: the standalone master with ``spark.cores.max`` = W: one executor of one core on each
     of W workers (the master spreads executors out);

   runs ``jobs/ingest.py --available-now`` (both topics, a query each) and then, over the bronze
   it wrote, ``jobs/features.py --available-now --views account_velocity``, each as a process of
   its own, as a scheduler would.

Timing, per run: **processing** is from the first micro-batch's trigger time to the end of the
last one (``batch_timestamp`` + ``batch_duration_ms``, over all of the job's queries), read from
the rows the job's own progress listener appended to ``ops/stream_metrics`` (ingest) or
``ops/feature_metrics`` (features) -- the figures of its per-batch progress log lines. Records/s
= the records those batches read (ingest: every Kafka record of both topics, bad and duplicate
ones included; features: the bronze transactions) / processing. Processing includes the
no-data batch a stateful query runs after its last data (the duplicate filter's and the view's
state eviction): it is part of the job. **Start-up** (process launch -> first trigger: Python,
the JVM, the session, executors, the query's first plan) and **wall** (the whole process) are
reported apart; wall - start-up - processing is the stop. The JSON also has every batch and a
steady-state rate (each query's data batches after its first; none when one batch read all).

A run fails the benchmark (exit 1, naming it) when its job exits non-zero, when a bronze table or
the dead letters differ from what the generator says it sent, or when the batches' input rows
differ from the records there were to read: a throughput figure of a wrong result is worthless.
For the standalone runs the master's JSON is sampled every second: the cores its workers lend
(the placement of the executors) and the cores the application got (must be W).

Results go to ``<output-dir>/scaling-<UTC time>.json`` (the machine, the argv, every run) and a
Markdown table on stdout, with each stage's speed-up against its W=0 P=2 row.

Usage: python bench/scaling.py [--count 200000] [--partitions 2,4,8] [--workers 0,1,2]
                               [--output-dir bench/results] [--executor-java-options OPTS] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform as host
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml
from deltalake import DeltaTable

# The platform's test helpers (free ports, isolated topics) are in tests/: put the project root
# on sys.path (a script run as ``python bench/scaling.py`` has only bench/ there).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.cli import configure_logging
from pipelines.core.config import deep_merge, parse_overrides, read_yaml
from pipelines.core.settings import PROJECT_ROOT, Settings, load_settings
from pipelines.local.generator import GeneratorSpec, GeneratorSummary, generate, produce
from pipelines.local.jars import DEFAULT_ROOT as JARS_ROOT
from pipelines.local.jars import fetch
from pipelines.local.platform import LocalPlatform, SparkMaster
from tests.support import cluster_overrides, isolation, topic_names

log = logging.getLogger("bench")
VIEW = "account_velocity"
STAGES = ("ingest", "features")


class RunFailed(Exception):
    """A run whose figure must not be reported: its job failed or its result is wrong."""


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated non-negative integers")
    return values


def shape_label(workers: int) -> str:
    if workers == 0:
        return "local[2]"
    return f"standalone, {workers} worker{'s' if workers > 1 else ''} x 1 core"


def machine() -> dict[str, Any]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpus": os.cpu_count(), "memory_gib": round(memory / 2**30, 1), "python": host.python_version(),
            "system": host.platform(), "load_average": os.getloadavg()}


def git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    return result.stdout.strip() or None


def run_conf(make, settings: Settings, folder: Path, workers: int, namespace: str,
             executor_java_options: str) -> tuple[Path, list[str]]:
    """A conf folder for one run (its own lake under ``folder``, its own Redis namespace; for
    W>0 ``spark.cores.max`` = W) and the ``--set`` arguments of its jobs."""
    conf = make.conf_dir(settings, folder / "conf")
    extra: dict[str, Any] = {"storage": {"root": str(folder / "lake")}, "redis": {"namespace": namespace}}
    if workers:
        extra["spark"] = {"conf": {"spark.cores.max": str(workers)}}
        if executor_java_options:
            extra["spark"]["conf"]["spark.executor.extraJavaOptions"] = executor_java_options
    local = deep_merge(read_yaml(conf / "local.yaml"), extra)
    (conf / "local.yaml").write_text(yaml.safe_dump(local))
    return conf, ["--set", "local.spark_workers=0"] if workers == 0 else []


def placement_sample(master: SparkMaster | None, seen: dict[str, Any]) -> None:
    """Note in ``seen`` the cores each worker lends now and the cores of the running application
    (the benchmark's applications run one at a time: a busy worker's cores are this run's)."""
    if master is None:
        return
    state = master.state()
    for worker in state.get("workers", []):
        name = worker.get("webuiaddress", worker.get("id", "?"))
        seen["worker_cores"][name] = max(seen["worker_cores"].get(name, 0), int(worker.get("coresused", 0)))
    for app in state.get("activeapps", []):
        seen["apps"][app["id"]] = max(seen["apps"].get(app["id"], 0), int(app.get("cores", 0)))


def run_job(job: str, conf: Path, sets: list[str], log_path: Path, master: SparkMaster | None,
            *extra: str) -> dict[str, Any]:
    """``jobs/<job>.py --available-now`` as a process of its own; its wall time, launch time
    and (sampled from the standalone master) the executors' placement. Raises RunFailed on a
    non-zero exit."""
    command = [sys.executable, str(PROJECT_ROOT / "jobs" / f"{job}.py"), "--env", "local", "--conf-dir", str(conf),
               "--available-now", *sets, *extra]
    seen: dict[str, Any] = {"worker_cores": {}, "apps": {}}
    launched = datetime.now(timezone.utc)
    started = time.monotonic()
    with open(log_path, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while process.poll() is None:
                placement_sample(master, seen)
                time.sleep(1.0)
        finally:
            if process.poll() is None:  # interrupted: the job (and its detached JVM with it) goes too
                process.kill()
                process.wait()
    wall = time.monotonic() - started
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RunFailed(f"{job} exited {process.returncode} after {wall:.1f}s; log {log_path}:\n{tail}")
    busy = {name: cores for name, cores in seen["worker_cores"].items() if cores}
    return {"command": command, "launched": launched, "wall_seconds": wall,
            "executors": {"worker_cores": busy, "app_cores": seen["apps"]} if master else None}


def batches(path: str) -> list[dict[str, Any]]:
    """The progress rows a job's listener appended to its metrics table."""
    columns = ["query_name", "batch_id", "batch_timestamp", "input_rows", "batch_duration_ms"]
    return DeltaTable(path).to_pyarrow_table(columns=columns).to_pylist()


def as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def timing(job: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Processing (first trigger -> end of the last batch), start-up and stop, from the batches'
    progress and the process's launch and wall time."""
    if not rows:
        raise RunFailed("no batch in the job's metrics table")
    first = min(as_utc(r["batch_timestamp"]) for r in rows)
    last = max(as_utc(r["batch_timestamp"]) + timedelta(milliseconds=r["batch_duration_ms"]) for r in rows)
    processing = (last - first).total_seconds()
    startup = (first - job["launched"]).total_seconds()
    records = sum(r["input_rows"] for r in rows)
    # Steady state: each query's batches after its first (which pays the JVM's and the Python
    # workers' warm-up) that read records; none when every query read all in one batch.
    first_of = {}
    for r in sorted(rows, key=lambda r: r["batch_id"]):
        first_of.setdefault(r["query_name"], r["batch_id"])
    steady = [r for r in rows if r["batch_id"] > first_of[r["query_name"]] and r["input_rows"]]
    steady_ms = sum(r["batch_duration_ms"] for r in steady)
    steady_rate = round(sum(r["input_rows"] for r in steady) / steady_ms * 1000) if steady_ms else None
    return {"records": records, "records_per_second": round(records / processing) if processing > 0 else None,
            "processing_seconds": round(processing, 2), "startup_seconds": round(startup, 2),
            "stop_seconds": round(job["wall_seconds"] - startup - processing, 2),
            "wall_seconds": round(job["wall_seconds"], 2),
            "steady_records_per_second": steady_rate,
            "batches": [{"query": r["query_name"], "batch": r["batch_id"], "rows": r["input_rows"],
                         "seconds": r["batch_duration_ms"] / 1000, "started": as_utc(r["batch_timestamp"]).isoformat()}
                        for r in sorted(rows, key=lambda r: (r["query_name"], r["batch_id"]))]}


def delta_rows(path: str, where: tuple[str, str] | None = None) -> int:
    """Rows of a Delta table (``where``: only those whose column equals the value)."""
    dataset = DeltaTable(path).to_pyarrow_dataset()
    if where is None:
        return dataset.count_rows()
    column, value = where
    return sum(1 for v in dataset.to_table(columns=[column]).column(column).to_pylist() if v == value)


def check_ingest(settings: Settings, sent: GeneratorSummary, result: dict[str, Any]) -> None:
    """Bronze and the dead letters of each topic are what the generator sent; the batches read
    every record of both topics once."""
    expected_records = sum(sent.sent(t) for t in settings.ingest.topics)
    if result["records"] != expected_records:
        raise RunFailed(f"the ingest's batches read {result['records']:,} records, {expected_records:,} were sent")
    for topic in settings.ingest.topics:
        bronze = delta_rows(settings.storage.bronze_path(topic))
        if bronze != sent.expected_bronze(topic):
            raise RunFailed(f"bronze of {topic}: {bronze:,} rows, "
                            f"the generator sent {sent.expected_bronze(topic):,} valid")
        dead = delta_rows(settings.storage.dead_letter_path, ("kafka_topic", topic))
        expected_dead = sum(sent.expected_dead_letters(topic).values())
        if dead != expected_dead:
            raise RunFailed(f"dead letters of {topic}: {dead:,} rows, the generator sent {expected_dead:,} bad")


def check_features(settings: Settings, sent: GeneratorSummary, result: dict[str, Any]) -> None:
    """The view's batches read every bronze transaction once and wrote its feature table."""
    transactions = settings.ingest.topics[0]
    if result["records"] != sent.expected_bronze(transactions):
        raise RunFailed(f"{VIEW}'s batches read {result['records']:,} bronze rows, "
                        f"bronze holds {sent.expected_bronze(transactions):,}")
    result["feature_rows"] = delta_rows(settings.storage.feature_path(VIEW))
    if not result["feature_rows"]:
        raise RunFailed(f"{VIEW}: an empty feature table")


def check_shape(workers: int, executors: dict[str, Any] | None) -> None:
    """A standalone run got the W cores it asked for (else its figure is another shape's)."""
    if not workers:
        return
    granted = sorted(executors["app_cores"].values()) if executors else []
    if granted != [workers]:
        raise RunFailed(f"expected one application with {workers} cores on the master, saw {granted or 'none'}")
    if len(executors["worker_cores"]) != workers:
        log.warning("the executors ran on %d workers, not %d: %s", len(executors["worker_cores"]), workers,
                    executors["worker_cores"])


def measure(make, settings: Settings, sent: GeneratorSummary, partitions: int, workers: int, folder: Path,
            run_id: str, master: SparkMaster | None, executor_java_options: str) -> list[dict[str, Any]]:
    """Ingest, then the feature stream over its bronze, in one shape; a result row per stage."""
    folder.mkdir(parents=True)
    conf, sets = run_conf(make, settings, folder, workers, f"scaling-{run_id}-p{partitions}-w{workers}",
                          executor_java_options)
    measured = load_settings("local", conf, parse_overrides(sets[1::2]))
    expected_master = "local[2]" if workers == 0 else master.url if master else None
    if measured.spark.master != expected_master:
        raise RunFailed(f"spark.master is {measured.spark.master}, expected {expected_master}")
    rows = []
    for stage in STAGES:
        label = f"{stage} P={partitions} W={workers} ({shape_label(workers)})"
        log.info("%s: running", label)
        try:
            extra = ("--views", VIEW) if stage == "features" else ()
            job = run_job(stage, conf, sets, folder / f"{stage}.log", master if workers else None, *extra)
            table = (measured.storage.stream_metrics_path if stage == "ingest"
                     else measured.storage.feature_metrics_path)
            result = timing(job, batches(table))
            (check_ingest if stage == "ingest" else check_features)(measured, sent, result)
            check_shape(workers, job["executors"])
        except RunFailed as failure:
            raise RunFailed(f"{label}: {failure}") from None
        row = {"stage": stage, "partitions": partitions, "workers": workers, "shape": shape_label(workers),
               **result, "executors": job["executors"], "command": job["command"]}
        log.info("%s: %s records in %.1fs of processing (%s/s), start-up %.1fs, wall %.1fs%s", label,
                 f"{row['records']:,}", row["processing_seconds"], f"{row['records_per_second'] or 0:,}",
                 row["startup_seconds"], row["wall_seconds"],
                 f", executors {row['executors']['worker_cores']}" if row["executors"] else "")
        rows.append(row)
    return rows


def speedups(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stage, the row the others are compared with: W=0 P=2, else the stage's first row."""
    references = {}
    for stage in STAGES:
        mine = [r for r in rows if r["stage"] == stage]
        if not mine:
            continue
        reference = next((r for r in mine if r["workers"] == 0 and r["partitions"] == 2), mine[0])
        references[stage] = {"partitions": reference["partitions"], "workers": reference["workers"]}
        for r in mine:
            rate, base = r["records_per_second"], reference["records_per_second"]
            r["speedup"] = round(rate / base, 2) if rate and base else None
    return references


def markdown(rows: list[dict[str, Any]], references: dict[str, dict[str, Any]]) -> str:
    lines = ["| stage | partitions | shape | records | records/s | processing s | start-up s | wall s | speed-up "
             "| executors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        executors = ", ".join(f"{name.rsplit(':', 1)[-1]}: {cores}" for name, cores in
                              sorted(r["executors"]["worker_cores"].items())) if r["executors"] else "driver"
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "-"
        lines.append(f"| {r['stage']} | {r['partitions']} | {r['shape']} | {r['records']:,} | "
                     f"{r['records_per_second'] or 0:,} | {r['processing_seconds']:.1f} | {r['startup_seconds']:.1f} | "
                     f"{r['wall_seconds']:.1f} | {speedup} | {executors} |")
    notes = "; ".join(f"{stage} vs P={ref['partitions']} {shape_label(ref['workers'])}"
                      for stage, ref in references.items())
    return "\n".join(lines) + f"\n\nspeed-up: {notes}. executors: worker UI port: cores lent (the master's JSON)."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000, help="transactions to generate per partition count")
    parser.add_argument("--partitions", type=int_list, default=[2, 4, 8], help="Kafka partition counts (default 2,4,8)")
    parser.add_argument("--workers", type=int_list, default=[0, 1, 2],
                        help="Spark shapes: 0 = local[2], W = W standalone workers, one 1-core executor each")
    parser.add_argument("--output-dir", type=Path, default=PROJECT_ROOT / "bench" / "results")
    parser.add_argument("--executor-java-options", default="",
                        help="spark.executor.extraJavaOptions of the standalone runs (e.g. "
                             "-XX:-DontCompileHugeMethods, which local[2] gets through the driver's options and "
                             "databricks.yml sets on clusters; default: none, as local.mode=cluster runs)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (lakes, job logs)")
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix=f"scaling-{run_id}-"))
    log.info("scaling run %s in %s: %d transactions, partitions %s, workers %s", run_id, root, args.count,
             args.partitions, args.workers)
    results: dict[str, Any] = {"run": run_id, "argv": [sys.executable, *sys.argv], "commit": git_commit(),
                               "machine": machine(), "count": args.count, "partitions": args.partitions,
                               "workers": args.workers, "view": VIEW, "runs": [], "produced": {}}
    # As many workers as the largest shape needs (cluster_overrides' default is 2).
    spark_workers = max(args.workers)
    # Absolute paths: a run's conf folder is in the temporary folder, and relative paths resolve
    # against a conf folder's parent.
    overrides = deep_merge(cluster_overrides({}, root / "services"), {
        "local": {"spark_workers": spark_workers}, "spark": {"jars_dir": str(JARS_ROOT / "spark")},
        "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow/mlflow.db", "artifact_location": str(root / "mlflow")}})
    settings = load_settings("local", PROJECT_ROOT / "conf", overrides)
    results["settings"] = {"max_offsets_per_trigger": settings.ingest.max_offsets_per_trigger,
                           "shuffle_partitions": settings.spark.shuffle_partitions,
                           "driver_memory": settings.spark.driver_memory, "spark_workers": spark_workers,
                           "spark_worker_cores": settings.local.spark_worker_cores,
                           "spark_executor_memory": settings.local.spark_executor_memory,
                           "replication_factor": 3, "executor_java_options": args.executor_java_options}
    spec = GeneratorSpec(count=args.count, seed=20)
    results["generator"] = json.loads(json.dumps(dataclasses.asdict(spec), default=str))
    fetch("kafka", JARS_ROOT)
    fetch("spark", JARS_ROOT)
    platform = LocalPlatform(settings.local, jars_root=JARS_ROOT, with_registry=False, with_cdc=False)
    failed = None
    try:
        started = time.monotonic()
        platform.up()
        results["platform_start_seconds"] = round(time.monotonic() - started, 1)
        log.info("platform up in %.1fs: %s", results["platform_start_seconds"],
                 ", ".join(f"{s.name} {s.pid()}" for s in platform.core_services))
        for partitions in args.partitions:
            make = isolation(overrides, root / f"p{partitions}")
            topics = make(partitions=partitions)
            started = time.monotonic()
            sent = produce(generate(spec), topics.kafka.producer_properties(), topic_names=topic_names(topics))
            results["produced"][partitions] = {"seconds": round(time.monotonic() - started, 1), **sent.to_dict()}
            log.info("P=%d: produced %s records (%s) in %.1fs", partitions,
                     f"{sum(sent.sent(t) for t in topics.ingest.topics):,}",
                     ", ".join(f"{t}: {sent.sent(t):,}" for t in topics.ingest.topics), time.monotonic() - started)
            for workers in args.workers:
                results["runs"] += measure(make, topics, sent, partitions, workers,
                                           root / f"p{partitions}" / f"w{workers}", run_id, platform.spark_master,
                                           args.executor_java_options)
    except RunFailed as failure:
        failed = str(failure)
    finally:
        platform.down()
    results["machine"]["load_average_end"] = os.getloadavg()
    results["seconds"] = round(time.monotonic() - began, 1)
    results["references"] = speedups(results["runs"])
    if failed:
        results["failed"] = failed
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"scaling-{run_id}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    if results["runs"]:
        print(f"\n{args.count:,} transactions per partition count; {host.node()}, {os.cpu_count()} cores\n")
        print(markdown(results["runs"], results["references"]))
    print(f"\nresults: {out} ({results['seconds']:.0f}s in all)")
    if failed:
        print(f"scaling: error: {failed}\n(kept {root})", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
