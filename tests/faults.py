"""The faults of the chaos suite, one function each, shared by its long run (``make chaos``,
:mod:`tests.chaos`) and its CI subset (``tests/integration/test_cluster.py``): a job's process
group SIGKILLed, the leader broker of a partition SIGKILLed, a Redis master SIGKILLed (its
replica takes over) or restarted (SIGTERM, back before the others give up on it), a Spark
worker SIGKILLed. Each returns what it hit; :func:`repair` brings a node back the way an
operator (or a supervisor) would, :func:`restore` every node of the cluster."""

from __future__ import annotations

import os
import signal
import subprocess

from confluent_kafka.admin import AdminClient

from pipelines.core.settings import Settings
from pipelines.local.platform import KafkaBroker, LocalPlatform, RedisServer, SparkWorker, form_redis_cluster
from pipelines.local.services import Service, descendants, wait_healthy
from pipelines.online.store import redis_client
from tests.support import wait_for

#: The fault kinds, as RELIABILITY.md counts them.
KILL_INGEST, KILL_FEATURES, KILL_LIVE, KILL_SCORE = "kill ingest", "kill features", "kill live", "kill score"
KILL_LEADER_BROKER = "kill leader broker"
KILL_REDIS_MASTER = "kill Redis master (failover)"
RESTART_REDIS_MASTER = "restart Redis master"
KILL_SPARK_WORKER = "kill Spark worker"
JOB_KILLS = {"ingest": KILL_INGEST, "features": KILL_FEATURES, "live": KILL_LIVE, "score": KILL_SCORE}


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL a job: its process group and every process below it, the Spark JVM (in a session
    of its own, see ``launch_detached_gateway``: a SIGKILL of the group alone leaves it running
    until it reads its closed stdin, finishing what it was writing) and its Python workers;
    then reap it. Nothing flushed, no shutdown hook run: a machine's crash."""
    below = descendants(job.pid)
    os.killpg(job.pid, signal.SIGKILL)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait(timeout=60)


def partition_leader(cluster: LocalPlatform, settings: Settings, topic: str, partition: int) -> KafkaBroker:
    """The node that leads ``partition`` of ``topic`` now."""
    metadata = AdminClient(settings.kafka.client_properties()).list_topics(topic, timeout=10).topics[topic]
    leader = metadata.partitions[partition].leader
    (node,) = [n for n in cluster.kafka_nodes if n.node_id == leader]
    return node


def kill_leader_broker(cluster: LocalPlatform, settings: Settings, topic: str, partition: int) -> KafkaBroker:
    """SIGKILL the leader of ``partition`` of ``topic``: the controller elects another in-sync
    replica; with replication 3 and ``min.insync.replicas`` 2, writes go on with one node down."""
    victim = partition_leader(cluster, settings, topic, partition)
    victim.stop_now()
    return victim


def redis_master_of(cluster: LocalPlatform, settings: Settings, key: str) -> RedisServer:
    """The node that serves ``key``'s slot now."""
    port = redis_client(settings.redis).get_node_from_key(key).port
    (node,) = [n for n in cluster.redis_nodes if n.port == port]
    return node


def masters_up(cluster: LocalPlatform) -> int:
    return sum(n.pid() is not None and n.role() == "master" for n in cluster.redis_nodes)


def kill_redis_master(cluster: LocalPlatform, settings: Settings, key: str, timeout: float = 60) -> RedisServer:
    """SIGKILL the master of ``key``'s slot and wait until its replica is promoted (the others
    wait ``local.cluster_redis_node_timeout`` first); writes to its slots fail meanwhile."""
    victim = redis_master_of(cluster, settings, key)
    victim.stop_now()
    wait_for(lambda: masters_up(cluster) == len(cluster.redis_nodes) // 2, timeout, "a replica promoted")
    return victim


def restart_redis_master(cluster: LocalPlatform, settings: Settings, key: str) -> RedisServer:
    """Stop the master of ``key``'s slot cleanly (SIGTERM: it writes its append-only file) and
    start it again at once: back within the node timeout, it stays master of its slots with the
    data it had; clients see refused connections meanwhile."""
    victim = redis_master_of(cluster, settings, key)
    victim.stop()
    victim.start()
    wait_healthy(victim, 60)
    form_redis_cluster(cluster.redis_nodes)  # every node agrees the cluster is ok again
    return victim


def kill_spark_worker(cluster: LocalPlatform, index: int = 0) -> SparkWorker:
    """SIGKILL a Spark worker (its executors die with it) and wait until the master has seen it
    go: the lost tasks run again on the other worker's executors."""
    victim = cluster.spark_workers[index]
    alive = cluster.spark_master.alive_workers()
    victim.stop_now()
    wait_for(lambda: cluster.spark_master.alive_workers() == alive - 1, 60, "the master seeing the worker gone")
    return victim


def busy_workers(cluster: LocalPlatform) -> list[int]:
    """The indexes of the workers that run an executor now (the master says which use cores)."""
    used = {w.get("webuiaddress", "").rsplit(":", 1)[-1]: w.get("coresused", 0)
            for w in cluster.spark_master.state().get("workers", []) if w.get("state") == "ALIVE"}
    return [i for i, worker in enumerate(cluster.spark_workers) if used.get(str(worker.ui_port), 0) > 0]


def repair(cluster: LocalPlatform, node: Service) -> None:
    """Start a node a fault stopped and wait until it serves again: a Redis node rejoins as a
    replica (of the master that took its slots over) and the cluster is ok again; a broker is
    back in the brokers' metadata; a worker registered with the master."""
    node.start()
    wait_healthy(node, 120)
    if isinstance(node, KafkaBroker):
        # Back in every partition's in-sync replicas: a broker killed before then would leave
        # partitions with one replica in sync, below min.insync.replicas, and writes refused.
        wait_for(lambda: fully_in_sync(cluster), 300, "every partition's replicas in sync again")
    elif isinstance(node, RedisServer):
        form_redis_cluster(cluster.redis_nodes)
    elif isinstance(node, SparkWorker):
        wait_for(lambda: cluster.spark_master.alive_workers() == len(cluster.spark_workers), 60,
                   "the worker registered again")


def fully_in_sync(cluster: LocalPlatform) -> bool:
    """Every partition of every topic has all its replicas in sync, as the brokers say."""
    admin = AdminClient({"bootstrap.servers": ",".join(n.bootstrap for n in cluster.kafka_nodes)})
    try:
        topics = admin.list_topics(timeout=10).topics.values()
    except Exception:  # noqa: BLE001 - metadata not served yet: not in sync
        return False
    return all(len(p.isrs) == len(p.replicas) for t in topics for p in t.partitions.values())


def restore(cluster: LocalPlatform) -> None:
    """Every node of the cluster running again (after a run or a test that failed with one down)."""
    for node in [*cluster.kafka_nodes, *cluster.redis_nodes, *cluster.spark_workers]:
        if node.pid() is None:
            node.start()
            wait_healthy(node, 120)
    form_redis_cluster(cluster.redis_nodes)
