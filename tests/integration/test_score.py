"""fp-score on the real platform: a registered MLflow model, the live path's served rows, Kafka
transactions; every valid transaction scored once, with the feature vector the point-in-time
join gives it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from pyspark.sql import functions as F

from pipelines.contracts.validation import ValidationRules
from pipelines.core.errors import ConfigError
from pipelines.core.settings import Settings
from pipelines.features.live_stream import run_live
from pipelines.features.transforms import trailing_features
from pipelines.ingest.bronze import bronze_rows, check_records, drop_duplicate_events
from pipelines.local.generator import DUPLICATE, VALID_KINDS, GeneratorSpec, generate, produce
from pipelines.local.platform import wait_healthy
from pipelines.online.store import redis_client
from pipelines.scoring.features import ScoredEvent, servable_features
from pipelines.scoring.model import load_model
from pipelines.scoring.sinks import predictions_path
from pipelines.scoring.stream import ModelWatcher, ScoreLog, run_scoring
from pipelines.training.join import point_in_time_join, view_request
from tests.models import INPUTS, committed_predictions, register_model, score_job_args
from tests.support import start_job, topic_names, wait_for


@pytest.fixture
def tracking(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def scoring_settings(isolated, **live: Any) -> Settings:
    # The scorer here runs after fp-live has applied all ten hours: the served rows must be kept that long.
    settings = isolated(live={"max_batch_events": 150, "served_retention": "1d", **live})
    tx = settings.ingest.topics[0]
    predictions = f"predictions_{uuid.uuid4().hex[:8]}"
    return dataclasses.replace(settings, scoring=dataclasses.replace(
        settings.scoring, topic=tx, predictions_topic=predictions, max_batch_events=120))


def expected_vectors(spark, settings: Settings) -> dict[str, dict[str, Any]]:
    """Each valid transaction's vector by the batch definitions and the point-in-time join
    (as corrected): its own trailing row, the labels view as of its time."""
    tx, lb = settings.ingest.topics
    rules = ValidationRules.of(settings.ingest)

    def bronze(topic: str):
        reader = spark.read.format("kafka").option("subscribe", topic).option("startingOffsets", "earliest")
        for key, value in settings.kafka.spark_options().items():
            reader = reader.option(key, value)
        contract = settings.contract_for(topic)
        return bronze_rows(drop_duplicate_events(check_records(reader.load(), contract, rules), contract, rules), contract)

    transactions, labels = bronze(tx), bronze(lb)
    views = [settings.views["account_velocity"], settings.views["account_fraud_history"]]
    tables = {
        "account_velocity": trailing_features(transactions, views[0]),
        "account_fraud_history": trailing_features(labels, views[1]),
    }
    tables = {name: table.withColumn("computed_at", F.lit(datetime(2000, 1, 1))) for name, table in tables.items()}
    spine = transactions.select("transaction_id", "account_id", "amount_usd", "event_time")
    joined = point_in_time_join(spine, tables, [view_request(v) for v in views], "event_time")
    return {row["transaction_id"]: row.asDict() for row in joined.collect()}


def test_every_valid_transaction_is_scored_once_with_its_own_trailing_row(spark, isolated, tracking, tmp_path):
    settings = scoring_settings(isolated)
    name = f"fraud_{uuid.uuid4().hex[:6]}"
    version = register_model(tracking, tmp_path / "artifacts", name, INPUTS, seed=3)
    # In order, with duplicates and bad records: every valid transaction once, no bad one.
    spec = GeneratorSpec(count=900, accounts=25, merchants=8, seed=81, label_rate=0.4, out_of_order_rate=0.0,
                         late_rate=0.0, duplicate_rate=0.03, bad_rate=0.03,
                         end=datetime.now(timezone.utc) - timedelta(hours=1), span=timedelta(hours=10))
    records = list(generate(spec))
    names = topic_names(settings)
    produce(iter(records), settings.kafka.client_properties(), topic_names=names)
    valid = {r.event_id for r in records if r.topic == "transactions" and r.kind in VALID_KINDS}
    assert any(r.kind == DUPLICATE and r.topic == "transactions" for r in records)
    assert run_live(spark, settings, [settings.views["account_velocity"], settings.views["account_fraud_history"]],
                    available_now=True) == 0
    client = redis_client(settings.redis)
    assert run_scoring(settings, client, tracking, f"models:/{name}@champion", until_end=True, spark=spark) == 0

    predictions = committed_predictions(settings)
    ids = [p["event_id"] for p in predictions]
    assert len(ids) == len(set(ids)), "a duplicate prediction"
    assert set(ids) == valid
    # The Delta table: the same predictions, once each, with their vectors.
    table = spark.read.format("delta").load(predictions_path(settings, name))
    assert sorted(r["event_id"] for r in table.select("event_id").collect()) == sorted(ids)
    assert {r["event_id"]: (r["score"], r["features"]) for r in table.collect()} == {
        p["event_id"]: (p["score"], p["features"]) for p in predictions}
    # The ops table has the intervals' figures: every prediction counted once.
    ops = spark.read.format("delta").load(settings.storage.scoring_metrics_path)
    assert ops.agg(F.sum("scored")).first()[0] == len(ids)
    assert {(r["model_name"], r["model_version"]) for r in ops.collect()} == {(name, version)}
    assert {(p["model_name"], p["model_version"]) for p in predictions} == {(name, version)}
    # The score is the model applied to the point-in-time vector of the event.
    expected = expected_vectors(spark, settings)
    pyfunc = load_model(mlflow.MlflowClient(tracking), f"models:/{name}/{version}",
                        servable_features(settings, settings.scoring.topic))
    vectors = [json.loads(p["features"]) for p in predictions]
    wrong = [(i, v, {n: expected[i][n] for n in INPUTS}) for i, v in zip(ids, vectors)
             if any(not same(v[n], expected[i][n]) for n in INPUTS)]
    assert wrong == [], wrong[:3]
    frame = pd.DataFrame([{n: expected[i][n] for n in INPUTS} for i in ids]).astype("float64")
    assert np.allclose([p["score"] for p in predictions], pyfunc.score(frame), rtol=0, atol=1e-12)


def same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))


def test_a_model_input_the_job_cannot_serve_fails_at_start_naming_it(isolated, tracking, tmp_path):
    settings = scoring_settings(isolated)
    name = f"fraud_{uuid.uuid4().hex[:6]}"
    register_model(tracking, tmp_path / "artifacts", name, ["amount_usd", "account_velocity__count_2h"], seed=4)
    with pytest.raises(ConfigError, match=r"input 'account_velocity__count_2h' is no feature the job serves"):
        load_model(mlflow.MlflowClient(tracking), f"models:/{name}@champion",
                   servable_features(settings, settings.scoring.topic))


class CommittedOffsets:
    """The scoring group's committed offsets of the events topic, read from outside the job."""

    def __init__(self, settings: Settings, group: str, topic: str):
        self.topic = topic
        # read_uncommitted: the offsets committed so far. (A read_committed client asks for stable
        # offsets, and the broker makes it wait while a transaction holding offsets is open.)
        self.consumer = Consumer({**settings.kafka.client_properties(), "group.id": group,
                                  "enable.auto.commit": False, "isolation.level": "read_uncommitted"})
        self.partitions = sorted(self.consumer.list_topics(topic, timeout=30).topics[topic].partitions)

    def __call__(self) -> dict[int, int] | None:
        """The committed offsets; None if the broker holds the answer back for an open transaction
        with offsets (the batch in flight has not committed)."""
        try:
            found = self.consumer.committed([TopicPartition(self.topic, p) for p in self.partitions], timeout=5)
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError._TIMED_OUT:
                return None
            raise
        return {tp.partition: tp.offset for tp in found}

    def close(self) -> None:
        self.consumer.close()


