"""What tests share: small builders for test data (Kafka-shaped rows and contract events, written
out by hand), a stream fed step by step, conf folders with a changed contract, free ports, and
the isolation of one test's topics, lake and Redis namespace, jobs run as subprocesses."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.config import deep_merge, read_yaml
from pipelines.core.kafka_admin import ensure_topics, platform_topics
from pipelines.core.settings import PROJECT_ROOT, Settings, load_settings
from pipelines.core.times import utc_assuming_local
from pipelines.core.view_spec import event_time_column, feature_names
from pipelines.features.sinks import latest_per_entity
from pipelines.local.generator import Record
from pipelines.online.store import entity_from_key, read_online

KAFKA_SCHEMA = (
    "key binary, value binary, topic string, partition int, offset long, timestamp timestamp, "
    "headers array<struct<key:string,value:binary>>"
)

#: The batch time every Spark-level validation test runs at.
BATCH_TIME = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)


def utc(text: str) -> datetime:
    """``'2026-11-23 11:59:00'`` -> aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def naive(text: str) -> datetime:
    """A wall time as PySpark returns it from ``collect()``: naive, in the process's local zone
    (UTC in the tests; Spark reads naive datetimes given to ``createDataFrame`` in that zone too)."""
    return datetime.fromisoformat(text)


def transaction(**changes: Any) -> dict[str, Any]:
    """A valid transactions event at 11:59 UTC, with ``changes`` applied (None deletes a key
    only when passed as ``_drop=[...]``)."""
    event = {
        "transaction_id": "tx-1",
        "account_id": "acct-1",
        "merchant_id": "merch-1",
        "amount_usd": 12.5,
        "merchant_category_code": "5411",
        "balance_usd": 100.0,
        "device_fingerprint": "abc123",
        "event_time": "2026-11-23T11:59:00Z",
    }
    for key in changes.pop("_drop", []):
        del event[key]
    event.update(changes)
    return event


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def kafka_row(value: bytes | None, offset: int, partition: int = 0, key: bytes = b"acct-1",
              topic: str = "transactions", timestamp: str = "2026-11-23 11:59:30",
              headers: list[tuple[str, bytes]] | None = None) -> tuple:
    return (key, value, topic, partition, offset, naive(timestamp), headers)


def run_stream_in_steps(spark, folder, schema: str, transform, steps, checkpoint: Path | None = None) -> list:
    """Feed each step's rows to a Parquet file stream as a new file, process it as its own
    micro-batch through ``transform`` into a memory table, and return every row emitted
    (``checkpoint``: the query's checkpoint folder, to read its state afterwards)."""
    folder.mkdir()
    stream = spark.readStream.schema(schema).option("recursiveFileLookup", "true").parquet(str(folder))
    name = f"stream_{time.time_ns()}"
    writer = transform(stream).writeStream.format("memory").queryName(name).outputMode("append")
    if checkpoint is not None:
        writer = writer.option("checkpointLocation", str(checkpoint))
    query = writer.start()
    try:
        for i, rows in enumerate(steps):
            spark.createDataFrame(rows, schema).coalesce(1).write.parquet(str(folder / f"step{i}"))
            query.processAllAvailable()
        return spark.table(name).collect()
    finally:
        query.stop()


def run_stream_batches(spark, folder, schema: str, transform, steps) -> list[list]:
    """Like :func:`run_stream_in_steps`, but the rows each micro-batch emitted, batch by batch
    (a correction is told from the row it corrects by the batch that emitted it)."""
    folder.mkdir()
    stream = spark.readStream.schema(schema).option("recursiveFileLookup", "true").parquet(str(folder))
    batches: dict[int, list] = {}
    query = transform(stream).writeStream.foreachBatch(
        lambda batch, batch_id: batches.__setitem__(batch_id, batch.collect())).start()
    try:
        for i, rows in enumerate(steps):
            spark.createDataFrame(rows, schema).coalesce(1).write.parquet(str(folder / f"step{i}"))
            query.processAllAvailable()
        return [batches[i] for i in sorted(batches)]
    finally:
        query.stop()


