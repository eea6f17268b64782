"""Cluster mode (``local.mode: cluster``): the jobs run unchanged on Spark standalone against three
Kafka nodes and a Redis Cluster, and keep their promises through a broker that dies under the
ingest and a Redis master that fails over under the features job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta

from confluent_kafka.admin import AdminClient, ConfigResource
from pyspark.sql import functions as F

from pipelines.core.settings import PROJECT_ROOT
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from pipelines.local.platform import form_redis_cluster
from pipelines.local.services import wait_healthy
from pipelines.online.store import redis_client
from tests.support import assert_online_equals_tables, delta_versions, start_job, topic_names


def wait_for(condition, timeout: float, what: str, job: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job is None or job.poll() is None, f"the job ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s"
        time.sleep(0.2)


def bronze_count(spark, path: str) -> int:
    return spark.read.format("delta").load(path).count() if delta_versions(path) else 0


def test_topics_of_cluster_mode_are_replicated_on_three_nodes_with_two_in_sync_to_write(isolated_cluster):
    settings = isolated_cluster()
    admin = AdminClient(settings.kafka.client_properties())
    topic = settings.ingest.topics[0]
    metadata = admin.list_topics(topic, timeout=10).topics[topic]
    assert {len(p.replicas) for p in metadata.partitions.values()} == {3}
    assert {len(p.isrs) for p in metadata.partitions.values()} == {3}
    (config,) = admin.describe_configs([ConfigResource("topic", topic)]).values()
    assert config.result()["min.insync.replicas"].value == "2"


def test_a_broker_killed_under_the_ingest_loses_nothing_and_the_stream_goes_on(spark, cluster, isolated_cluster, tmp_path):
    settings = isolated_cluster(partitions=3, ingest={"max_offsets_per_trigger": 400, "trigger_interval": "1s"})
    conf_dir = isolated_cluster.conf_dir(settings, tmp_path / "conf")
    tx = settings.ingest.topics[0]
    bronze_path = settings.storage.bronze_path(tx)
    # Invalid records and duplicates among them: the counts must come out exact, not just "all there".
    spec = GeneratorSpec(count=3000, seed=33, span=timedelta(hours=6), bad_rate=0.04, duplicate_rate=0.03,
                         label_rate=0.2, label_delay=(timedelta(minutes=5), timedelta(hours=2)))
    records = list(generate(spec))
    # A first part before the job starts; the rest at a rate across the kill (acks=all and
    # idempotent: a producer's retry after the broker died writes no record twice, and a record
    # is acknowledged once two replicas have it).
    sent = produce(records[:800], settings.kafka.producer_properties(), topic_names=topic_names(settings))
    rest: dict = {}
    sender = threading.Thread(target=lambda: rest.update(sent=produce(
        records[800:], settings.kafka.producer_properties(), rate=150.0, topic_names=topic_names(settings))))
    log = tmp_path / "ingest.log"
    job = start_job("ingest", conf_dir, log)
    try:
        wait_for(lambda: delta_versions(bronze_path) >= 1, 240, "bronze commit", job)
        sender.start()
        time.sleep(3)
        # The leader of partition 0 of the transactions topic: SIGKILL, with records on their way.
        metadata = AdminClient(settings.kafka.client_properties()).list_topics(tx, timeout=10).topics[tx]
        leader = metadata.partitions[0].leader
        (victim,) = [node for node in cluster.kafka_nodes if node.node_id == leader]
        victim.stop_now()
        killed_at, rows_at_kill = time.monotonic(), bronze_count(spark, bronze_path)
        assert sender.is_alive()  # still sending: some records go to the two brokers left
        # The stream goes on with the broker down: new leaders on the two others, more bronze.
        wait_for(lambda: bronze_count(spark, bronze_path) >= rows_at_kill + 500, 180,
                 "bronze growing with a broker down", job)
        sender.join(timeout=120)
        assert not sender.is_alive() and "sent" in rest
        sent.extend(rest["sent"])
        wait_for(lambda: bronze_count(spark, bronze_path) >= sent.expected_bronze(tx), 240,
                 "every valid transaction in bronze with a broker down", job)
        down_for = time.monotonic() - killed_at
        assert victim.pid() is None and down_for > 5
        victim.start()
        wait_healthy(victim, 120)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 0, log.read_text()[-5000:]
    finally:
        if job.poll() is None:
            job.kill()
        if victim_missing := [n for n in cluster.kafka_nodes if n.pid() is None]:
            for node in victim_missing:
                node.start()
                wait_healthy(node, 120)

    for topic in settings.ingest.topics:
        bronze = spark.read.format("delta").load(settings.storage.bronze_path(topic))
        assert bronze.count() == sent.expected_bronze(topic), topic
        assert bronze.select(settings.contract_for(topic).id_field).distinct().count() == bronze.count(), topic
        dead = spark.read.format("delta").load(settings.storage.dead_letter_path).filter(F.col("kafka_topic") == topic)
        assert Counter({r.error_class: r["count"] for r in dead.groupBy("error_class").count().collect()}) == \
            Counter(sent.expected_dead_letters(topic)), topic
    summary = tmp_path / "sent.json"
    summary.write_text(json.dumps(sent.to_dict()))
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "reconcile.py"), "--env", "local",
                           "--conf-dir", str(conf_dir), "--expect", str(summary)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in log.read_text()


def test_a_redis_master_failing_over_under_the_features_job_leaves_redis_equal_to_the_tables(spark, cluster,
                                                                                          isolated_cluster, tmp_path):
    # Few bronze files per micro-batch: the job writes Redis over many batches, across the failover.
    settings = isolated_cluster(ingest={"max_offsets_per_trigger": 250},
                                features={"max_files_per_trigger": 2, "trigger_interval": "500ms"})
    spec = GeneratorSpec(count=2500, accounts=80, merchants=25, seed=46, span=timedelta(hours=8), label_rate=0.0,
                         duplicate_rate=0.02, bad_rate=0.02)
    produce(generate(spec), settings.kafka.producer_properties(), topic_names=topic_names(settings))
    run_ingest(spark, settings, available_now=True)
    views = [settings.views["account_velocity"], settings.views["merchant_hourly"]]
    conf_dir = isolated_cluster.conf_dir(settings, tmp_path / "conf")
    client = redis_client(settings.redis)
    namespace = settings.redis.namespace
    log = tmp_path / "features.log"
    selected = ("--views", ",".join(v.name for v in views))
    job = start_job("features", conf_dir, log, *selected)
    try:
        wait_for(lambda: sum(1 for _ in client.scan_iter(f"{namespace}:account_velocity:*")) >= 20, 300,
                 "online rows", job)
        # The master of an entity's slot the job is writing: SIGKILL. Its replica takes over
        # (node timeout 2 s); the job's writes to its slots fail meanwhile and are retried.
        key = next(iter(client.scan_iter(f"{namespace}:account_velocity:*")))
        (victim,) = [n for n in cluster.redis_nodes if n.port == client.get_node_from_key(key).port]
        assert victim.role() == "master"
        batches_at_kill = delta_versions(settings.storage.feature_path("account_velocity"))
        victim.stop_now()
        wait_for(lambda: sum(n.pid() is not None and n.role() == "master" for n in cluster.redis_nodes) == 3, 60,
                 "a replica promoted", job)
        # The job writes on through the new master (more feature batches committed, Redis too).
        wait_for(lambda: delta_versions(settings.storage.feature_path("account_velocity")) >= batches_at_kill + 2, 300,
                 "feature batches after the failover", job)
        victim.start()
        form_redis_cluster(cluster.redis_nodes)  # it comes back as the new master's replica
        assert victim.role() == "slave"
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=180) == 0, log.read_text()[-5000:]
    finally:
        if job.poll() is None:
            job.kill()
        for node in cluster.redis_nodes:
            node.start()
        form_redis_cluster(cluster.redis_nodes)
    final = start_job("features", conf_dir, log, *selected, "--available-now")
    assert final.wait(timeout=600) == 0, log.read_text()[-5000:]
    assert "Traceback" not in log.read_text()
    assert assert_online_equals_tables(spark, settings, views, redis_client(settings.redis)) > 80