def stop_mid_batch(job, client, in_flight_key: str, committed: CommittedOffsets, past: int, log) -> dict[int, int]:
    """SIGSTOPs ``job`` (its process group) once its batch in flight ends past ``past`` offsets in
    all, at an instant when that batch's marks are written and its transaction has not
    committed (checked while it is stopped; else it runs on to the next batch). Returns the
    ends of the batch it was stopped in."""
    deadline = time.monotonic() + 180
    while True:
        assert job.poll() is None, log.read_text()[-5000:]
        assert time.monotonic() < deadline, log.read_text()[-5000:]
        raw = client.get(in_flight_key)
        if raw is not None and sum(json.loads(raw)["ends"].values()) > past:
            os.killpg(job.pid, signal.SIGSTOP)
            ends = {int(p): o for p, o in json.loads(client.get(in_flight_key))["ends"].items()}
            now = committed()
            if now is None or any(now.get(p, -1) < o for p, o in ends.items()):
                return ends
            os.killpg(job.pid, signal.SIGCONT)
        time.sleep(0.001)


def test_killed_twice_mid_batch_and_fenced_while_stalled_no_prediction_is_lost_or_duplicated(
        spark, isolated, tracking, tmp_path):
    settings = scoring_settings(isolated)
    name = f"fraud_{uuid.uuid4().hex[:6]}"
    register_model(tracking, tmp_path / "artifacts", name, INPUTS, seed=5)
    spec = GeneratorSpec(count=1500, accounts=25, merchants=8, seed=82, label_rate=0.3, duplicate_rate=0.03,
                         bad_rate=0.03, end=datetime.now(timezone.utc) - timedelta(hours=1), span=timedelta(hours=10))
    assert spec.out_of_order_rate > 0 and spec.late_rate > 0
    records = list(generate(spec))
    produce(iter(records), settings.kafka.client_properties(), topic_names=topic_names(settings))
    valid = {r.event_id for r in records if r.topic == "transactions" and r.kind in VALID_KINDS}
    assert run_live(spark, settings, [settings.views["account_velocity"], settings.views["account_fraud_history"]],
                    available_now=True) == 0
    client = redis_client(settings.redis)
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    uri = f"models:/{name}@champion"
    args = score_job_args(settings, tracking, uri)
    log = tmp_path / "score.log"
    events_topic = settings.live.events_topic(settings.scoring.topic)
    in_flight_key = ScoreLog(client, settings.redis.namespace, f"{name}@champion", events_topic, 1800).in_flight_key
    committed = CommittedOffsets(settings, f"fp-score.{name}@champion.{events_topic}", events_topic)
    started = []

    def start(*extra: str):
        started.append(start_job("score", conf_dir, log, *args, *extra))
        return started[-1]

    try:
        # SIGKILLed twice, each time stopped first at an instant when the batch's duplicate marks
        # are in Redis and its transaction is open.
        for past in (150, 600):
            job = start()
            stop_mid_batch(job, client, in_flight_key, committed, past, log)
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=60)
        # A third instance stalls mid-batch (a long GC pause, a frozen VM); its replacement
        # starts, fences it and scores to the end. The stalled one wakes up and must commit nothing.
        stalled = start()
        stop_mid_batch(stalled, client, in_flight_key, committed, 1000, log)
        job = start("--until-end")
        deadline = time.monotonic() + 180
        while log.read_text().count(": from offsets") < 4:
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.05)
        os.killpg(stalled.pid, signal.SIGCONT)
        assert stalled.wait(timeout=120) != 0, "the stalled instance went on after its replacement started"
        assert job.wait(timeout=300) == 0, log.read_text()[-5000:]
    finally:
        committed.close()
        for process in started:  # a failed assertion must not leave a stopped job behind
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=60)
    text = log.read_text()
    assert text.count("was in flight at the last stop") == 3, "each restart found the batch in flight"
    assert "fenced" in text.lower(), text[-5000:]
    predictions = committed_predictions(settings)
    ids = [p["event_id"] for p in predictions]
    assert len(ids) == len(set(ids)), "a duplicate prediction among the committed ones"
    assert set(ids) == valid
    assert {p["deployment"] for p in predictions} == {uri}
    # Each counted in its own row, the out-of-order ones too (they are served their entity's
    # features as they stood when they came, with them counted).
    unserved = [p["event_id"] for p in predictions if (json.loads(p["features"])["account_velocity__count_1h"] or 0) < 1]
    assert unserved == []
    # The Delta table, written by the killed jobs' queries too: each prediction once.
    table = [r["event_id"] for r in spark.read.format("delta").load(predictions_path(settings, name)).collect()]
    assert sorted(table) == sorted(ids)