def contract_conf(dest, transactions_format: str = "avro", renames: dict[str, str] | None = None,
                  drop: tuple[str, ...] = (), add: tuple[str, ...] = (), with_views: bool = True):
    """A copy of the project's conf folder at ``dest`` whose transactions contract has
    ``transactions_format``, fields renamed (old -> new) or dropped, and YAML field lines
    ``add``-ed at the end; without the feature views when ``with_views`` is false (a renamed
    field breaks the views that read it)."""
    shutil.copytree(PROJECT_ROOT / "conf", dest)
    path = Path(dest) / "contracts" / "transactions.yaml"
    contract = yaml.safe_load(path.read_text())
    contract["format"] = transactions_format
    fields = [f for f in contract["fields"] if f["name"] not in drop]
    for f in fields:
        f["name"] = (renames or {}).get(f["name"], f["name"])
    contract["fields"] = fields + [yaml.safe_load(line) for line in add]
    path.write_text(yaml.safe_dump(contract, sort_keys=False))
    if not with_views:
        for view in (Path(dest) / "features").glob("*.yaml"):
            view.unlink()
    return Path(dest)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open together while they are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_low_ports(count: int, offset: int = 0, low: int = 12000, high: int = 22000) -> list[int]:
    """``count`` distinct free loopback ports below the kernel's ephemeral range, each with
    ``port + offset`` free too (a Redis Cluster node's bus port is its port + 10000: an
    ephemeral port plus 10000 may be out of range, or taken by a connection's own port)."""
    def free(port: int) -> bool:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return True
            except OSError:
                return False

    rng = random.Random()
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randrange(low, high)
        if port not in chosen and port + offset not in chosen and free(port) and (not offset or free(port + offset)):
            chosen.append(port)
    return chosen


def cluster_overrides(base_overrides: dict[str, Any], root: Path) -> dict[str, Any]:
    """``base_overrides`` in cluster mode (``local.mode: cluster``) on free ports, its services'
    data under ``root``: the settings then name the cluster's brokers, Redis nodes and Spark
    master."""
    kafka = free_ports(6)
    spark = free_low_ports(2)
    workers_ui = free_low_ports(1, offset=1)[0]  # the two workers' web UIs: this port and the next
    return deep_merge(base_overrides, {
        "local": {"mode": "cluster", "root": str(root),
                  "cluster_kafka_ports": kafka[:3], "cluster_kafka_controller_ports": kafka[3:],
                  "cluster_redis_ports": free_low_ports(6, offset=10000),
                  "spark_master_port": spark[0], "spark_master_ui_port": spark[1],
                  "spark_worker_ui_port": workers_ui, "spark_workers": 2},
    })


def isolation(base_overrides: dict[str, Any], folder: Path):
    """Build settings with fresh topics and a fresh lake under ``folder``.

    ``make(partitions=2, conf=None, **overrides)`` returns settings (from the ``conf`` folder,
    default the project's) whose ``transactions`` and ``labels`` topics are new, uniquely named topics (created, with their DLQ topics), whose storage root is
    ``folder/lake`` and whose Redis namespace is their own.
    """

    overrides_by_root: dict[str, tuple[Path, dict[str, Any]]] = {}

    def make(partitions: int = 2, conf: Path | None = None, **overrides: Any) -> Settings:
        suffix = uuid.uuid4().hex[:8]
        tx, lb = f"transactions_{suffix}", f"labels_{suffix}"
        tree = deep_merge(
            base_overrides,
            {
                "kafka": {"topics": {tx: {"contract": "transactions", "partitions": partitions,
                                          "replication_factor": 1},
                                     lb: {"contract": "labels", "partitions": partitions,
                                          "replication_factor": 1}}},
                "ingest": {"topics": [tx, lb]},
                "storage": {"root": str(folder / "lake")},
                # Tests share one Redis: each its own keys, so newer-wins never spans two tests.
                "redis": {"namespace": f"test-{suffix}"},
            },
        )
        tree = deep_merge(tree, overrides)
        conf = conf or PROJECT_ROOT / "conf"
        made = load_settings("local", conf, tree)
        overrides_by_root[made.storage.root] = (conf, tree)
        # The two topics and their dead-letter topics, replicated as the settings say (3 in cluster mode).
        own = {tx, lb, made.kafka.dlq_topic_for(tx), made.kafka.dlq_topic_for(lb)}
        ensure_topics(made.kafka.client_properties(), [s for s in platform_topics(made.kafka) if s.name in own])
        return made

    def conf_dir(made: Settings, dest: Path) -> Path:
        """A conf folder whose ``local`` environment is ``made``: for jobs run as subprocesses."""
        source, tree = overrides_by_root[made.storage.root]
        shutil.copytree(source, dest)
        local = deep_merge(read_yaml(dest / "local.yaml"), tree)
        (dest / "local.yaml").write_text(yaml.safe_dump(local))
        return dest

    make.conf_dir = conf_dir
    return make


