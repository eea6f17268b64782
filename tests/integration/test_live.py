"""The live path (``fp-live``): Kafka straight to Redis, the same answers as the batch definition.

For every trailing view, an entity's live value is the batch transform applied to the entity's
valid, de-duplicated events read so far, as of its latest event: the reference here is
:func:`pipelines.features.transforms.trailing_features` over the ingest's own static validation
and duplicate filter of the same Kafka records, computed independently in Spark."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer
from pyspark.sql import functions as F

from pipelines.batch.sources import replay_validated
from pipelines.contracts.avro import AVRO_ERROR_CLASSES
from pipelines.contracts.registry import SchemaRegistry, register_subject, writer_schemas
from pipelines.contracts.validation import ValidationRules
from pipelines.core.errors import ConfigError
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.settings import Settings, load_settings
from pipelines.core.times import utc_assuming_local
from pipelines.core.view_spec import Aggregation, CountBy, FeatureView, SourceSpec, event_time_column, feature_names
from pipelines.features.live_stream import live_events, run_live, unresolved_id
from pipelines.features.sinks import latest_per_entity
from pipelines.features.transforms import session_features, sliding_features, trailing_features
from pipelines.ingest.bronze import bronze_rows, check_records, drop_duplicate_events
from pipelines.local.generator import UNKNOWN_ID, AvroEncoder, GeneratorSpec, generate, produce
from pipelines.local.platform import wait_healthy
from pipelines.online.live import LiveTrailingView
from pipelines.online.live_consumer import BatchLog, LiveConsumer, LiveViews, PlannedBatch
from pipelines.online.live_metrics import LiveMetrics
from pipelines.online.live_windows import LiveWindowView
from pipelines.online.store import OnlineStoreWriter, entity_key, read_online, redis_client
from tests.support import contract_conf, start_job, topic_names


def batch_definition(spark, settings: Settings, view: FeatureView) -> dict[Any, dict[str, Any]]:
    """Entity -> its latest event's row of the batch transform over every valid, de-duplicated
    event of the view's topic (read from Kafka, checked as the ingest checks)."""
    topic = settings.source_topic(view)
    reader = (spark.read.format("kafka").option("subscribe", topic)
              .option("startingOffsets", "earliest").option("endingOffsets", "latest"))
    for key, value in settings.kafka.spark_options().items():
        reader = reader.option(key, value)
    contract = settings.contract_for(topic)
    rules = ValidationRules.of(settings.ingest)
    if contract.format == "avro":  # decoded, and unknown schema ids asked of the registry, as the ingest does
        checked = replay_validated(reader.load(), contract, settings, topic)
    else:
        checked = drop_duplicate_events(check_records(reader.load(), contract, rules), contract, rules)
    events = bronze_rows(checked, contract)
    latest = latest_per_entity(trailing_features(events, view), view)
    return {row[view.entity]: row.asDict() for row in latest.collect()}


def mismatches(client, settings: Settings, view: FeatureView, expected: dict[Any, dict[str, Any]]) -> list:
    """The entities whose live value differs from ``expected`` (doubles to 1e-9, relative)."""
    names = feature_names(view)
    wrong = []
    for value in read_online(client, settings.redis.namespace, view.name, names, sorted(expected)):
        row = expected[value["entity"]]
        same_time = value["event_time"] == utc_assuming_local(row[event_time_column(view)])
        same = all(
            value[n] == row[n] or (isinstance(row[n], float) and value[n] is not None
                                   and abs(value[n] - row[n]) <= 1e-9 * max(1.0, abs(row[n])))
            for n in names
        )
        if not (same_time and same):
            wrong.append((value, {n: row[n] for n in names}, row[event_time_column(view)]))
    return wrong


def disordered(count: int, seed: int, hours: float = 10.0, ago: timedelta = timedelta(hours=1)) -> GeneratorSpec:
    """The generator's own disorder (5% out of order up to 2 minutes, 2% late by 30 minutes to
    6 hours, 1% duplicates, 2% bad records), ending ``ago``."""
    spec = GeneratorSpec(count=count, accounts=30, merchants=10, seed=seed, label_rate=0.4,
                         end=datetime.now(timezone.utc) - ago, span=timedelta(hours=hours))
    assert spec.out_of_order_rate > 0 and spec.late_rate > 0 and spec.duplicate_rate > 0 and spec.bad_rate > 0
    return spec


def trailing_views(settings: Settings) -> list[FeatureView]:
    views = [v for v in settings.views.values() if v.kind == "trailing"]
    assert {v.source.contract for v in views} == {"transactions", "labels"}
    return views


def test_live_values_equal_the_batch_definition_under_disorder_and_duplicates(spark, isolated):
    # Small batches: out-of-order events and their duplicates land in later batches than the
    # events they precede.
    settings = isolated(live={"max_offsets_per_trigger": 400, "max_batch_events": 150})
    spec = disordered(1500, seed=71)
    produce(generate(spec), settings.kafka.client_properties(), topic_names=topic_names(settings))
    views = trailing_views(settings)
    assert run_live(spark, settings, views, available_now=True) == 0
    client = redis_client(settings.redis)
    for view in views:
        expected = batch_definition(spark, settings, view)
        assert len(expected) >= 20, view.name
        assert mismatches(client, settings, view, expected) == [], view.name
    # The interval's progress went to the ops table.
    metrics = spark.read.format("delta").load(settings.storage.live_metrics_path)
    assert metrics.agg(F.sum("events")).first()[0] >= spec.count


