"""Trailing corrections: the trailing feature stream before and after corrections, on in-order and disordered input.

Commit 075d2cb made the trailing processor emit corrected rows for stored events whose
interval holds a newly arrived earlier event. This script measures, in one run, what that costs:

* **before**: the feature job of the commit before it (``--before``, default 850b3ec);
* **after**: the feature job of ``--after`` (default HEAD, the current commit).

Each version runs from a detached ``git worktree`` of its commit (``PYTHONPATH`` and working
directory in the tree, this venv's interpreter, the jars of ``.local/jars/spark``), so neither
measures uncommitted edits of the working tree; both worktrees are removed at the end, also on
failure.

Method:

1. Two datasets from the project's generator, each in fresh topics: **in-order** (no late,
   out-of-order, duplicate or bad records) and **disordered** (the same, but
   ``out_of_order_rate`` 0.05: 5% of the transactions up to 2 minutes behind the stream).
   Labels (30% of the transactions, 1 h - 1 d later) are in order in both.
2. Each dataset is ingested once to bronze by the *after* tree's ingest jobs (``availableNow``,
   both datasets at once, not timed) in batches of ``--batch-records`` Kafka records and with one
   shuffle partition, so that each bronze file holds one ingest batch's events of one date. The
   topics have one partition (``--partitions``): an ingest batch of a multi-partition backlog
   takes about as many records from each partition, which cover different stretches of event
   time, so the next feature batch holds events more than the allowed lateness (10 minutes)
   behind the previous batch's newest, and the trailing processor leaves them out (both
   versions alike; rewriting them is the late recompute's job): 1.5% of the events in a trial
   with 4 partitions, and the runs would not compare all events.
3. For every (version, dataset) run: the dataset's bronze is copied into a fresh lake and the
   version's ``jobs/features.py --views account_velocity,account_fraud_history --available-now``
   runs as a subprocess, with a generated conf folder (fresh lake, topics, Redis namespace;
   ``features.max_files_per_trigger`` 1). One bronze file per micro-batch keeps each account's
   events in arrival order across micro-batches (several files per batch could split one ingest
   batch and reorder an account's events), the way a live stream takes one ingest commit at a
   time (an ingest batch across midnight gives two files, taken in date order). Order: in-order
   before, after, repeated ``--rounds`` times (interleaved, to show the
   noise), then disordered before, after.
4. **Time** = the sum of the job's own per-batch durations (its ``<query> batch N: R rows in
   S.Ss`` log lines, both queries, which run concurrently), so the JVM start-up and the query
   set-up are not counted; the process's wall clock is recorded too. ``events/s`` = bronze
   events / batch seconds. **Steady** leaves out each query's first batch (it pays the JVM's
   and the Python workers' warm-up): its input rows / its seconds.
5. **Checks** (a Spark session in this process, after all timed runs): every run read every
   bronze event and left none out behind the watermark; on in-order input all runs wrote identical
   feature rows (``computed_at`` aside; an exact multiset comparison) and the after version
   wrote no correction; for every run, the latest-``computed_at`` row of each (account, event
   time) is compared with the batch transform (``trailing_features``) over the same bronze
   (doubles to 1e-9 relative): a mismatch is an event whose latest row differs. In-order input
   and the after version must have none; the before version's mismatches on disordered input
   are the rows corrections fix. Any failed check raises.

Results go to ``bench/results/corrections-<time>.json`` and a table on stdout.

Usage: python bench/trailing_corrections.py --env local [--count 80000] [--accounts 1000]
       [--batch-records 20000] [--rounds 2] [--before 850b3ec] [--after HEAD]
(about 12 minutes on 2 cores at the defaults)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as host
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args
from pipelines.core.config import deep_merge, parse_overrides, read_yaml
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.settings import PROJECT_ROOT, Settings, load_settings
from pipelines.local.generator import GeneratorSpec, generate, produce
from pipelines.online.store import redis_client

log = logging.getLogger("bench")
VIEWS = ("account_velocity", "account_fraud_history")
DATASETS = ("in-order", "disordered")
JARS_DIR = PROJECT_ROOT / ".local" / "jars" / "spark"
#: The feature job's per-batch line (pipelines/features/metrics.py, unchanged since 850b3ec).
BATCH_LINE = re.compile(
    r"(?P<query>features_\w+) batch (?P<batch>\d+): (?P<rows>[\d,]+) rows in (?P<seconds>[\d.]+)s, "
    r"feature rows (?P<feature_rows>[\d,?]+), .*dropped by watermark (?P<dropped>[\d,?]+)"
)
#: The trailing processor's own drop (pipelines/features/trailing_state.py, both versions).
LEFT_OUT_LINE = re.compile(r"view (?P<view>\w+): (?P<events>\d+) events of .* behind the watermark left out")
JOB_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Dataset:
    name: str
    tx: str
    lb: str
    spec: GeneratorSpec
    transactions: int = 0
    labels: int = 0

    @property
    def events(self) -> int:
        return self.transactions + self.labels


@dataclass
class QueryTime:
    batches: int = 0
    input_rows: int = 0
    feature_rows: int = 0
    dropped_by_watermark: int = 0
    #: Events the trailing processor left out behind the watermark (its warnings).
    left_out: int = 0
    seconds: float = 0.0
    first_batch_rows: int = 0
    first_batch_seconds: float = 0.0


@dataclass
class Run:
    dataset: str
    version: str
    round: int
    lake: str
    log: str
    wall_seconds: float = 0.0
    #: The machine's 1-minute load average when the run started and ended (other work shows here).
    load: tuple[float, float] = (0.0, 0.0)
    queries: dict[str, QueryTime] = field(default_factory=dict)
    #: Filled by the checks.
    rows_written: int = 0
    rows_by_view: dict[str, int] = field(default_factory=dict)
    mismatches_by_view: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.dataset}-{self.version}-{self.round}"

    @property
    def batch_seconds(self) -> float:
        return round(sum(q.seconds for q in self.queries.values()), 1)

    @property
    def steady(self) -> tuple[int, float]:
        """Input rows and seconds of every batch but each query's first."""
        return (sum(q.input_rows - q.first_batch_rows for q in self.queries.values()),
                round(sum(q.seconds - q.first_batch_seconds for q in self.queries.values()), 1))