def test_predictions_after_the_alias_moves_carry_the_new_version_without_a_restart(spark, isolated, tracking, tmp_path):
    settings = scoring_settings(isolated)
    settings = dataclasses.replace(settings, scoring=dataclasses.replace(settings.scoring, model_refresh=timedelta(seconds=1)))
    name = f"fraud_{uuid.uuid4().hex[:6]}"
    first = register_model(tracking, tmp_path / "artifacts", name, INPUTS, seed=6)
    views = [settings.views["account_velocity"], settings.views["account_fraud_history"]]
    names = topic_names(settings)

    def send(seed: int, ago: timedelta) -> set[str]:
        # In order: the scores run while fp-live applies these (the scorer waits for its rows),
        # and each vector must still be the point-in-time one.
        spec = GeneratorSpec(count=300, accounts=20, seed=seed, bad_rate=0.0, duplicate_rate=0.0, label_rate=0.0,
                             out_of_order_rate=0.0, late_rate=0.0, end=datetime.now(timezone.utc) - ago,
                             span=timedelta(minutes=30))
        records = list(generate(spec))
        produce(iter(records), settings.kafka.client_properties(), topic_names=names)
        assert run_live(spark, settings, views, available_now=True) == 0
        return {r.event_id for r in records if r.kind in VALID_KINDS}

    client = redis_client(settings.redis)
    stop = threading.Event()
    scorers = []
    before = send(83, timedelta(hours=2))
    thread = threading.Thread(target=run_scoring, args=(settings, client, tracking, f"models:/{name}@champion"),
                              kwargs={"stop": stop, "on_ready": scorers.append}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while len(committed_predictions(settings)) < len(before):
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.5)
        # The new version takes one input more: it is read from its first batch on.
        second = register_model(tracking, tmp_path / "artifacts", name, [*INPUTS, "account_velocity__count_1d"], seed=7)
        time.sleep(2)  # past scoring.model_refresh
        after = send(84, timedelta(hours=1))
        while len(committed_predictions(settings)) < len(before) + len(after):
            assert thread.is_alive() and time.monotonic() < deadline + 120
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=60)
    predictions = {p["event_id"]: p for p in committed_predictions(settings)}
    assert {predictions[i]["model_version"] for i in before} == {first}
    assert {predictions[i]["model_version"] for i in after} == {second} and second != first
    vectors = {i: json.loads(predictions[i]["features"]) for i in before | after}
    assert all(set(vectors[i]) == {*INPUTS, "account_velocity__count_1d"} for i in after)
    expected = expected_vectors(spark, settings)
    wrong = [(i, v) for i, v in vectors.items() if any(not same(value, expected[i][n]) for n, value in v.items())]
    assert wrong == [], wrong[:3]
    assert scorers[0].watcher.model.ref.version == second
    assert scorers[0].waited_batches > 0, "no batch waited for fp-live: the wait was not exercised"