def avro_conf(dest):
    """The project's conf with both contracts Avro."""
    conf = contract_conf(dest)
    labels = conf / "contracts" / "labels.yaml"
    labels.write_text(labels.read_text().replace("format: json", "format: avro"))
    return conf


def with_optional_field(settings: Settings, isolated, dest) -> Settings:
    """``settings`` with the transactions contract's next version: one optional field more."""
    conf = isolated.conf_dir(settings, dest)
    path = conf / "contracts" / "transactions.yaml"
    contract_yaml = yaml.safe_load(path.read_text())
    contract_yaml["fields"].append({"name": "reviewer", "type": "string", "required": False})
    path.write_text(yaml.safe_dump(contract_yaml, sort_keys=False))
    return load_settings("local", conf)


def test_avro_topics_live_values_equal_the_batch_definition_with_faults_and_a_new_writer_schema(
        spark, registry, isolated, tmp_path):
    settings = isolated(conf=avro_conf(tmp_path / "conf"), live={"max_batch_events": 150, "checkpoint_interval": "5s"})
    client = SchemaRegistry(settings.schema_registry)
    for topic in settings.ingest.topics:
        register_subject(client, settings, topic)
    names = topic_names(settings)
    tx = names["transactions"]
    encoder = AvroEncoder(settings.schema_registry, {logical: settings.contract_for(names[logical])
                                                     for logical in ("transactions", "labels")}, names)
    # Every fault class, the Avro ones included (an unknown schema id, another subject's id,
    # a broken frame, a body that does not decode), with disorder and duplicates.
    spec = dataclasses.replace(disordered(600, seed=76), bad_rate=0.15, avro_topics=frozenset({"transactions", "labels"}))
    sent = produce(generate(spec), settings.kafka.client_properties(), topic_names=names, encoder=encoder)
    assert set(AVRO_ERROR_CLASSES) <= set(sent.expected_dead_letters(tx))
    views = trailing_views(settings)
    redis = redis_client(settings.redis)
    log = tmp_path / "live.log"
    # The real-time job: a record it cannot judge stops its validation query mid-batch.
    job = start_job("live", isolated.conf_dir(settings, tmp_path / "job-conf"), log)

    def equal_the_batch_definition(minimum: dict[str, int]) -> None:
        expected = {}
        for view in views:
            expected[view.name] = batch_definition(spark, settings, view)
            assert len(expected[view.name]) >= minimum[view.source.contract], view.name
        deadline = time.monotonic() + 240
        while any(mismatches(redis, settings, v, expected[v.name]) for v in views):
            assert job.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, [mismatches(redis, settings, v, expected[v.name])[:3] for v in views]
            time.sleep(1)

    try:
        # Labels follow 1 h to 2 days after their transaction, so few fall inside 10 hours.
        equal_the_batch_definition({"transactions": 20, "labels": 8})
        # The producer moves to the contract's next version (registered now, after the job
        # started): its records are decoded, not left out.
        v2 = with_optional_field(settings, isolated, tmp_path / "conf-v2")
        assert register_subject(client, v2, tx).registered.version == 2
        later = GeneratorSpec(count=200, accounts=30, seed=79, bad_rate=0.0, label_rate=0.0, avro_topics=frozenset({"transactions"}),
                              end=datetime.now(timezone.utc) - timedelta(minutes=20), span=timedelta(minutes=30))
        produce(generate(later), settings.kafka.client_properties(), topic_names=names,
                encoder=AvroEncoder(settings.schema_registry, {"transactions": v2.contract_for(tx)}, names))
        equal_the_batch_definition({"transactions": 25, "labels": 8})
    finally:
        os.killpg(job.pid, signal.SIGTERM)
        assert job.wait(timeout=120) == 0, log.read_text()[-5000:]
    text = log.read_text()
    # The query stopped at what it could not judge; the registry was asked, and it went on
    # without the dead letters (the unknown id, another subject's id) and with the new version.
    assert f"schema id {UNKNOWN_ID} is not in the schema registry" in text, text[-5000:]
    # (Another subject's schema may be registered under several subjects of earlier tests: all are named.)
    assert re.search(rf"schema id \d+ is registered under [^\n]*-value v\d+, not {tx}-value", text), text[-5000:]
    assert re.search(rf"schema id \d+ is a new version of {tx}-value: restarting", text), text[-5000:]


def test_a_schema_id_the_live_validation_does_not_know_stops_it_naming_the_id(spark, registry, isolated, tmp_path):
    settings = isolated(conf=avro_conf(tmp_path / "conf"))
    tx = settings.ingest.topics[0]
    client = SchemaRegistry(settings.schema_registry)
    register_subject(client, settings, tx)
    v1 = writer_schemas(client, tx, settings.contract_for(tx))
    # v2 (an optional field more) registered and written; the validation knows v1 only.
    s2 = with_optional_field(settings, isolated, tmp_path / "conf2")
    assert register_subject(client, s2, tx).registered.version == 2
    names = topic_names(settings)
    encoder = AvroEncoder(settings.schema_registry, {"transactions": s2.contract_for(tx)}, names)
    produce(generate(GeneratorSpec(count=5, seed=77, bad_rate=0.0, duplicate_rate=0.0, label_rate=0.0,
                                   avro_topics=frozenset({"transactions"}))),
            settings.kafka.client_properties(), topic_names=names, encoder=encoder)
    reader = spark.read.format("kafka").option("subscribe", tx).option("startingOffsets", "earliest")
    for key, value in settings.kafka.spark_options().items():
        reader = reader.option(key, value)
    contract, rules = settings.contract_for(tx), ValidationRules.of(settings.ingest)
    with pytest.raises(Exception) as failure:
        live_events(reader.load(), contract, rules, v1).collect()
    v2_id = client.versions(f"{tx}-value")[1].schema_id
    assert unresolved_id(failure.value) == v2_id
    # Known to it as left out (the ingest's dead letters), the id stops nothing, and its records are left out.
    assert live_events(reader.load(), contract, rules, v1, unknown_ids={v2_id}).count() == 0
    # With v2 among the writers, every record is valid.
    assert live_events(reader.load(), contract, rules, writer_schemas(client, tx, contract)).count() == 5