def git(*args: str, cwd: Path = PROJECT_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def add_worktree(commit: str, dest: Path) -> None:
    git("worktree", "add", "--detach", str(dest), commit)
    # Fail now, not after the runs, if the tree's own package is not what its jobs import.
    found = subprocess.run([sys.executable, "-c", "import pipelines; print(pipelines.__file__)"], cwd=dest,
                           env=tree_env(dest), check=True, capture_output=True, text=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(dest.resolve()):
        raise RuntimeError(f"{dest}: its jobs would import {found}, not the worktree's package")


def remove_worktrees(trees: list[Path]) -> None:
    for tree in trees:
        if tree.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=PROJECT_ROOT, check=False)
    subprocess.run(["git", "worktree", "prune"], cwd=PROJECT_ROOT, check=False)


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a job of ``tree``: its package first on the path (driver and Spark's
    Python workers, which inherit ``PYTHONPATH``), this venv's interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    env["PYTHONPATH"] = str(tree)
    return env


def write_conf(tree: Path, dest: Path, env: str, overrides: dict[str, Any]) -> Path:
    """A copy of ``tree``'s conf folder whose ``<env>.yaml`` has ``overrides`` merged in (as
    tests/support.py's ``conf_dir``). Paths in ``overrides`` must be absolute: relative ones would
    resolve against the copy's parent."""
    shutil.copytree(tree / "conf", dest)
    env_file = dest / f"{env}.yaml"
    env_file.write_text(yaml.safe_dump(deep_merge(read_yaml(env_file), overrides)))
    return dest


def run_job(tree: Path, job: str, conf: Path, env: str, log_path: Path, *extra: str) -> float:
    """``tree``'s ``jobs/<job>.py`` as a subprocess (a process group of its own), output to
    ``log_path``; its wall-clock seconds. Raises on a non-zero exit (the log's tail shown)."""
    command = [sys.executable, f"jobs/{job}.py", "--env", env, "--conf-dir", str(conf), *extra]
    started = time.monotonic()
    with open(log_path, "wb") as out:
        process = subprocess.Popen(command, cwd=tree, env=tree_env(tree), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=JOB_TIMEOUT)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)  # its JVM exits with it (its stdin closes)
            process.wait()
            raise
    elapsed = time.monotonic() - started
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{tree.name}: jobs/{job}.py exited {code} (log {log_path}):\n{tail}")
    return elapsed