def test_a_redis_restart_mid_batch_is_ridden_through_and_every_transaction_scored_once(
        spark, isolated, platform, tracking, tmp_path, caplog):
    settings = scoring_settings(isolated)
    name = f"fraud_{uuid.uuid4().hex[:6]}"
    register_model(tracking, tmp_path / "artifacts", name, INPUTS, seed=8)
    names = topic_names(settings)

    def send(seed: int, ago: timedelta) -> set[str]:
        spec = GeneratorSpec(count=200, accounts=15, seed=seed, label_rate=0.0, duplicate_rate=0.03, bad_rate=0.03,
                             end=datetime.now(timezone.utc) - ago, span=timedelta(minutes=30))
        records = list(generate(spec))
        produce(iter(records), settings.kafka.client_properties(), topic_names=names)
        return {r.event_id for r in records if r.topic == "transactions" and r.kind in VALID_KINDS}

    # fp-live runs as its job (it rides through Redis restarts itself); the scorer in a thread here.
    log = tmp_path / "live.log"
    live = start_job("live", isolated.conf_dir(settings, tmp_path / "conf"), log,
                     "--views", "account_velocity,account_fraud_history")
    stop = threading.Event()
    failures: list[BaseException] = []

    def score() -> None:
        try:
            run_scoring(settings, redis_client(settings.redis), tracking, f"models:/{name}@champion", stop=stop)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            failures.append(exc)

    scorer = threading.Thread(target=score, daemon=True)
    try:
        before = send(91, timedelta(hours=1))
        events_topic = settings.live.events_topic(settings.scoring.topic)
        admin = AdminClient(settings.kafka.client_properties())
        wait_for(lambda: events_topic in admin.list_topics(timeout=10).topics, 240, "fp-live's events topic", live)
        scorer.start()
        wait_for(lambda: len(committed_predictions(settings)) >= len(before), 240, "the first events' predictions", live)
        # Redis goes down; new events reach the events topic (fp-live's validation needs no
        # Redis) and the scorer's batch meets the dead server while it waits for their rows.
        caplog.set_level(logging.WARNING, logger="pipelines.online.store")
        platform.redis.stop()
        after = send(92, timedelta(minutes=20))
        wait_for(lambda: failures or any("scoring a batch (Redis) failed" in r.getMessage() for r in caplog.records),
                 60, "the scorer's batch meeting the stopped Redis", live)
        platform.redis.start()
        assert not failures, failures
        wait_healthy(platform.redis, timeout=60)
        wait_for(lambda: len(committed_predictions(settings)) >= len(before | after) or not scorer.is_alive(), 240,
                 "the predictions of the events sent while Redis was down", live)
        assert scorer.is_alive() and not failures, failures
    finally:
        stop.set()
        scorer.join(timeout=60)
        if live.poll() is None:
            os.killpg(live.pid, signal.SIGTERM)
        assert live.wait(timeout=120) == 0, log.read_text()[-5000:]
    ids = [p["event_id"] for p in committed_predictions(settings)]
    assert len(ids) == len(set(ids)), "a duplicate prediction"
    assert set(ids) == before | after


