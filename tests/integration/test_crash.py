"""Crash safety and stopping: the ingest (six times: a chosen instant and five random ones) and
the features job (twice) are SIGKILLed, driver and JVM together, mid-stream, and restarted; each
is also stopped the way a terminal's Ctrl-C or ``kill -- -PGID`` does (the signal reaches the
whole process group), which ends it after its current batch with exit 0. Every table ends up
with every row exactly once, the reconciliation job exits 0, and Redis holds the latest values
of the feature tables."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

from pyspark.sql import functions as F

from pipelines.core.settings import PROJECT_ROOT
from pipelines.core.times import utc_assuming_local
from pipelines.core.view_spec import event_time_column, feature_names
from pipelines.features.sinks import latest_per_entity
from pipelines.features.stream import run_features
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from pipelines.online.store import read_online, redis_client
from tests.support import delta_versions, start_job, topic_names


def kill_when(job: subprocess.Popen, condition, timeout: float = 240) -> None:
    """SIGKILL the job's whole process group (Python driver and Spark JVM) once ``condition()``."""
    signal_group_when(job, signal.SIGKILL, condition, timeout)


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


def signal_group_when(job, signum: int, condition, timeout: float = 240) -> int:
    """Send ``signum`` to the job's whole process group once ``condition()``; its exit code."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, "the job ended before the signal"
        assert time.monotonic() < deadline, "the job did not get there in time"
        time.sleep(0.05)
    os.killpg(job.pid, signum)
    return job.wait(timeout=300)


def assert_stopped_between_batches(checkpoint: str, *tables: str) -> None:
    """The query stopped between batches: the last planned batch is committed, or it is the one
    held at the gate, of which no table has a write."""
    query_id = json.loads(Path(checkpoint, "metadata").read_text().splitlines()[0])["id"]
    planned, committed = last_batch(checkpoint, "offsets"), last_batch(checkpoint, "commits")
    assert committed >= 0 and planned - committed in (0, 1), (checkpoint, planned, committed)
    for table in tables:
        assert last_written_batch(table, query_id) <= committed, (table, committed)


def test_sigkilled_at_random_points_and_stopped_the_ingest_loses_and_duplicates_nothing_and_reconciles(spark, isolated,
                                                                                           tmp_path):
    settings = isolated(ingest={"max_offsets_per_trigger": 300, "trigger_interval": "1s"})
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    spec = GeneratorSpec(count=6000, seed=21, span=timedelta(hours=12), bad_rate=0.04, duplicate_rate=0.03,
                         label_rate=0.3, label_delay=(timedelta(minutes=5), timedelta(hours=6)))
    records = list(generate(spec))
    sent = produce(records, settings.kafka.client_properties(), topic_names=topic_names(settings))
    tx_topic = settings.ingest.topics[0]
    bronze_path, dlq_path = settings.storage.bronze_path(tx_topic), settings.storage.dead_letter_path
    log = tmp_path / "ingest.log"
    kills = 0

    # The instant a dead-letter commit lands: between one batch's DLQ write and its checkpoint commit.
    dlq_before = delta_versions(dlq_path)
    kill_when(start_job("ingest", conf_dir, log), lambda: delta_versions(dlq_path) >= dlq_before + 2)
    kills += 1
    # Five random instants once a restarted job commits again (seeded: reproducible).
    rng = random.Random(7)
    for _ in range(5):
        before = delta_versions(bronze_path)
        job = start_job("ingest", conf_dir, log)
        kill_when(job, lambda: delta_versions(bronze_path) > before)
        time.sleep(rng.uniform(0.0, 2.5))
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        kills += 1
    assert kills >= 5
    # Ctrl-C in a terminal: SIGINT to the process group, mid-stream. The job ends after its batch.
    before = delta_versions(bronze_path)
    code = signal_group_when(start_job("ingest", conf_dir, log), signal.SIGINT,
                             lambda: delta_versions(bronze_path) > before)
    assert code == 0, log.read_text()[-5000:]
    for topic in settings.ingest.topics:
        assert_stopped_between_batches(settings.storage.checkpoint_path("ingest", topic),
                                       settings.storage.bronze_path(topic), dlq_path)
    assert spark.read.format("delta").load(bronze_path).count() < sent.expected_bronze(tx_topic)
    # Restart and run to the end of the topics, in larger batches than before the crashes.
    final = start_job("ingest", conf_dir, log, "--available-now", "--set", "ingest.max_offsets_per_trigger=100000")
    assert final.wait(timeout=600) == 0, log.read_text()[-5000:]
    assert "Traceback" not in log.read_text()

    for topic in settings.ingest.topics:
        bronze = spark.read.format("delta").load(settings.storage.bronze_path(topic))
        assert bronze.count() == sent.expected_bronze(topic)
        assert bronze.select("transaction_id").distinct().count() == sent.expected_bronze(topic)
        dead = spark.read.format("delta").load(dlq_path).filter(F.col("kafka_topic") == topic)
        assert dead.select("kafka_partition", "kafka_offset").distinct().count() == dead.count()
        assert Counter({r.error_class: r["count"] for r in dead.groupBy("error_class").count().collect()}) == \
            Counter(sent.expected_dead_letters(topic))
    # The operator's check: the reconciliation job, against what was sent, exits 0.
    summary = tmp_path / "sent.json"
    summary.write_text(json.dumps(sent.to_dict()))
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "reconcile.py"), "--env", "local",
                           "--conf-dir", str(conf_dir), "--expect", str(summary)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (status,) = [line.split() for line in done.stdout.splitlines() if line.startswith("status")]
    assert status == ["status", "OK", "OK"]


def feature_rows(spark, settings, view) -> Counter:
    table = spark.read.format("delta").load(settings.storage.feature_path(view.name)).drop("computed_at")
    return Counter(tuple(row) for row in table.collect())


def test_sigkilled_and_stopped_features_job_restarts_to_exact_tables_and_redis_equal_to_them(spark, isolated, tmp_path):
    # Few bronze files per micro-batch: the job works through many batches, so it dies mid-stream.
    settings = isolated(ingest={"max_offsets_per_trigger": 300},
                        features={"max_files_per_trigger": 2, "trigger_interval": "500ms"})
    spec = GeneratorSpec(count=2000, accounts=60, merchants=20, seed=44, span=timedelta(hours=8), label_rate=0.0)
    produce(generate(spec), settings.kafka.client_properties(), topic_names=topic_names(settings))
    run_ingest(spark, settings, available_now=True)
    views = [settings.views["account_velocity"], settings.views["merchant_hourly"]]
    # The reference: the same views over a copy of the same bronze, never interrupted.
    reference = dataclasses.replace(
        settings, storage=dataclasses.replace(settings.storage, root=str(tmp_path / "reference")),
        redis=dataclasses.replace(settings.redis, namespace=f"reference-{uuid.uuid4().hex[:8]}"))
    shutil.copytree(settings.storage.root, reference.storage.root)
    assert run_features(spark, reference, views, available_now=True) == 0

    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    velocity = settings.storage.feature_path("account_velocity")
    log = tmp_path / "features.log"
    selected = ("--views", "account_velocity,merchant_hourly")
    # Kill 1: after the third commit to a feature table, other batches in flight.
    kill_when(start_job("features", conf_dir, log, *selected), lambda: delta_versions(velocity) >= 3)
    # Kill 2: the instant a feature-table commit lands, before that batch's Redis write and
    # checkpoint commit: the restart must replay the batch without a second Delta append.
    before = delta_versions(velocity)
    kill_when(start_job("features", conf_dir, log, *selected), lambda: delta_versions(velocity) > before)
    # systemd's stop or kill -- -PGID: SIGTERM to the process group, mid-stream (the trailing
    # view runs Python workers, the sliding one only the JVM: the signal must reach neither).
    before = delta_versions(velocity)
    code = signal_group_when(start_job("features", conf_dir, log, *selected), signal.SIGTERM,
                             lambda: delta_versions(velocity) > before)
    assert code == 0, log.read_text()[-5000:]
    for view in views:
        assert_stopped_between_batches(settings.storage.checkpoint_path("features", view.name),
                                       settings.storage.feature_path(view.name))
    assert sum(feature_rows(spark, settings, views[0]).values()) < sum(feature_rows(spark, reference, views[0]).values())
    final = start_job("features", conf_dir, log, *selected, "--available-now")
    assert final.wait(timeout=600) == 0, log.read_text()[-5000:]
    assert "Traceback" not in log.read_text()

    client = redis_client(settings.redis)
    for view in views:
        rows = feature_rows(spark, settings, view)
        assert rows == feature_rows(spark, reference, view), view.name
        assert max(rows.values()) == 1 or view.kind == "trailing", view.name  # a window appears once
        table = spark.read.format("delta").load(settings.storage.feature_path(view.name))
        latest = {r[view.entity]: r for r in latest_per_entity(table, view).collect()}
        names = feature_names(view)
        online = read_online(client, settings.redis.namespace, view.name, names, sorted(latest))
        for value in online:
            expected = latest[value["entity"]]
            assert value["event_time"] == utc_assuming_local(expected[event_time_column(view)]), (view.name, value)
            assert all(value[n] == expected[n] or abs(value[n] - expected[n]) < 1e-9 for n in names), (view.name, value)