def parse_batches(log_path: Path) -> dict[str, QueryTime]:
    """Per query: batches, input rows, feature rows, rows dropped by the watermark, and the sum of
    the batch durations, from the job's per-batch log lines."""
    queries: dict[str, QueryTime] = defaultdict(QueryTime)
    seen: set[tuple[str, int]] = set()

    def number(text: str) -> int:
        return 0 if text == "?" else int(text.replace(",", ""))

    for line in log_path.read_text(errors="replace").splitlines():
        if left_out := LEFT_OUT_LINE.search(line):
            queries[f"features_{left_out['view']}"].left_out += int(left_out["events"])
            continue
        match = BATCH_LINE.search(line)
        if not match:
            continue
        key = (match["query"], int(match["batch"]))
        if key in seen:
            raise RuntimeError(f"{log_path}: {key} logged twice")
        seen.add(key)
        q = queries[match["query"]]
        q.batches += 1
        q.input_rows += number(match["rows"])
        q.feature_rows += number(match["feature_rows"])
        q.dropped_by_watermark += number(match["dropped"])
        q.seconds += float(match["seconds"])
        if key[1] == 0:
            q.first_batch_rows, q.first_batch_seconds = number(match["rows"]), float(match["seconds"])
    return dict(queries)


def dataset_overrides(ds: Dataset, root: Path, partitions: int) -> dict[str, Any]:
    return {
        "kafka": {"topics": {ds.tx: {"contract": "transactions", "partitions": partitions, "replication_factor": 1},
                             ds.lb: {"contract": "labels", "partitions": partitions, "replication_factor": 1}}},
        "ingest": {"topics": [ds.tx, ds.lb]},
        "storage": {"root": str(root)},
        "spark": {"jars_dir": str(JARS_DIR)},
    }


