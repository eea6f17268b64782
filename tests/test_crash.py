"""Crash safety: the ingest job is SIGKILLed (driver and JVM together) mid-stream, twice, at
different points, and restarted; bronze and the dead-letter table end up with every record
exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

from pyspark.sql import functions as F

from pipelines.config import PROJECT_ROOT
from pipelines.generator import GeneratorSpec, generate, produce
from tests.conftest import topic_names


def delta_versions(table: str) -> int:
    """Commits in a Delta table's log (0 when it does not exist yet)."""
    return len(list(Path(table, "_delta_log").glob("*.json")))


def start_job(conf_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "jobs" / "ingest.py"), "--env", "local", "--conf-dir", str(conf_dir), *extra],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )


def kill_when(job: subprocess.Popen, condition, timeout: float = 240) -> None:
    """SIGKILL the job's whole process group (Python driver and Spark JVM) once ``condition()``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, "the job ended before the kill point"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def test_sigkill_twice_mid_stream_then_restart_loses_and_duplicates_nothing(spark, isolated, tmp_path):
    settings = isolated(ingest={"max_offsets_per_trigger": 300, "trigger_interval": "1s"})
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    spec = GeneratorSpec(count=5000, seed=21, span=timedelta(hours=12), bad_rate=0.04, duplicate_rate=0.03,
                         label_rate=0.3, label_delay=(timedelta(minutes=5), timedelta(hours=6)))
    records = list(generate(spec))
    sent = produce(records, settings.kafka.client_properties(), topic_names=topic_names(settings))
    tx_topic = settings.ingest.topics[0]
    bronze_path, dlq_path = settings.storage.bronze_path(tx_topic), settings.storage.dead_letter_path
    log = tmp_path / "ingest.log"

    # Kill 1: right after the second data commit to bronze, the next batch in flight.
    kill_when(start_job(conf_dir, log), lambda: delta_versions(bronze_path) >= 3)
    # Kill 2: in the restarted job, the instant a dead-letter commit lands: between the DLQ write
    # of one batch and its commit to the checkpoint.
    dlq_before = delta_versions(dlq_path)
    kill_when(start_job(conf_dir, log), lambda: delta_versions(dlq_path) >= dlq_before + 2)
    # Restart and run to the end of the topics.
    final = start_job(conf_dir, log, "--available-now")
    assert final.wait(timeout=600) == 0, log.read_text()[-5000:]

    for topic in settings.ingest.topics:
        bronze = spark.read.format("delta").load(settings.storage.bronze_path(topic))
        assert bronze.count() == sent.expected_bronze(topic)
        assert bronze.select("transaction_id").distinct().count() == sent.expected_bronze(topic)
        dead = spark.read.format("delta").load(dlq_path).filter(F.col("kafka_topic") == topic)
        assert dead.select("kafka_partition", "kafka_offset").distinct().count() == dead.count()
        assert Counter({r.error_class: r["count"] for r in dead.groupBy("error_class").count().collect()}) == \
            Counter(sent.expected_dead_letters(topic))