def topic_names(settings: Settings) -> dict[str, str]:
    """Logical generator topic -> the isolated test topic."""
    tx, lb = settings.ingest.topics
    return {"transactions": tx, "labels": lb}


#: Python code that makes importing pyspark, delta or py4j fail: run it first in a subprocess to
#: show that what follows needs no Spark.
BLOCK_SPARK = """
import importlib.abc, sys

class NoSpark(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pyspark", "delta", "py4j"):
            raise ImportError(f"{name} is blocked: the read path must not need Spark")
        return None

sys.meta_path.insert(0, NoSpark())
"""


def delta_versions(table: str | Path) -> int:
    """Commits in a Delta table's log (0 when it does not exist yet)."""
    return len(list(Path(table, "_delta_log").glob("*.json")))


def start_job(job: str, conf_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    """``jobs/<job>.py`` as a process group of its own (the driver and, detached below it, the
    Spark JVM), output appended to ``log``."""
    out = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "jobs" / f"{job}.py"), "--env", "local", "--conf-dir", str(conf_dir), *extra],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )


def assert_online_equals_tables(spark, settings: Settings, views, client) -> int:
    """Redis holds, for every entity of each view's feature table, the table's latest row (its
    event time and every feature), and no entity the table lacks; returns the entities checked."""
    checked = 0
    for view in views:
        table = spark.read.format("delta").load(settings.storage.feature_path(view.name))
        latest = {r[view.entity]: r for r in latest_per_entity(table, view).collect()}
        names = feature_names(view)
        online = read_online(client, settings.redis.namespace, view.name, names, sorted(latest))
        for value in online:
            expected = latest[value["entity"]]
            assert value["event_time"] == utc_assuming_local(expected[event_time_column(view)]), (view.name, value)
            assert all(value[n] == expected[n] or abs(value[n] - expected[n]) < 1e-9 for n in names), \
                (view.name, value, expected)
        held = {entity_from_key(k, settings.redis.namespace, view.name)
                for k in client.scan_iter(f"{settings.redis.namespace}:{view.name}:*", count=1000)}
        assert held == {str(e) for e in latest}, (view.name, sorted(held ^ {str(e) for e in latest})[:10])
        checked += len(latest)
    return checked


def signal_group_when(job: subprocess.Popen, signum: int, condition, timeout: float = 240) -> int:
    """Send ``signum`` to the job's whole process group once ``condition()``; its exit code."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, "the job ended before the signal"
        assert time.monotonic() < deadline, "the job did not get there in time"
        time.sleep(0.05)
    os.killpg(job.pid, signum)
    return job.wait(timeout=300)


def kill_when(job: subprocess.Popen, condition, timeout: float = 240) -> None:
    """SIGKILL the job's whole process group (Python driver and Spark JVM) once ``condition()``."""
    signal_group_when(job, signal.SIGKILL, condition, timeout)