def scored_event(event_id: str, partition: int, offset: int, append_minute: int) -> ScoredEvent:
    return ScoredEvent(event_id, 0, append_minute * 60_000_000 + 7, partition, offset, {})


def test_a_duplicate_mark_counts_only_once_the_committed_offsets_pass_its_message(isolated):
    settings = isolated()
    marks = ScoreLog(redis_client(settings.redis), settings.redis.namespace, "fraud@champion", "tx.live", 1800)
    batch = [scored_event("e1", 0, 10, 100), scored_event("e2", 1, 5, 100)]
    marks.mark(batch, {0: 11, 1: 6})
    # Not committed (the batch in flight, or a fenced instance's batch): no mark counts.
    assert marks.scored(batch, {0: 10, 1: 5}) == set()
    assert marks.scored(batch, {0: 11, 1: 5}) == {"e1"}
    # A source duplicate of e1, later in the topic and 20 minutes of append time on.
    assert marks.scored([scored_event("e1", 0, 400, 120)], {0: 400, 1: 6}) == {"e1"}
    # The next start finds that batch in flight unless the committed offsets reached its ends.
    assert marks.start({0: 11, 1: 5}) == {0: 11, 1: 6}
    assert marks.start({0: 11, 1: 6}) is None


def test_duplicate_marks_are_kept_by_append_time_not_by_the_clock(isolated):
    settings = isolated()
    marks = ScoreLog(redis_client(settings.redis), settings.redis.namespace, "fraud@champion", "tx.live", 1800)
    marks.mark([scored_event("e1", 0, 1, 100), scored_event("e4", 0, 2, 100)], {0: 3})
    marks.mark([scored_event("e4", 0, 50, 120)], {0: 51})  # e4 scored again (its batch had not committed)
    # fp-live's replay re-emits e1 with its source append time, however long the outage was.
    marks.mark([scored_event("e2", 0, 60, 131)], {0: 61})
    assert marks.scored([scored_event("e1", 0, 70, 100)], {0: 70}) == {"e1"}
    assert marks.scored([scored_event("e1", 0, 70, 131)], {0: 70}) == {"e1"}  # 31 minutes on
    # Once the newest append time seen is the window (30 min) and a minute past a bucket, it is deleted.
    marks.mark([scored_event("e3", 0, 80, 133)], {0: 81})
    assert marks.scored([scored_event("e1", 0, 90, 100)], {0: 90}) == set()
    assert marks.scored([scored_event("e2", 0, 90, 133)], {0: 90}) == {"e2"}
    assert marks.scored([scored_event("e4", 0, 90, 133)], {0: 90}) == {"e4"}  # its newer mark is kept


def test_an_alias_moved_to_a_version_the_job_cannot_serve_keeps_the_old_version_scoring(isolated, tracking, tmp_path,
                                                                                        caplog):
    settings = isolated()
    name = f"fraud_{uuid.uuid4().hex[:6]}"
    first = register_model(tracking, tmp_path / "artifacts", name, INPUTS, seed=8)
    watcher = ModelWatcher(mlflow.MlflowClient(tracking), f"models:/{name}@champion",
                           servable_features(settings, settings.scoring.topic), refresh_s=0.0)
    register_model(tracking, tmp_path / "artifacts", name, ["amount_usd", "account_velocity__count_2h"], seed=9)
    with caplog.at_level(logging.ERROR, logger="pipelines.scoring.stream"):
        assert watcher.current().ref.version == first
    assert any("could not be refreshed, still scoring with version" in r.getMessage()
               and "account_velocity__count_2h" in r.getMessage() for r in caplog.records)
    third = register_model(tracking, tmp_path / "artifacts", name, INPUTS[:3], seed=10)
    assert watcher.current().ref.version == third