def check_runs(settings: Settings, runs: list[Run], datasets: dict[str, Dataset], bronze: dict[str, str],
               results: dict[str, Any]) -> None:
    """The checks of the module docstring, on the finished runs' tables; raises on a failure."""
    from pyspark.sql import DataFrame, Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, FloatType

    from pipelines.core.session import build_session
    from pipelines.core.view_spec import event_time_column
    from pipelines.features.transforms import trailing_features

    spark = build_session(settings.spark)
    views = {name: settings.views[name] for name in VIEWS}
    topic_of = {"account_velocity": "tx", "account_fraud_history": "lb"}

    def bronze_table(ds: Dataset, view: str) -> DataFrame:
        return spark.read.format("delta").load(f"{bronze[ds.name]}/bronze/{getattr(ds, topic_of[view])}")

    def per_key(rows: DataFrame, key: list[str], features: list[str]) -> DataFrame:
        # Rows of one key (account, event time) are equal in the batch transform; ``first`` of each.
        return rows.groupBy(*key).agg(F.count(F.lit(1)).alias("_n"), *[F.first(c).alias(c) for c in features])

    def mismatches(streamed: DataFrame, expected: DataFrame, view: str) -> int:
        """Events whose latest-computed_at streamed row differs from the batch transform's."""
        v = views[view]
        key = [v.entity, event_time_column(v)]
        latest = (streamed.withColumn("_latest", F.max("computed_at").over(Window.partitionBy(*key)))
                  .filter(F.col("computed_at") == F.col("_latest")))
        features = [c for c in expected.columns if c not in key]
        doubles = {f.name for f in expected.schema.fields if isinstance(f.dataType, (DoubleType, FloatType))}
        a = per_key(latest.select(*expected.columns), key, features).alias("a")
        b = per_key(expected, key, features).alias("b")
        differs = F.col("a._n").isNull() | F.col("b._n").isNull() | (F.col("a._n") != F.col("b._n"))
        for c in features:
            x, y = F.col(f"a.{c}"), F.col(f"b.{c}")
            if c in doubles:
                close = (x.isNull() & y.isNull()) | (F.abs(x - y) <= F.greatest(F.lit(1.0), F.abs(y)) * 1e-9)
                differs = differs | ~F.coalesce(close, F.lit(False))
            else:
                differs = differs | ~x.eqNullSafe(y)
        joined = a.join(b, on=key, how="full_outer").filter(differs)
        return int(joined.agg(F.sum(F.coalesce(F.col("b._n"), F.col("a._n")))).first()[0] or 0)

    expected: dict[tuple[str, str], DataFrame] = {}
    for ds in datasets.values():
        for view in VIEWS:
            frame = trailing_features(bronze_table(ds, view), views[view]).cache()
            events = frame.count()
            assert events == bronze_table(ds, view).count(), (ds.name, view, "batch transform rows != bronze events")
            expected[(ds.name, view)] = frame
        bronze_events = sum(bronze_table(ds, v).count() for v in VIEWS)
        assert bronze_events == ds.events, (ds.name, "bronze holds", bronze_events, "events, generator sent", ds.events)

    reference: dict[str, DataFrame] = {}
    for run in runs:
        ds = datasets[run.dataset]
        for query, q in run.queries.items():
            assert q.dropped_by_watermark == q.left_out == 0, \
                (run.label, query, q.dropped_by_watermark, q.left_out, "dropped / left out behind the watermark")
        read = {query: q.input_rows for query, q in run.queries.items()}
        assert read == {"features_account_velocity": ds.transactions, "features_account_fraud_history": ds.labels}, \
            (run.label, "read", read)
        for view in VIEWS:
            table = spark.read.format("delta").load(f"{run.lake}/features/{view}")
            run.rows_by_view[view] = table.count()
            logged = run.queries[f"features_{view}"].feature_rows
            assert run.rows_by_view[view] == logged, (run.label, view, run.rows_by_view[view], "rows, logged", logged)
            run.mismatches_by_view[view] = mismatches(table, expected[(ds.name, view)], view)
            if run.dataset == "in-order":
                # Every in-order run must write the very same rows (computed_at aside): exact.
                rows = table.drop("computed_at")
                if view not in reference:
                    reference[view] = rows.cache()
                else:
                    left = rows.exceptAll(reference[view].select(*rows.columns)).count()
                    right = reference[view].select(*rows.columns).exceptAll(rows).count()
                    assert left == right == 0, (run.label, view, f"{left} + {right} rows differ from the first run")
        run.rows_written = sum(run.rows_by_view.values())
        log.info("%s: %d rows written, %s mismatches vs the batch transform", run.label, run.rows_written,
                 run.mismatches_by_view)
        if run.dataset == "in-order" or run.version == "after":
            assert not any(run.mismatches_by_view.values()), (run.label, "differs from the batch", run.mismatches_by_view)
        if run.dataset == "in-order" or run.version == "before":
            assert run.rows_written == ds.events, (run.label, run.rows_written, "rows for", ds.events, "events")
    results["checks"] = ("passed: every run read all bronze events, none left out behind the watermark; in-order runs "
                         "wrote identical rows (computed_at aside), one per event; the after version's latest rows "
                         "equal the batch transform on both datasets")
    spark.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--count", type=int, default=80_000, help="transactions to generate per dataset")
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--partitions", type=int, default=1, help="of each topic (see the docstring)")
    parser.add_argument("--batch-records", type=int, default=20_000,
                        help="Kafka records per ingest batch, so per bronze file and feature micro-batch")
    parser.add_argument("--rounds", type=int, default=2, help="in-order before/after pairs, interleaved")
    parser.add_argument("--out-of-order-rate", type=float, default=0.05, help="of the disordered dataset")
    parser.add_argument("--before", default="850b3ec", help="commit without corrections")
    parser.add_argument("--after", default="HEAD", help="commit with corrections")
    parser.add_argument("--keep", action="store_true", help="keep the lakes, conf folders and job logs")
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    root = PROJECT_ROOT / ".local" / "bench" / f"corrections-{run_id}"
    (root / "logs").mkdir(parents=True)
    settings = settings_from_args(args)
    user_overrides = parse_overrides(args.set)
    commits = {"before": git("rev-parse", f"{args.before}^{{commit}}"),
               "after": git("rev-parse", f"{args.after}^{{commit}}")}
    dirty = git("status", "--porcelain", "--", "pipelines", "jobs", "conf")
    trees_dir = Path(tempfile.mkdtemp(prefix="bench-corrections-"))
    trees = {version: trees_dir / version for version in commits}
    namespaces: list[str] = []
    topics: list[str] = []
    load_at_start = os.getloadavg()
    ok = False
    try:
        for version, commit in commits.items():
            add_worktree(commit, trees[version])
        log.info("worktrees: %s", {v: f"{c[:7]} at {trees[v]}" for v, c in commits.items()})

        # 1. Two datasets, the same seed and end time, in fresh topics.
        end = datetime.now(timezone.utc).replace(microsecond=0)
        datasets: dict[str, Dataset] = {}
        for name in DATASETS:
            short = "io" if name == "in-order" else "ooo"
            spec = GeneratorSpec(count=args.count, accounts=args.accounts, seed=3, end=end, late_rate=0.0,
                                 out_of_order_rate=0.0 if name == "in-order" else args.out_of_order_rate,
                                 duplicate_rate=0.0, bad_rate=0.0, label_rate=0.3,
                                 label_delay=(timedelta(hours=1), timedelta(days=1)))
            ds = Dataset(name, f"bench_tc_{short}_tx_{run_id.lower()}", f"bench_tc_{short}_lb_{run_id.lower()}", spec)
            topic_settings = load_settings(settings.env, args.conf_dir,
                                           deep_merge(user_overrides, dataset_overrides(ds, root, args.partitions)))
            topics += [ds.tx, ds.lb, topic_settings.kafka.dlq_topic_for(ds.tx), topic_settings.kafka.dlq_topic_for(ds.lb)]
            ensure_topics(settings.kafka.client_properties(), [TopicSpec(t, args.partitions, 1) for t in topics[-4:]])
            sent = produce(generate(spec), settings.kafka.client_properties(),
                           topic_names={"transactions": ds.tx, "labels": ds.lb})
            datasets[name] = Dataset(ds.name, ds.tx, ds.lb, spec, sent.sent(ds.tx), sent.sent(ds.lb))
            log.info("%s: produced %d transactions and %d labels (%s)", name, sent.sent(ds.tx), sent.sent(ds.lb),
                     dict(sent.counts[ds.tx]))

        # 2. Each dataset to bronze, once, by the after tree's ingest (not timed).
        bronze: dict[str, str] = {}
        ingests = []
        for ds in datasets.values():
            bronze[ds.name] = str(root / f"ingest-{ds.name}")
            namespaces.append(f"bench-tc-{run_id}-ingest-{ds.name}")
            conf = write_conf(trees["after"], root / "conf" / f"ingest-{ds.name}", settings.env, deep_merge(
                deep_merge(user_overrides, dataset_overrides(ds, Path(bronze[ds.name]), args.partitions)),
                {"ingest": {"max_offsets_per_trigger": args.batch_records},
                 "spark": {"shuffle_partitions": 1}, "redis": {"namespace": namespaces[-1]}}))
            ingests.append((trees["after"], "ingest", conf, settings.env, root / "logs" / f"ingest-{ds.name}.log",
                            "--available-now"))
        with ThreadPoolExecutor(len(ingests)) as pool:
            seconds = list(pool.map(lambda job: run_job(*job), ingests))
        for ds, took in zip(datasets.values(), seconds):
            files = sorted(Path(bronze[ds.name], "bronze").rglob("*.parquet"))
            log.info("%s: bronze written in %.0f s, %d files", ds.name, took, len(files))

        # 3. The timed feature runs: in-order pairs interleaved, then the disordered pair.
        order = [("in-order", v, r) for r in range(1, args.rounds + 1) for v in ("before", "after")]
        order += [("disordered", v, 1) for v in ("before", "after")]
        runs: list[Run] = []
        for dataset, version, round_ in order:
            ds = datasets[dataset]
            lake = root / f"lake-{dataset}-{version}-{round_}"
            run = Run(dataset, version, round_, str(lake), str(root / "logs" / f"features-{dataset}-{version}-{round_}.log"))
            for topic in (ds.tx, ds.lb):
                shutil.copytree(Path(bronze[dataset], "bronze", topic), lake / "bronze" / topic)
            namespaces.append(f"bench-tc-{run_id}-{run.label}")
            conf = write_conf(trees[version], root / "conf" / run.label, settings.env, deep_merge(
                deep_merge(user_overrides, dataset_overrides(ds, lake, args.partitions)),
                {"features": {"max_files_per_trigger": 1}, "redis": {"namespace": namespaces[-1]}}))
            load = os.getloadavg()[0]
            run.wall_seconds = round(run_job(trees[version], "features", conf, settings.env, Path(run.log),
                                             "--views", ",".join(VIEWS), "--available-now"), 1)
            run.load = (round(load, 2), round(os.getloadavg()[0], 2))
            run.queries = parse_batches(Path(run.log))
            assert set(run.queries) == {f"features_{v}" for v in VIEWS}, (run.label, "queries logged", set(run.queries))
            runs.append(run)
            log.info("%s: %.1f batch seconds (%s), %.1f s wall clock, load %s", run.label, run.batch_seconds,
                     {k: (q.batches, round(q.seconds, 1)) for k, q in run.queries.items()}, run.wall_seconds, run.load)

        # 4. Checks, untimed, in this process.
        results: dict[str, Any] = {
            "run": run_id, "count": args.count, "accounts": args.accounts, "partitions": args.partitions,
            "batch_records": args.batch_records, "out_of_order_rate": args.out_of_order_rate, "views": list(VIEWS),
            "commits": commits, "working_tree_changes_not_measured": dirty.splitlines(),
            "datasets": {ds.name: {"transactions": ds.transactions, "labels": ds.labels, "events": ds.events,
                                   "topics": [ds.tx, ds.lb]} for ds in datasets.values()},
            "machine": {"cpus": os.cpu_count(), "python": host.python_version(), "system": host.platform(),
                        "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        }
        check_runs(settings, runs, datasets, bronze, results)

        # 5. Figures.
        def rate(run: Run) -> float:
            return datasets[run.dataset].events / run.batch_seconds

        def steady_rate(run: Run) -> float:
            steady_rows, steady_seconds = run.steady
            return steady_rows / steady_seconds

        def best(dataset: str, version: str, measure: Callable[[Run], float] = rate) -> Run:
            return max((r for r in runs if r.dataset == dataset and r.version == version), key=measure)

        def ratio(run: Run, measure: Callable[[Run], float] = rate) -> float:
            """vs the best in-order run of before (in-order rows) or of its own version (disordered)."""
            base = best("in-order", "before" if run.dataset == "in-order" else run.version, measure)
            return measure(run) / measure(base)

        rows = []
        for run in runs:
            ds = datasets[run.dataset]
            steady_rows, steady_seconds = run.steady
            rows.append({**asdict(run), "label": run.label, "events": ds.events, "batch_seconds": run.batch_seconds,
                         "corrections": run.rows_written - ds.events, "events_per_second": round(rate(run)),
                         "ratio": round(ratio(run), 3),
                         "steady_rows": steady_rows, "steady_seconds": steady_seconds,
                         "steady_events_per_second": round(steady_rate(run)),
                         "steady_ratio": round(ratio(run, steady_rate), 3),
                         "ratio_vs": "in-order before (best)" if run.dataset == "in-order" else
                                     f"in-order {run.version} (best)"})
        results["runs"] = rows
        in_order = {v: [r for r in runs if r.dataset == "in-order" and r.version == v] for v in ("before", "after")}
        pairs = [rate(a) / rate(b) for b, a in zip(in_order["before"], in_order["after"])]
        in_order_ratio = rate(best("in-order", "after")) / rate(best("in-order", "before"))
        steady_ratio = steady_rate(best("in-order", "after", steady_rate)) / steady_rate(
            best("in-order", "before", steady_rate))
        results["in_order_after_vs_before"] = {"best": round(in_order_ratio, 3),
                                               "per_round": [round(p, 3) for p in pairs],
                                               "steady_best": round(steady_ratio, 3),
                                               "criterion_0_9": in_order_ratio >= 0.9}
        results["disordered_vs_in_order_after"] = round(ratio(best("disordered", "after")), 3)
        out = PROJECT_ROOT / "bench" / "results" / f"corrections-{run_id}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))

        print(f"\n{args.count:,} transactions per dataset, {args.accounts:,} accounts, "
              f"{args.batch_records:,} records per ingest batch, one bronze file per micro-batch; views "
              f"{', '.join(VIEWS)}; before = {commits['before'][:7]}, after = {commits['after'][:7]}\n")
        print("| dataset | version | run | events | rows written | corrections | mismatches vs batch | batch s | "
              "wall s | events/s | ratio | steady events/s | steady ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['dataset']} | {row['version']} ({commits[row['version']][:7]}) | {row['round']} | "
                  f"{row['events']:,} | {row['rows_written']:,} | {row['corrections']:,} | "
                  f"{sum(row['mismatches_by_view'].values()):,} | {row['batch_seconds']} | {row['wall_seconds']} | "
                  f"{row['events_per_second']:,} | {row['ratio']:.2f}x | {row['steady_events_per_second']:,} | "
                  f"{row['steady_ratio']:.2f}x |")
        verdict = "holds" if in_order_ratio >= 0.9 else "DOES NOT hold"
        print(f"\nratio: in-order rows vs the best in-order before run, disordered rows vs the best in-order run of "
              f"their version. In order: after/before {in_order_ratio:.2f}x, best of {args.rounds} (per round "
              f"{', '.join(f'{p:.2f}x' for p in pairs)}; steady {steady_ratio:.2f}x): the >= 0.9x criterion "
              f"{verdict}. Disordered/in-order (after): {results['disordered_vs_in_order_after']:.2f}x.\n"
              f"checks {results['checks']}. results: {out}")
        ok = True
        return 0
    finally:
        remove_worktrees(list(trees.values()))
        shutil.rmtree(trees_dir, ignore_errors=True)
        client = redis_client(settings.redis)
        for namespace in namespaces:
            for key in client.scan_iter(f"{namespace}:*", count=1000):
                client.unlink(key)
        if topics:
            from confluent_kafka.admin import AdminClient

            admin = AdminClient(settings.kafka.client_properties())  # held: its futures die with it
            for future in admin.delete_topics(topics, operation_timeout=30).values():
                future.exception()  # wait; a topic that is already gone is no matter
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            log.info("lakes, conf folders and job logs kept in %s", root)


if __name__ == "__main__":
    sys.exit(main())