def wait_for(condition, timeout: float, what: str, job: subprocess.Popen | None = None) -> None:
    """Block until ``condition()``; fails naming ``what`` after ``timeout`` s, or if ``job`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert job is None or job.poll() is None, f"the job ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s"
        time.sleep(0.2)


def last_batch(checkpoint: str, log: str) -> int:
    """The highest batch id in a checkpoint's ``offsets`` (planned) or ``commits`` (done) log."""
    return max((int(p.name) for p in Path(checkpoint, log).iterdir() if p.name.isdigit()), default=-1)


def last_written_batch(table: str, query_id: str) -> int:
    """The highest ``txnVersion`` (batch id) the query committed to a Delta table (-1: none)."""
    versions = [-1]
    for commit in Path(table, "_delta_log").glob("*.json"):
        for line in commit.read_text().splitlines():
            txn = json.loads(line).get("txn")
            if txn and query_id in txn["appId"]:
                versions.append(txn["version"])
    return max(versions)


def assert_stopped_between_batches(checkpoint: str, *tables: str) -> None:
    """The query stopped between batches: the last planned batch is committed, or it is the one
    held at the gate, of which no table has a write."""
    query_id = json.loads(Path(checkpoint, "metadata").read_text().splitlines()[0])["id"]
    planned, committed = last_batch(checkpoint, "offsets"), last_batch(checkpoint, "commits")
    assert committed >= 0 and planned - committed in (0, 1), (checkpoint, planned, committed)
    for table in tables:
        assert last_written_batch(table, query_id) <= committed, (table, committed)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def clock_records(at: datetime, n: int) -> list[Record]:
    """One transaction and one label at ``at``: they move every view's watermark on. Both carry
    their event id, as the generator's valid records do, so that checks by id count them."""
    label = {"transaction_id": f"clock-{n}", "account_id": "acct-clock", "is_fraud": False, "label_time": iso(at)}
    return [Record("transactions", b"acct-clock", encode(transaction(transaction_id=f"clock-{n}", account_id="acct-clock",
                                                                    event_time=iso(at))), "valid",
                   event_id=f"clock-{n}"),
            Record("labels", b"acct-clock", json.dumps(label).encode(), "valid", event_id=f"clock-{n}")]


def rounded_rows(rows, columns) -> Counter:
    return Counter(tuple(float(f"{r[c]:.9g}") if isinstance(r[c], float) else r[c] for c in columns) for r in rows)


def unmatched_rows(actual: Counter, expected: Counter, rel_tol: float = 1e-8) -> tuple[list, list]:
    """The rows (tuples, as :func:`rounded_rows` makes them) of ``actual`` and of ``expected``
    that have no twin in the other, where floats need only agree to ``rel_tol``: two
    summation orders can put one value on either side of a rounding boundary (an average of
    68.18578125 rounds to ...812 or ...813)."""
    only_actual, only_expected = list((actual - expected).elements()), list((expected - actual).elements())
    for row in list(only_actual):
        twin = next((other for other in only_expected if len(other) == len(row) and all(
            math.isclose(a, b, rel_tol=rel_tol) if isinstance(a, float) and isinstance(b, float) else a == b
            for a, b in zip(row, other))), None)
        if twin is not None:
            only_actual.remove(row)
            only_expected.remove(twin)
    return only_actual, only_expected


def latest_rows(spark, path, view) -> tuple[Counter, list[str]]:
    """Per entity and time (and window start): the rows of the latest ``computed_at``, without it."""
    table = spark.read.format("delta").load(path)
    columns = sorted(c for c in table.columns if c != "computed_at")
    key = [view.entity, event_time_column(view)] + (["window_start"] if view.kind == "sliding" else [])
    groups: dict[tuple, list] = defaultdict(list)
    for row in table.collect():
        groups[tuple(row[k] for k in key)].append(row)
    latest = [r for rows in groups.values() for r in rows if r.computed_at == max(x.computed_at for x in rows)]
    return rounded_rows(latest, columns), columns
