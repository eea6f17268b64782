"""Cluster mode (``local.mode: cluster``) under faults, the chaos suite's short version: one or
more faults of each kind, each test with its jobs as real processes on the cluster (three KRaft
nodes, a Redis Cluster of three masters and their replicas, Spark standalone).

* the ingest: SIGKILLed the instant a dead-letter commit lands, the leader broker of a partition
  SIGKILLed while records are sent (the stream goes on), the ingest SIGKILLed again with that
  broker down, stopped by Ctrl-C; bronze and dead letters exact, reconciliation exits 0;
* the features job: SIGKILLed the instant a feature-table commit lands, a Redis master SIGKILLed
  (its replica takes over), stopped by SIGTERM; every table equal to a fault-free run over the
  same bronze, Redis equal to the tables' latest rows;
* a Spark worker SIGKILLed under a job on ``spark://`` (its executor dies with it): the job
  finishes on the other worker, exactly once.

The ingest and features tests run Spark in local mode (``local.spark_workers: 0`` in their conf):
what they test is Kafka's and Redis's failover, and local Spark is three times faster here."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta

from confluent_kafka.admin import AdminClient, ConfigResource
from pyspark.sql import functions as F

from pipelines.core.settings import Settings
from pipelines.features.stream import run_features
from pipelines.ingest.reconcile import format_report, reconcile
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, GeneratorSummary, generate, produce
from pipelines.online.store import redis_client
from tests.faults import kill_leader_broker, kill_redis_master, kill_spark_worker, repair, restore
from tests.support import (
    assert_online_equals_tables,
    assert_stopped_between_batches,
    delta_versions,
    kill_when,
    signal_group_when,
    start_job,
    topic_names,
    wait_for,
)


def bronze_count(spark, path: str) -> int:
    return spark.read.format("delta").load(path).count() if delta_versions(path) else 0


def assert_ingested_exactly(spark, settings: Settings, sent: GeneratorSummary) -> None:
    """Every valid record in bronze once, every invalid one in the dead letters under its class,
    and the operator's reconciliation (Kafka = bronze + dead letters + duplicates, each against
    what was sent) says OK for every topic."""
    for topic in settings.ingest.topics:
        bronze = spark.read.format("delta").load(settings.storage.bronze_path(topic))
        assert bronze.count() == sent.expected_bronze(topic), topic
        assert bronze.select(settings.contract_for(topic).id_field).distinct().count() == bronze.count(), topic
        dead = spark.read.format("delta").load(settings.storage.dead_letter_path).filter(F.col("kafka_topic") == topic)
        assert dead.select("kafka_partition", "kafka_offset").distinct().count() == dead.count(), topic
        assert Counter({r.error_class: r["count"] for r in dead.groupBy("error_class").count().collect()}) == \
            Counter(sent.expected_dead_letters(topic)), topic
    results = reconcile(spark, settings, settings.ingest.topics, sent)
    assert all(r.ok for r in results), format_report(results)


def feature_rows(spark, settings: Settings, view) -> Counter:
    table = spark.read.format("delta").load(settings.storage.feature_path(view.name)).drop("computed_at")
    return Counter(tuple(row) for row in table.collect())


def test_topics_of_cluster_mode_are_replicated_on_three_nodes_with_two_in_sync_to_write(isolated_cluster):
    settings = isolated_cluster()
    admin = AdminClient(settings.kafka.client_properties())
    topic = settings.ingest.topics[0]
    metadata = admin.list_topics(topic, timeout=10).topics[topic]
    assert {len(p.replicas) for p in metadata.partitions.values()} == {3}
    assert {len(p.isrs) for p in metadata.partitions.values()} == {3}
    (config,) = admin.describe_configs([ConfigResource("topic", topic)]).values()
    assert config.result()["min.insync.replicas"].value == "2"


def test_the_ingest_through_a_dead_broker_and_sigkills_loses_and_doubles_nothing_and_reconciles(spark, cluster,
                                                                                             isolated_cluster, tmp_path):
    settings = isolated_cluster(partitions=3, local={"spark_workers": 0},
                                ingest={"max_offsets_per_trigger": 300, "trigger_interval": "1s"})
    conf_dir = isolated_cluster.conf_dir(settings, tmp_path / "conf")
    tx = settings.ingest.topics[0]
    bronze_path, dlq_path = settings.storage.bronze_path(tx), settings.storage.dead_letter_path
    # Invalid records and duplicates among them: the counts must come out exact, not just "all there".
    spec = GeneratorSpec(count=3000, seed=33, span=timedelta(hours=6), bad_rate=0.04, duplicate_rate=0.03,
                         label_rate=0.2, label_delay=(timedelta(minutes=5), timedelta(hours=2)))
    records = list(generate(spec))
    # A first part before the job starts; the rest at a rate across the broker's death (acks=all,
    # idempotent: a producer's retry after the broker died writes no record twice, and a record
    # counts as sent once two replicas have it).
    sent = produce(records[:1000], settings.kafka.producer_properties(), topic_names=topic_names(settings))
    rest: dict[str, GeneratorSummary] = {}
    sender = threading.Thread(target=lambda: rest.update(sent=produce(
        records[1000:], settings.kafka.producer_properties(), rate=100.0, topic_names=topic_names(settings))))
    log = tmp_path / "ingest.log"
    rng = random.Random(7)
    try:
        # Fault: the ingest SIGKILLed the instant a dead-letter commit lands, between one batch's
        # dead-letter write and its checkpoint commit.
        dlq_before = delta_versions(dlq_path)
        kill_when(start_job("ingest", conf_dir, log), lambda: delta_versions(dlq_path) >= dlq_before + 2)
        job = start_job("ingest", conf_dir, log)
        before = delta_versions(bronze_path)
        wait_for(lambda: delta_versions(bronze_path) > before, 240, "a bronze commit after the restart", job)
        sender.start()
        time.sleep(2)
        # Fault: the leader of partition 0 SIGKILLed, records on their way to it.
        victim = kill_leader_broker(cluster, settings, tx, 0)
        assert sender.is_alive()
        rows_at_kill = bronze_count(spark, bronze_path)
        # The stream goes on with the broker down: new leaders on the two others, more bronze.
        wait_for(lambda: bronze_count(spark, bronze_path) >= rows_at_kill + 300, 180,
                 "bronze growing with a broker down", job)
        # Fault: the ingest SIGKILLed at a random instant, the broker still down.
        time.sleep(rng.uniform(0.0, 2.5))
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        # Ctrl-C in a terminal (SIGINT to the process group) mid-stream: the job ends after its batch.
        before = delta_versions(bronze_path)
        code = signal_group_when(start_job("ingest", conf_dir, log), signal.SIGINT,
                                 lambda: delta_versions(bronze_path) > before)
        assert code == 0, log.read_text()[-5000:]
        for topic in settings.ingest.topics:
            assert_stopped_between_batches(settings.storage.checkpoint_path("ingest", topic),
                                           settings.storage.bronze_path(topic), dlq_path)
        sender.join(timeout=120)
        assert not sender.is_alive() and "sent" in rest
        sent.extend(rest["sent"])
        assert bronze_count(spark, bronze_path) < sent.expected_bronze(tx)
        # The rest, the broker still down, in larger batches (in this process: the job's
        # restarts are above).
        drain = dataclasses.replace(settings, ingest=dataclasses.replace(settings.ingest, max_offsets_per_trigger=100_000))
        assert run_ingest(spark, drain, available_now=True) == 0
        assert victim.pid() is None
    finally:
        restore(cluster)
    assert "Traceback" not in log.read_text()
    assert_ingested_exactly(spark, settings, sent)


def test_the_features_job_through_a_redis_failover_and_sigkills_ends_equal_to_a_fault_free_run(spark, cluster,
                                                                                            isolated_cluster, tmp_path):
    # Few bronze files per micro-batch: the job writes over many batches, across the faults.
    settings = isolated_cluster(local={"spark_workers": 0}, ingest={"max_offsets_per_trigger": 300},
                                features={"max_files_per_trigger": 2, "trigger_interval": "500ms"})
    spec = GeneratorSpec(count=2000, accounts=60, merchants=20, seed=44, span=timedelta(hours=8), label_rate=0.0)
    produce(generate(spec), settings.kafka.producer_properties(), topic_names=topic_names(settings))
    run_ingest(spark, settings, available_now=True)
    views = [settings.views["account_velocity"], settings.views["merchant_hourly"]]
    # The reference: the same views over a copy of the same bronze, never interrupted.
    reference = dataclasses.replace(
        settings, storage=dataclasses.replace(settings.storage, root=str(tmp_path / "reference")),
        redis=dataclasses.replace(settings.redis, namespace=f"reference-{uuid.uuid4().hex[:8]}"))
    shutil.copytree(settings.storage.root, reference.storage.root)
    assert run_features(spark, reference, views, available_now=True) == 0

    conf_dir = isolated_cluster.conf_dir(settings, tmp_path / "conf")
    velocity = settings.storage.feature_path("account_velocity")
    client = redis_client(settings.redis)
    namespace = settings.redis.namespace
    log = tmp_path / "features.log"
    selected = ("--views", ",".join(v.name for v in views))
    try:
        # Fault: the job SIGKILLed the instant a feature-table commit lands, before that batch's
        # Redis write and checkpoint commit: the restart replays it without a second append.
        before = delta_versions(velocity)
        kill_when(start_job("features", conf_dir, log, *selected), lambda: delta_versions(velocity) > before + 1)
        job = start_job("features", conf_dir, log, *selected)
        wait_for(lambda: any(True for _ in client.scan_iter(f"{namespace}:account_velocity:*")), 240, "online rows", job)
        # Fault: the master of a slot the job writes SIGKILLed. Its replica takes over (node
        # timeout 2 s); the job's writes to those slots fail meanwhile and are retried.
        key = next(iter(client.scan_iter(f"{namespace}:account_velocity:*")))
        batches_at_kill = delta_versions(velocity)
        victim = kill_redis_master(cluster, settings, key)
        assert job.poll() is None
        wait_for(lambda: delta_versions(velocity) >= batches_at_kill + 2, 240, "feature batches after the failover", job)
        repair(cluster, victim)
        assert victim.role() == "slave"  # back as the new master's replica
        # systemd's stop (SIGTERM to the process group) mid-stream: the job ends after its batch.
        before = delta_versions(velocity)
        code = signal_group_when(job, signal.SIGTERM, lambda: delta_versions(velocity) > before)
        assert code == 0, log.read_text()[-5000:]
        for view in views:
            assert_stopped_between_batches(settings.storage.checkpoint_path("features", view.name),
                                           settings.storage.feature_path(view.name))
        assert sum(feature_rows(spark, settings, views[0]).values()) < sum(feature_rows(spark, reference, views[0]).values())
        # The rest in this process (the job's restarts are above).
        assert run_features(spark, settings, views, available_now=True) == 0
    finally:
        restore(cluster)
    assert "Traceback" not in log.read_text()
    for view in views:
        rows = feature_rows(spark, settings, view)
        assert rows == feature_rows(spark, reference, view), view.name
        assert max(rows.values()) == 1 or view.kind == "trailing", view.name  # a window appears once
    assert assert_online_equals_tables(spark, settings, views, redis_client(settings.redis)) >= 60


def test_a_spark_worker_killed_under_a_job_on_the_standalone_master_leaves_bronze_exact(spark, cluster,
                                                                                     isolated_cluster, tmp_path):
    settings = isolated_cluster(partitions=2, ingest={"max_offsets_per_trigger": 250})
    assert settings.spark.master == cluster.spark_master.url
    conf_dir = isolated_cluster.conf_dir(settings, tmp_path / "conf")
    spec = GeneratorSpec(count=1500, seed=35, span=timedelta(hours=4), bad_rate=0.03, duplicate_rate=0.03,
                         label_rate=0.2, label_delay=(timedelta(minutes=5), timedelta(hours=1)))
    sent = produce(generate(spec), settings.kafka.producer_properties(), topic_names=topic_names(settings))
    bronze_path = settings.storage.bronze_path(settings.ingest.topics[0])
    log = tmp_path / "ingest.log"
    job = start_job("ingest", conf_dir, log, "--available-now")
    try:
        # Fault: a worker SIGKILLed once the job commits: its executor dies with it, the tasks it
        # ran are run again on the other worker's executor.
        wait_for(lambda: delta_versions(bronze_path) >= 1, 300, "a bronze commit on the cluster", job)
        kill_spark_worker(cluster, 0)
        assert job.poll() is None
        assert job.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        if job.poll() is None:
            job.kill()
        restore(cluster)
    assert_ingested_exactly(spark, settings, sent)