def velocity_live(settings: Settings) -> tuple[FeatureView, Any, LiveTrailingView]:
    """``account_velocity``'s live state in the test's Redis namespace; events for it are
    (entity, id, event µs, amount_usd, merchant_id, balance_usd)."""
    view = settings.views["account_velocity"]
    types = {f.name: "double" if f.type == "double" else "string"
             for f in settings.contract_for(settings.source_topic(view)).fields}
    client = redis_client(settings.redis)
    live = LiveTrailingView(client, settings.redis.namespace, view, types)
    assert live.columns == ["amount_usd", "merchant_id", "balance_usd"]
    return view, client, live


def test_a_replayed_batch_and_redelivered_events_change_nothing(isolated):
    settings = isolated()
    view, client, live = velocity_live(settings)
    t0 = 1_795_000_000_000_000
    events = [("acct-1", "tx-1", t0, 10.0, "m-1", 100.0), ("acct-1", "tx-2", t0 + 1_000_000, 5.0, "m-2", 95.0)]
    first = live.apply(events)
    assert (first.added, first.written) == (2, 1)
    before = client.hgetall(entity_key(settings.redis.namespace, "account_velocity", "acct-1"))
    again = live.apply(events + [("acct-1", "tx-1", t0, 99.0, "m-9", 1.0)])  # tx-1 redelivered, other bytes
    assert (again.added, again.written) == (0, 0)
    assert client.hgetall(entity_key(settings.redis.namespace, "account_velocity", "acct-1")) == before
    value = read_online(client, settings.redis.namespace, view.name, feature_names(view), ["acct-1"])[0]
    assert (value["count_1h"], value["sum_amount_usd_1h"], value["max_amount_usd_1d"]) == (2, 15.0, 10.0)
    assert value["approx_count_distinct_merchant_id_1d"] == 2
    assert value["last_balance_usd_1d"] == 95.0


