"""End to end with the real schema registry: v1 then compatible v2 Avro records and every Avro
fault into the same topics, one ingest stream that keeps going through a registry restart and a
writer schema registered while it runs; bronze exactly once, each fault dead-lettered with its
reason and schema id, and the reconciliation exact."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import deltalake
from pyspark.sql import functions as F

from pipelines.batch.sources import replay_validated
from pipelines.contracts.avro import (
    AVRO_ERROR_CLASSES,
    SUBJECT_MISMATCH,
    TRUNCATED_HEADER,
    UNKNOWN_SCHEMA_ID,
    WRONG_MAGIC_BYTE,
)
from pipelines.contracts.registry import SchemaRegistry, register_subject
from pipelines.core.settings import load_settings
from pipelines.ingest.reconcile import reconcile
from pipelines.ingest.stream import start_ingest
from pipelines.local.generator import UNKNOWN_ID, VALID_KINDS, AvroEncoder, GeneratorSpec, generate, produce
from tests.support import contract_conf, topic_names

BOTH = frozenset({"transactions", "labels"})
REVIEWER = "{name: reviewer, type: string, required: false}"


def conf_with(base: Path, dest: Path, source: Path, contract: str) -> Path:
    """``base`` (a test's conf folder) with ``contract``'s YAML taken from ``source``."""
    shutil.copytree(base, dest)
    shutil.copy(source / "contracts" / f"{contract}.yaml", dest / "contracts" / f"{contract}.yaml")
    return dest


def labels_v2(dest: Path) -> Path:
    conf = contract_conf(dest)
    path = conf / "contracts" / "labels.yaml"
    path.write_text(path.read_text().replace("format: json", "format: avro") + f"  - {REVIEWER}\n")
    return conf


def avro_labels(conf: Path) -> Path:
    path = conf / "contracts" / "labels.yaml"
    path.write_text(path.read_text().replace("format: json", "format: avro"))
    return conf


class Sent:
    """What was produced: the generator's summary and the exact bytes of every record."""

    def __init__(self, encoder: AvroEncoder):
        self.encoder = encoder
        self.values: list[tuple[str, str, str | None, bytes]] = []  # (logical topic, kind, event id, bytes)
        self.events: dict[str, dict] = {}

    def encode(self, record) -> bytes:
        value = self.encoder.encode(record)
        self.values.append((record.topic, record.kind, record.event_id, value))
        if record.kind in VALID_KINDS and record.topic == "transactions":
            self.events[record.event_id] = dict(record.event)
        return value


def supervise(run, until, timeout: float = 300.0) -> None:
    """Keep the ingest's queries running (restarting the ones that ask for it) until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        for i, query in enumerate(run.queries):
            if not query.isActive:
                replacement = run.restart(query)
                if replacement is None:
                    raise AssertionError(f"{query.name} stopped: {query.exception()}")
                run.queries[i] = replacement
        if time.monotonic() > deadline:
            raise AssertionError("the ingest did not catch up in time")
        time.sleep(1)


def rows(path: str, topic: str | None = None) -> int:
    try:
        table = deltalake.DeltaTable(path).to_pyarrow_table(columns=["kafka_topic"])
    except deltalake.exceptions.TableNotFoundError:
        return 0
    return sum(1 for t in table.column("kafka_topic").to_pylist() if topic is None or t == topic)


def test_schema_evolution_and_faults_through_one_running_stream(spark, registry, isolated, tmp_path):
    v1 = avro_labels(contract_conf(tmp_path / "v1", drop=("device_fingerprint",), with_views=False))
    s1 = isolated(conf=v1)
    tx, lb = s1.ingest.topics
    names = topic_names(s1)
    client = SchemaRegistry(s1.schema_registry)
    assert [register_subject(client, s1, t).registered.version for t in (tx, lb)] == [1, 1]

    # v1 records (no device_fingerprint in the schema), before the consumer knows any v2.
    first = Sent(AvroEncoder(s1.schema_registry, {"transactions": s1.contract_for(tx),
                                                   "labels": s1.contract_for(lb)}, names))
    spec = dict(span=timedelta(hours=1), label_rate=0.4, label_delay=(timedelta(minutes=1), timedelta(minutes=20)),
                avro_topics=BOTH)
    sent = produce(generate(GeneratorSpec(count=150, seed=1, bad_rate=0.0, duplicate_rate=0.05, **spec)),
                   s1.kafka.client_properties(), topic_names=names, encoder=first)

    # v2 adds device_fingerprint (optional, default null): registered, then the ingest deployed with it.
    conf2 = conf_with(isolated.conf_dir(s1, tmp_path / "conf2"), tmp_path / "conf2b", contract_conf(tmp_path / "v2"),
                      "transactions")
    s2 = load_settings("local", conf2)
    assert register_subject(client, s2, tx).registered.version == 2
    run = start_ingest(spark, s2)
    try:
        v1_valid = sent.expected_bronze(tx)
        supervise(run, lambda: rows(s2.storage.bronze_path(tx)) >= v1_valid)

        # The registry restarts while the stream runs: schemas kept, the stream goes on.
        before = [(v.version, v.schema_id) for v in client.versions(f"{tx}-value")]
        registry.registry.stop()
        registry.start_registry()
        assert [(v.version, v.schema_id) for v in client.versions(f"{tx}-value")] == before == [
            (1, before[0][1]), (2, before[1][1])]

        # A producer moves labels to a v2 the running labels query has never seen (it restarts
        # to decode it, with its own contract as reader); v2 transactions; every fault class.
        labels_conf = labels_v2(tmp_path / "labels_v2")
        s_labels = load_settings("local", conf_with(conf2, tmp_path / "conf3", labels_conf, "labels"))
        assert register_subject(client, s_labels, lb).registered.version == 2
        second = Sent(AvroEncoder(s2.schema_registry, {"transactions": s2.contract_for(tx),
                                                        "labels": s_labels.contract_for(lb)}, names))
        more = produce(generate(GeneratorSpec(count=300, seed=2, bad_rate=0.2, duplicate_rate=0.05, **spec)),
                       s2.kafka.client_properties(), topic_names=names, encoder=second)
        for topic in (tx, lb):
            sent.counts[topic].update(more.counts[topic])
        expected = {t: sent.expected_bronze(t) + sum(sent.expected_dead_letters(t).values()) for t in (tx, lb)}
        supervise(run, lambda: all(rows(s2.storage.bronze_path(t)) + rows(s2.storage.dead_letter_path, t)
                                   >= expected[t] for t in (tx, lb)))
        time.sleep(3)  # one more trigger: nothing beyond the expected may arrive
    finally:
        for query in run.queries:
            query.stop()
        run.listener.drain(run.queries, timeout=30)
        spark.streams.removeListener(run.listener)

    # Every record accounted for, class by class, and each Avro class injected on both topics.
    results = reconcile(spark, s2, sent=sent)
    assert [(r.topic, r.unaccounted, r.mismatches) for r in results] == [(tx, 0, ()), (lb, 0, ())]
    for topic in (tx, lb):
        assert set(AVRO_ERROR_CLASSES) <= set(sent.expected_dead_letters(topic)), topic
    assert {"negative_value", "future_event_time", "stale_event_time"} <= set(sent.expected_dead_letters(tx))

    # Bronze exactly once; v1 rows carry v2's default, v2 rows their values and their version.
    bronze = spark.read.format("delta").load(s2.storage.bronze_path(tx))
    assert bronze.count() == bronze.select("transaction_id").distinct().count() == sent.expected_bronze(tx)
    by_version = {r.writer_schema_version: (r.n, r.with_device) for r in bronze.groupBy("writer_schema_version").agg(
        F.count(F.lit(1)).alias("n"), F.count("device_fingerprint").alias("with_device")).collect()}
    assert by_version[1] == (first_valid := len(first.events), 0)
    assert by_version[2][0] == len(second.events) and by_version[2][1] > 0
    devices = {r.transaction_id: r.device_fingerprint
               for r in bronze.filter("writer_schema_version = 2").select("transaction_id", "device_fingerprint").collect()}
    assert devices == {i: e.get("device_fingerprint") for i, e in second.events.items()}
    assert first_valid + len(second.events) == sent.expected_bronze(tx)

    # Dead letters: the exact bytes sent, a reason, and the schema id of the header.
    letters = spark.read.format("delta").load(s2.storage.dead_letter_path).filter(F.col("kafka_topic") == tx).collect()
    sent_bad = Counter(v for topic, kind, _, v in second.values if topic == "transactions" and kind not in VALID_KINDS
                       and kind != "duplicate")
    assert Counter(bytes(r.kafka_value) for r in letters) == sent_bad
    assert all(r.error_reason for r in letters)
    ids = {r.error_class: r.schema_id for r in letters}
    assert ids[WRONG_MAGIC_BYTE] is None and ids[TRUNCATED_HEADER] is None
    assert ids[UNKNOWN_SCHEMA_ID] == UNKNOWN_ID
    assert ids[SUBJECT_MISMATCH] == client.versions(f"{lb}-value")[-1].schema_id
    assert ids["negative_value"] == before[1][1]
    reasons = {r.error_class: r.error_reason for r in letters}
    assert reasons[UNKNOWN_SCHEMA_ID] == f"schema id {UNKNOWN_ID} is not in the schema registry"
    assert reasons[SUBJECT_MISMATCH].startswith(f"schema id {ids[SUBJECT_MISMATCH]} is registered under {lb}-value")


def test_a_kafka_replay_decodes_avro_and_asks_the_registry_about_unknown_ids(spark, registry, isolated, tmp_path):
    s = isolated(conf=avro_labels(contract_conf(tmp_path / "conf")))
    tx, lb = s.ingest.topics
    client = SchemaRegistry(s.schema_registry)
    for topic in (tx, lb):
        register_subject(client, s, topic)
    sent = Sent(AvroEncoder(s.schema_registry, {"transactions": s.contract_for(tx), "labels": s.contract_for(lb)},
                            topic_names(s)))
    summary = produce(generate(GeneratorSpec(count=60, seed=5, bad_rate=0.3, bad_classes=AVRO_ERROR_CLASSES,
                                             duplicate_rate=0.1, label_rate=0.0, avro_topics=BOTH)),
                      s.kafka.client_properties(), topic_names=topic_names(s), encoder=sent)
    reader = spark.read.format("kafka").option("subscribe", tx).option("includeHeaders", "true")
    for key, value in s.kafka.spark_options().items():
        reader = reader.option(key, value)
    checked = replay_validated(reader.load(), s.contract_for(tx), s, tx)
    by_class = Counter(r.error_class for r in checked.filter("error_class IS NOT NULL").collect())
    assert by_class == Counter(summary.expected_dead_letters(tx))
    assert set(by_class) == set(AVRO_ERROR_CLASSES)
    valid = checked.filter("error_class IS NULL")
    assert sorted(r.transaction_id for r in valid.collect()) == sorted(sent.events)
    assert valid.filter("writer_schema_version = 1").count() == valid.count()