def test_every_live_state_key_expires_after_the_state_ttl_also_one_recreated_between_refreshes(isolated):
    settings = isolated()
    view, client, live = velocity_live(settings)
    t0 = 1_795_000_000_000_000
    day = 86_400_000_000
    live.apply([("acct-1", "tx-1", t0, 10.0, "m-1", 100.0)])
    # A day and a second later tx-1 has left the 1d window: its distinct counter empties (Redis
    # deletes the key) and tx-2 creates it again, in a call where the expiry is not yet due.
    live.apply([("acct-1", "tx-2", t0 + day + 1_000_000, 5.0, "m-2", 95.0)])
    value = read_online(client, settings.redis.namespace, view.name, feature_names(view), ["acct-1"])[0]
    assert value["approx_count_distinct_merchant_id_1d"] == 1
    keys = sorted(k.decode() for k in client.scan_iter(f"{settings.redis.namespace}:~live:account_velocity:*:{{acct-1}}"))
    assert [k.split(":~live:account_velocity:")[1].split(":")[0] for k in keys] == ["distinct", "events", "meta", "served", "times"]
    ttls = {k: client.pttl(k) for k in keys}
    # 7 days (the view's TTL, longer than its window), and the refresh period on top.
    assert all(7 * 86_400_000 < ttl <= 7 * 86_400_000 * 9 // 8 for ttl in ttls.values()), ttls


def test_live_window_state_expires_after_the_state_ttl_and_closed_windows_leave_no_open_state(isolated):
    settings = isolated()
    client = redis_client(settings.redis)
    types = {"x": "double", "s": "string", "b": "boolean", "n": "bigint"}
    views = windowed_views()
    live = [LiveWindowView(client, settings.redis.namespace, view, types) for view in views]
    t0, s = 1_795_000_020_000_000, 1_000_000
    week = 7 * 86_400_000  # the views' online TTL (ms), longer than their reach and lateness

    def state_ttls(window: LiveWindowView, entity: str) -> dict[str, int]:
        keys = [*client.scan_iter(f"{window.prefix}:*:{{{entity}}}"), *client.scan_iter(f"{window.prefix}:distinct:{{{entity}}}:*")]
        return {key.decode().removeprefix(f"{window.prefix}:"): client.pttl(key) for key in keys}

    for batch_id, at in enumerate((t0, t0 + 5 * s)):
        for window in live:
            window.apply(batch_id, [("u1", f"e-{batch_id}", at, 1.0, "a", True, 1)], at)
    for window in live:
        ttls = state_ttls(window, "u1")
        # Both events are in one session and in the same three sliding windows.
        distinct = ({f"distinct:{{u1}}:{t0 - k * 20 * s}:2" for k in range(3)} if window.view.kind == "sliding"
                    else {"distinct:{u1}:e-0:2"})
        assert set(ttls) == {"ids:{u1}", "open:{u1}", *distinct}, (window.view.name, ttls)
        assert week - 60_000 < ttls.pop("open:{u1}") <= week, (window.view.name, ttls)
        assert all(week < ttl <= week * 9 // 8 for ttl in ttls.values()), (window.view.name, ttls)
        # The ids made anew between two refreshes (here: deleted by hand) get their expiry at once.
        client.delete(window.keys("u1")[0])
        window.apply(2, [("u1", "e-2", t0 + 6 * s, 1.0, "b", True, 1)], t0 + 6 * s)
        assert week < state_ttls(window, "u1")["ids:{u1}"] <= week * 9 // 8, window.view.name
        # An event 10 minutes on moves the watermark past every window of u1: all close, and
        # no open state or distinct set is left behind (the ids stay, to drop a redelivery,
        # until they expire).
        result = window.apply(3, [("u2", "e-3", t0 + 600 * s, 1.0, "a", True, 1)], t0 + 600 * s)
        assert result.closed >= 1, window.view.name
        assert set(state_ttls(window, "u1")) == {"ids:{u1}"}, window.view.name


def test_the_durable_path_restates_a_live_value_and_a_newer_live_event_wins_again(isolated):
    settings = isolated()
    view, client, live = velocity_live(settings)
    namespace, names = settings.redis.namespace, feature_names(view)
    t0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    at = int(t0.timestamp() * 1_000_000)
    live.apply([("acct-7", "tx-1", at, 10.0, "m-1", 100.0)])
    # The feature stream's row for the same event, computed with a correction: it wins.
    durable = OnlineStoreWriter(client, namespace, view.name, view.online.ttl)
    row = {"account_id": "acct-7", "event_time": t0, "computed_at": t0 + timedelta(seconds=20),
           **{n: None for n in names}, "count_1h": 2, "sum_amount_usd_1h": 30.0}
    assert durable.write([row], "account_id", "event_time", names, "computed_at").written == 1
    # An out-of-order live event for the same latest event time does not undo the restatement.
    live.apply([("acct-7", "tx-0", at - 60_000_000, 1.0, "m-1", 100.0)])
    value = read_online(client, namespace, view.name, names, ["acct-7"])[0]
    assert (value["count_1h"], value["sum_amount_usd_1h"]) == (2, 30.0)
    # A newer event: the live path's value is fresher, and it wins.
    live.apply([("acct-7", "tx-2", at + 5_000_000, 2.0, "m-2", 98.0)])
    value = read_online(client, namespace, view.name, names, ["acct-7"])[0]
    assert value["event_time"] == t0 + timedelta(seconds=5)
    assert (value["count_1h"], value["sum_amount_usd_1h"]) == (3, 13.0)


class RecordingViews(LiveViews):
    """The real views, noting which events each batch id brought."""

    def __init__(self, *args):
        super().__init__(*args)
        self.applied: list[tuple[int, list[str]]] = []

    def apply(self, batch_id, data):
        self.applied.append((batch_id, sorted(data["_event_id"])))
        return super().apply(batch_id, data)


def test_a_batch_planned_but_not_done_is_applied_again_with_the_same_events_and_id(isolated):
    # A crash between planning a batch and marking it done: on restart the consumer reads
    # exactly the planned offsets again, under the planned id, then goes on after them.
    settings = isolated()
    view, client, _ = velocity_live(settings)
    props = settings.kafka.client_properties()
    topic = settings.live.events_topic(settings.ingest.topics[0])
    ensure_topics(props, [TopicSpec(topic, 2, 1)])
    producer = Producer(props)
    t0 = 1_795_000_000_000_000
    ids = {0: [f"p0-{i}" for i in range(10)], 1: [f"p1-{i}" for i in range(6)]}
    for partition, names in ids.items():
        for i, name in enumerate(names):
            event = {"_append_micros": t0, "_event_micros": t0 + i * 1_000_000, "_event_id": name,
                     "account_id": "acct-1", "amount_usd": 1.0, "merchant_id": "m-1", "balance_usd": 1.0}
            producer.produce(topic, json.dumps(event).encode(), partition=partition)
    assert producer.flush(30) == 0
    types = {f.name: "double" if f.type == "double" else "string"
             for f in settings.contract_for(settings.ingest.topics[0]).fields}
    views = RecordingViews(client, settings.redis.namespace, [view], types, LiveMetrics("test", 60.0))
    batches = BatchLog(client, settings.redis.namespace, topic)
    batches.plan(PlannedBatch(7, {0: 2, 1: 0}, {0: 6, 1: 3}, done=False))

    consumer = LiveConsumer(props, topic, views, batches, max_events=4)
    assert consumer.start() == (8, {0: 6, 1: 3})
    assert views.applied == [(7, sorted(ids[0][2:6] + ids[1][:3]))]
    assert batches.read().done
    # Then on from the planned ends, in batches of at most 4, every later event once.
    consumer.run(threading.Event(), until={0: 10, 1: 6})
    later = [name for batch_id, names in views.applied[1:] for name in names]
    assert sorted(later) == sorted(ids[0][6:] + ids[1][3:])
    assert [batch_id for batch_id, _ in views.applied[1:]] == list(range(8, 8 + len(views.applied) - 1))
    assert all(len(names) <= 4 for _, names in views.applied[1:])
    final = batches.read()
    assert (final.id, final.ends, final.done) == (views.applied[-1][0], {0: 10, 1: 6}, True)
    # The events before the log's first batch were never applied: the count is of the others.
    value = read_online(client, settings.redis.namespace, view.name, feature_names(view), ["acct-1"])[0]
    assert (value["count_1h"], value["count_1d"]) == (8 + 6, 8 + 6)


EDGE_SCHEMA = "user string, id string, ts timestamp, x double, s string, b boolean, n bigint"


def edge_view() -> FeatureView:
    """A trailing view using every function on every supported type, two windows and a delay."""
    s10, s60 = timedelta(seconds=10), timedelta(seconds=60)
    return FeatureView(
        name="edge", source=SourceSpec("transactions"), entity="user", event_time="ts", kind="trailing",
        delay=timedelta(seconds=5), aggregations=(
            Aggregation("*", ("count",), (s10, s60)),
            Aggregation("x", ("sum", "avg", "max", "min", "count", "last"), (s10, s60)),
            Aggregation("s", ("max", "min", "approx_count_distinct", "last"), (s10, s60)),
            Aggregation("b", ("max", "min", "last"), (s60,)),
            Aggregation("n", ("sum", "max", "last", "approx_count_distinct"), (s60,)),
        ))


def edge_events(seed: int) -> list[tuple]:
    """(user, id, time, x, s, b, n) rows: whole-second times (ties), nulls, strings that are
    prefixes of each other or hold NUL, \x01 and non-ASCII, gaps longer than every window."""
    rng = random.Random(seed)
    t0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    strings = ["", "a", "ab", "a\x00z", "a\x01", "b", "é", "a\x00"]
    rows = []
    for i in range(360):
        user = rng.choice(["u1", "u2", "u3"])
        # u3 has a long quiet spell: its windows empty and restart.
        second = rng.randrange(0, 40) + (rng.choice([0, 200]) if user == "u3" else rng.randrange(0, 160))
        maybe = lambda value: None if rng.random() < 0.25 else value  # noqa: E731
        rows.append((user, f"e{i}", t0 + timedelta(seconds=second), maybe(rng.choice([0.1, 0.2, 0.3, 1e16, -2.5])),
                     maybe(rng.choice(strings)), maybe(rng.random() < 0.5), maybe(rng.randrange(-3, 4))))
    return rows


def test_live_aggregates_equal_the_batch_definition_as_events_enter_and_leave_windows_out_of_order(spark, isolated):
    settings = isolated()
    view = edge_view()
    types = {"x": "double", "s": "string", "b": "boolean", "n": "bigint"}
    client = redis_client(settings.redis)
    live = LiveTrailingView(client, settings.redis.namespace, view, types)
    assert live.columns == ["x", "s", "b", "n"]
    rng = random.Random(5)
    events = edge_events(seed=5)
    # Delivered mostly in time order, every fifth event late by up to 100 s, in batches of 15;
    # some delivered twice with other values (the first delivery counts).
    order = sorted(events, key=lambda e: e[2] + (timedelta(seconds=rng.randrange(100)) if rng.random() < 0.2 else timedelta(0)))
    deliveries = list(order)
    for e in rng.sample(events, 30):
        deliveries.insert(rng.randrange(len(deliveries) + 1), (*e[:3], 99.0, "zz", True, 99))
    delivered: dict[str, tuple] = {}
    for start in range(0, len(deliveries), 15):
        batch = deliveries[start:start + 15]
        live.apply([(e[0], e[1], int(e[2].timestamp() * 1_000_000), *e[3:]) for e in batch])
        for e in batch:
            delivered.setdefault(e[1], e)
        if start // 15 % 2 and start + 15 < len(deliveries):
            continue
        reference = latest_per_entity(trailing_features(spark.createDataFrame(list(delivered.values()), EDGE_SCHEMA), view), view)
        expected = {row["user"]: row.asDict() for row in reference.collect()}
        wrong = mismatches(client, settings, view, expected)
        assert wrong == [], f"after {start + len(batch)} deliveries: {wrong}"


def same_features(served: dict[str, Any], expected: dict[str, Any], names: list[str]) -> bool:
    """Every feature equal (doubles to 1e-9, relative; a null one is absent from ``served``)."""
    def same(a, b):
        return a == b or (isinstance(b, float) and a is not None and abs(a - b) <= 1e-9 * max(1.0, abs(b)))
    return all(same(served.get(n), expected[n]) for n in names)


def test_each_event_in_order_is_served_its_own_trailing_row_and_one_out_of_order_the_features_as_they_stand(
        spark, isolated):
    settings = isolated()
    view = edge_view()
    types = {"x": "double", "s": "string", "b": "boolean", "n": "bigint"}
    client = redis_client(settings.redis)
    live = LiveTrailingView(client, settings.redis.namespace, view, types)
    events = sorted(edge_events(seed=6), key=lambda e: (e[2], e[1]))
    # In time order, in batches of about 15 that never split a time: a batch holds several
    # events of each entity (and ties), each of which is served its own row, not the batch's last.
    batches, batch = [], []
    for e in events:
        if len(batch) >= 15 and e[2] != batch[-1][2]:
            batches.append(batch)
            batch = []
        batch.append(e)
    batches.append(batch)
    served = []
    for batch in batches:
        live.apply([(e[0], e[1], int(e[2].timestamp() * 1_000_000), *e[3:]) for e in batch])
        # Read at once: an event's row is forgotten with it, once no later event can count it.
        served += live.served([(e[0], e[1]) for e in batch])
    reference = trailing_features(spark.createDataFrame(events, EDGE_SCHEMA), view)
    expected = {(row["user"], row["ts"]): row.asDict() for row in reference.collect()}
    names = feature_names(view)
    wrong = [(e[1], row, expected[(e[0], e[2].replace(tzinfo=None))]) for e, row in zip(events, served)
             if row is None or row.event_micros != int(e[2].timestamp() * 1_000_000)
             or not same_features(row.features, expected[(e[0], e[2].replace(tzinfo=None))], names)]
    assert wrong == [], wrong[:3]
    # As of a time between two events of an entity: the earlier one's row (the join's rule).
    u1 = [e for e in events if e[0] == "u1"]
    first, second = next((a, b) for a, b in zip(u1, u1[1:]) if (b[2] - a[2]).total_seconds() >= 2)
    between = int(first[2].timestamp() * 1_000_000) + 1_000_000
    assert live.served_as_of([("u1", between)]) == live.served([("u1", first[1])])
    assert live.served_as_of([("u1", int(events[0][2].timestamp() * 1_000_000) - 1)]) == [None]
    # Out of order (before u1's latest event): served u1's features as they stand, counting it.
    latest = u1[-1][2]
    late = ("u1", "late-1", int((latest - timedelta(seconds=8)).timestamp() * 1_000_000), 1e17, "zzz", True, 3)
    live.apply([late])
    [row] = live.served([("u1", "late-1")])
    [now] = read_online(client, settings.redis.namespace, view.name, names, ["u1"])
    assert row.event_micros == int(latest.timestamp() * 1_000_000)
    assert row.features["max_x_10s"] == 1e17  # counted: inside (T - 5 s - 10 s, T - 5 s]
    assert {n: row.value(n) for n in names} == {n: now[n] for n in names}


def test_served_rows_are_trimmed_once_the_entitys_latest_event_is_the_retention_past_them(isolated):
    settings = isolated()
    view = settings.views["account_velocity"]
    types = {f.name: "double" if f.type == "double" else "string"
             for f in settings.contract_for(settings.source_topic(view)).fields}
    live = LiveTrailingView(redis_client(settings.redis), settings.redis.namespace, view, types,
                            served_retention=timedelta(seconds=5))
    t0, s = 1_795_000_000_000_000, 1_000_000
    live.apply([("a", "e0", t0, 1.0, "m", 1.0), ("a", "e3", t0 + 3 * s, 1.0, "m", 1.0)])
    assert [r is not None for r in live.served([("a", "e0"), ("a", "e3")])] == [True, True]
    # The latest time moves to t0 + 10 s: rows at or before t0 + 5 s go; the events stay (1d window).
    live.apply([("a", "e10", t0 + 10 * s, 1.0, "m", 1.0), ("a", "e1", t0 + 1 * s, 1.0, "m", 1.0)])
    rows = live.served([("a", "e0"), ("a", "e3"), ("a", "e10"), ("a", "e1")])
    # e1 came late, behind the retention: it gets its row all the same (a scorer reads it at once).
    assert [r is not None for r in rows] == [False, False, True, True]
    assert rows[2].features["count_1h"] == 4  # e1 counted


def windowed_views(gap: timedelta = timedelta(seconds=20)) -> list[FeatureView]:
    """A sliding and a session view over the edge events' columns, 30 s allowed lateness."""
    lateness = timedelta(seconds=30)
    sliding = FeatureView(
        name="edge_sliding", source=SourceSpec("transactions"), entity="user", event_time="ts", kind="sliding",
        window=timedelta(seconds=60), slide=timedelta(seconds=20), allowed_lateness=lateness, aggregations=(
            Aggregation("*", ("count",)),
            Aggregation("x", ("sum", "avg", "max", "min", "count", "last")),
            Aggregation("s", ("max", "min", "approx_count_distinct", "last")),
            Aggregation("b", ("max", "last")),
            Aggregation("n", ("sum", "max")),
        ))
    session = FeatureView(
        name="edge_session", source=SourceSpec("transactions"), entity="user", event_time="ts", kind="session",
        gap=gap, allowed_lateness=lateness, aggregations=(
            Aggregation("x", ("sum", "max")), Aggregation("s", ("last", "approx_count_distinct"))),
        count_by=(CountBy("s", ("a", "é")),))
    return [sliding, session]


WINDOWED = {"sliding": sliding_features, "session": session_features}


def test_live_windows_close_with_the_watermark_and_equal_the_batch_definition(spark, isolated):
    settings = isolated()
    client = redis_client(settings.redis)
    types = {"x": "double", "s": "string", "b": "boolean", "n": "bigint"}
    views = windowed_views(gap=timedelta(seconds=3))  # sessions of a few events each
    live = [LiveWindowView(client, settings.redis.namespace, view, types) for view in views]
    lateness = 30_000_000
    rng = random.Random(8)
    events = edge_events(seed=8)
    # Out of order by up to 25 s (< the allowed lateness): no event is late, so the windows the
    # watermark closed are the static transform's over every event read.
    order = sorted(events, key=lambda e: e[2] + timedelta(seconds=rng.randrange(26)))
    delivered: list[tuple] = []
    compared = {view.name: 0 for view in views}
    for batch_id, start in enumerate(range(0, len(order), 12)):
        batch = order[start:start + 12]
        delivered += batch
        latest = max(int(e[2].timestamp() * 1_000_000) for e in delivered)
        for view, window in zip(views, live):
            result = window.apply(batch_id, [(e[0], e[1], int(e[2].timestamp() * 1_000_000), *e[3:]) for e in batch],
                                  max(int(e[2].timestamp() * 1_000_000) for e in batch))
            assert result.late == 0, view.name
        if batch_id % 4 != 3:
            continue
        watermark = datetime.fromtimestamp((latest - lateness) / 1e6, timezone.utc).replace(tzinfo=None)
        for view in views:
            rows = WINDOWED[view.kind](spark.createDataFrame(delivered, EDGE_SCHEMA), view)
            closed = latest_per_entity(rows.filter(F.col(event_time_column(view)) <= F.lit(watermark)), view)
            expected = {row["user"]: row.asDict() for row in closed.collect()}
            wrong = mismatches(client, settings, view, expected)
            assert wrong == [], f"{view.name} after batch {batch_id}: {wrong}"
            compared[view.name] += len(expected)
    assert min(compared.values()) >= 12, compared  # several closings of each user and view


def test_live_windows_drop_late_events_merge_sessions_and_judge_a_replayed_batch_as_its_first_attempt(isolated):
    settings = isolated()
    client = redis_client(settings.redis)
    types = {"x": "double", "s": "string", "b": "boolean", "n": "bigint"}
    sliding, session = (LiveWindowView(client, settings.redis.namespace, view, types) for view in windowed_views())
    t0 = 1_795_000_020_000_000  # a multiple of the 20 s slide: windows [t0 - 40 s, t0 + 20 s), ...
    s = 1_000_000

    def event(i: int, at: int, x: float, s_value: str = "a") -> tuple:
        return ("u1", f"e{i}", at, x, s_value, None, None)

    def row(view) -> dict:
        return read_online(client, settings.redis.namespace, view.view.name, feature_names(view.view), ["u1"])[0]

    # Batch 0: events at t0 and t0 + 10 s; the watermark moves to t0 + 10 s - 30 s: nothing closes.
    assert sliding.apply(0, [event(1, t0, 1.0), event(2, t0 + 10 * s, 2.0)], t0 + 10 * s).closed == 0
    # Batch 1: an event at t0 + 100 s moves the watermark to t0 + 70 s: the windows ending at
    # t0 + 20, 40 and 60 s close; the latest, [t0, t0 + 60 s), holds both events.
    result = sliding.apply(1, [event(3, t0 + 100 * s, 4.0)], t0 + 100 * s)
    assert (result.closed, result.written, result.late) == (3, 1, 0)
    value = row(sliding)
    assert value["event_time"] == datetime.fromtimestamp((t0 + 60 * s) / 1e6, timezone.utc)
    assert (value["count"], value["sum_x"], value["last_x"], value["approx_count_distinct_s"]) == (2, 3.0, 2.0, 1)
    # Batch 2: an event at t0 + 15 s is behind the watermark for all its windows (they end at
    # t0 + 20, 40 and 60 s <= t0 + 70 s): dropped. One at t0 + 45 s counts in the two of its
    # windows still open, [t0 + 20 s, t0 + 80 s) and [t0 + 40 s, t0 + 100 s), not in [t0, t0 + 60 s).
    result = sliding.apply(2, [event(4, t0 + 15 * s, 8.0), event(5, t0 + 45 * s, 16.0)], t0 + 45 * s)
    assert (result.added, result.late, result.closed) == (1, 1, 0)
    # The same batch again (a replay after a crash): judged by the same watermark, nothing new.
    again = sliding.apply(2, [event(4, t0 + 15 * s, 8.0), event(5, t0 + 45 * s, 16.0)], t0 + 45 * s)
    assert (again.added, again.late) == (0, 1)
    # Batch 3: the watermark reaches t0 + 100 s: [t0 + 40 s, t0 + 100 s) closes with e5 alone
    # (e3 at t0 + 100 s is in the next windows).
    result = sliding.apply(3, [event(6, t0 + 130 * s, 1.0)], t0 + 130 * s)
    assert result.closed == 2  # windows ending at t0 + 80 s and t0 + 100 s
    value = row(sliding)
    assert value["event_time"] == datetime.fromtimestamp((t0 + 100 * s) / 1e6, timezone.utc)
    assert (value["count"], value["sum_x"], value["max_x"]) == (1, 16.0, 16.0)
    # Batch 3 replayed after a crash that hit before u2's script ran in its first attempt: u2's
    # event at t0 + 50 s is judged by the watermark before batch 3 (t0 + 70 s), not the one
    # batch 3 set (t0 + 100 s, which would drop it): it counts, and its windows ending at
    # t0 + 80 s and t0 + 100 s close at once.
    u2 = ("u2", "e7", t0 + 50 * s, 32.0, "a", None, None)
    result = sliding.apply(3, [event(6, t0 + 130 * s, 1.0), u2], t0 + 130 * s)
    assert (result.added, result.late, result.closed, result.written) == (1, 0, 2, 1)
    value = read_online(client, settings.redis.namespace, "edge_sliding", feature_names(sliding.view), ["u2"])[0]
    assert (value["count"], value["sum_x"]) == (1, 32.0)

    # Sessions (gap 20 s): two sessions, then an out-of-order event that bridges them.
    session.apply(0, [event(1, t0, 1.0, "a"), event(2, t0 + 30 * s, 2.0, "é")], t0 + 30 * s)
    session.apply(1, [event(3, t0 + 15 * s, 4.0, "b")], t0 + 15 * s)
    result = session.apply(2, [event(4, t0 + 200 * s, 0.5, "a")], t0 + 200 * s)  # watermark t0 + 170 s
    assert (result.closed, result.written) == (1, 1)
    value = row(session)
    assert value["event_time"] == datetime.fromtimestamp((t0 + 50 * s) / 1e6, timezone.utc)  # last event + gap
    assert (value["event_count"], value["duration_seconds"], value["sum_x"], value["max_x"]) == (3, 30.0, 7.0, 4.0)
    assert value["approx_count_distinct_s"] == 3  # a, é and b: the merged sessions' sets united
    # The closed session's distinct values are gone with it; the open one's (e4: "a") remain.
    sets = {k.decode().rsplit(":", 1)[0] for k in client.scan_iter(f"{session.prefix}:distinct:{{u1}}:*")}
    assert sets == {f"{session.prefix}:distinct:{{u1}}:e4"}, sets
    assert (value["last_s"], value["count_s_a"], value["count_s_é"]) == ("é", 1, 1)


def applied_batches(client, settings: Settings) -> int:
    """Batches the live consumer of the transactions topic has applied (from its log in Redis)."""
    planned = BatchLog(client, settings.redis.namespace, settings.live.events_topic(settings.ingest.topics[0])).read()
    return 0 if planned is None else planned.id + int(planned.done)


def test_sigkilled_twice_and_redis_restarted_mid_stream_the_live_values_equal_the_batch_definition(
        spark, isolated, platform, tmp_path):
    settings = isolated(live={"max_batch_events": 60, "report_interval": "2s", "checkpoint_interval": "5s"})
    spec = disordered(1500, seed=72)
    produce(generate(spec), settings.kafka.client_properties(), topic_names=topic_names(settings))
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    log = tmp_path / "live.log"
    client = redis_client(settings.redis)

    def run_until(condition, timeout: float = 300) -> subprocess.Popen:
        job = start_job("live", conf_dir, log)
        deadline = time.monotonic() + timeout
        while not condition():
            assert job.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "the live job did not get there in time"
            time.sleep(0.05)
        return job

    # Two SIGKILLs of the whole process group (driver and JVM), each after a few more batches.
    for target in (3, 8):
        job = run_until(lambda target=target: applied_batches(client, settings) >= target)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    # Restarted; Redis goes down mid-stream (a real restart of the server, AOF on), more events
    # arrive while it is down, and it comes back.
    job = run_until(lambda: applied_batches(client, settings) >= 12)
    platform.redis.stop()
    produce(generate(disordered(300, seed=73, hours=0.5, ago=timedelta(minutes=20))),
            settings.kafka.client_properties(), topic_names=topic_names(settings))
    time.sleep(3)
    platform.redis.start()
    wait_healthy(platform.redis, timeout=60)
    expected = {view.name: batch_definition(spark, settings, view) for view in trailing_views(settings)}
    deadline = time.monotonic() + 300
    while any(mismatches(client, settings, v, expected[v.name]) for v in trailing_views(settings)):
        assert job.poll() is None, log.read_text()[-5000:]
        assert time.monotonic() < deadline, [mismatches(client, settings, v, expected[v.name])[:3]
                                              for v in trailing_views(settings)]
        time.sleep(1)
    os.killpg(job.pid, signal.SIGTERM)
    assert job.wait(timeout=120) == 0, log.read_text()[-5000:]
    # The events sent while Redis was down are in the values compared above: nothing was lost.
    assert "event->redis p50" in log.read_text()
    # The progress lines split the lag: the validation stage's share comes from the events
    # topic's own timestamps, and is known (not "-") once events flow.
    assert re.search(r"\(validation p50 \d+\.\d\ds p99 \d+\.\d\ds\)", log.read_text()), log.read_text()[-3000:]


def test_the_ops_table_gets_its_rows_while_a_real_time_batch_runs(spark, isolated, tmp_path):
    # A real-time batch holds a task slot per partition for the whole checkpoint interval; the
    # metrics rows' appends must not wait for it to end (they did, and then delayed the next
    # batch's start by seconds).
    settings = isolated(live={"report_interval": "1s", "checkpoint_interval": "10m"})
    produce(generate(disordered(300, seed=75)), settings.kafka.client_properties(), topic_names=topic_names(settings))
    log = tmp_path / "live.log"
    job = start_job("live", isolated.conf_dir(settings, tmp_path / "conf"), log)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert job.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "no ops/live_metrics row within 4 minutes: " + log.read_text()[-3000:]
            table = settings.storage.live_metrics_path
            if os.path.exists(os.path.join(table, "_delta_log")) and \
                    spark.read.format("delta").load(table).filter("events > 0").count():
                break
            time.sleep(2)
        # Still inside the first real-time batch: the validation stage has not checkpointed yet.
        assert "batch 0 (started" not in log.read_text()
    finally:
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=120)


def test_live_state_of_another_view_definition_is_refused_at_start(isolated):
    settings = isolated()
    client = redis_client(settings.redis)
    types = {"x": "double", "s": "string", "b": "boolean", "n": "bigint"}
    _, session = windowed_views(gap=timedelta(seconds=20))
    LiveWindowView(client, settings.redis.namespace, session, types)
    LiveWindowView(client, settings.redis.namespace, session, types)  # the same definition again: fine
    _, wider = windowed_views(gap=timedelta(seconds=30))
    with pytest.raises(ConfigError, match="built for another definition"):
        LiveWindowView(client, settings.redis.namespace, wider, types)
    trailing = edge_view()
    LiveTrailingView(client, settings.redis.namespace, trailing, types)
    changed = dataclasses.replace(trailing, delay=timedelta(seconds=6))
    with pytest.raises(ConfigError, match=f"Delete the keys {settings.redis.namespace}:~live:edge:"):
        LiveTrailingView(client, settings.redis.namespace, changed, types)
