"""fp-score on the real platform: a registered MLflow model, the live path's served rows, Kafka
transactions; every valid transaction scored once, with the feature vector the point-in-time
join gives it."""

from __future__ import annotations

import dataclasses
import json
import os
import random
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
from confluent_kafka import Consumer, TopicPartition
from pyspark.sql import functions as F
from sklearn.ensemble import HistGradientBoostingClassifier

from pipelines.contracts.validation import ValidationRules
from pipelines.core.errors import ConfigError
from pipelines.core.settings import Settings
from pipelines.features.live_stream import run_live
from pipelines.features.transforms import trailing_features
from pipelines.ingest.bronze import bronze_rows, check_records, drop_duplicate_events
from pipelines.local.generator import DUPLICATE, VALID_KINDS, GeneratorSpec, generate, produce
from pipelines.online.store import redis_client
from pipelines.scoring.features import servable_features
from pipelines.scoring.model import load_model, register_version
from pipelines.scoring.sinks import predictions_path
from pipelines.scoring.stream import run_scoring
from pipelines.training.join import point_in_time_join, view_request
from tests.support import start_job, topic_names

#: The test model's inputs: the event's own field, its own trailing rows, and a view of another
#: topic (labels) joined as of its time.
INPUTS = ["amount_usd", "account_velocity__count_1h", "account_velocity__sum_amount_usd_1h",
          "account_velocity__max_amount_usd_1d", "account_velocity__approx_count_distinct_merchant_id_1d",
          "account_fraud_history__count_30d"]


def register_model(tracking: str, artifacts, name: str, inputs: list[str], seed: int, alias: str = "champion") -> str:
    """A small classifier over ``inputs`` (random data: the scores only need to depend on every
    input), saved with its signature and predict_proba as pyfunc, registered as ``name`` with
    ``alias`` on the new version. Returns the version."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({n: rng.gamma(2.0, 50.0, 400) for n in inputs})
    labels = (frame[inputs[0]] + rng.normal(0, 40, 400) > 120).astype(int)
    model = HistGradientBoostingClassifier(max_iter=20, random_state=seed).fit(frame, labels)
    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name("scoring-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "scoring-tests", artifact_location=artifacts.as_uri())
    return register_version(client, experiment_id, lambda path: mlflow.sklearn.save_model(
        model, path, input_example=frame.head(3), pyfunc_predict_fn="predict_proba",
        skops_trusted_types=["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]), name, alias)


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


def committed_predictions(settings: Settings) -> list[dict[str, Any]]:
    """Every prediction a read_committed consumer sees."""
    topic = settings.scoring.predictions_topic
    consumer = Consumer({**settings.kafka.client_properties(), "group.id": f"check-{uuid.uuid4().hex[:6]}",
                         "isolation.level": "read_committed", "enable.auto.commit": False})
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        found = []
        deadline = time.monotonic() + 60
        # Until every partition's position passes its end (a transaction's marker takes an offset).
        while any(tp.offset < ends[tp.partition] for tp in consumer.position([TopicPartition(topic, p) for p in partitions])
                  if ends[tp.partition] > 0):
            assert time.monotonic() < deadline, "the committed predictions were not all read within 60 s"
            message = consumer.poll(1)
            if message is not None and message.error() is None:
                found.append(json.loads(message.value()))
        return found
    finally:
        consumer.close()


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


def score_job_args(settings: Settings, tracking: str, model_uri: str, batch: int = 40) -> list[str]:
    return ["--set", f"scoring.topic={settings.scoring.topic}",
            "--set", f"scoring.predictions_topic={settings.scoring.predictions_topic}",
            "--set", f"scoring.max_batch_events={batch}", "--model", model_uri, "--tracking-uri", tracking]


def test_sigkilled_twice_mid_stream_no_prediction_is_lost_or_duplicated(spark, isolated, tracking, tmp_path):
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
    args = score_job_args(settings, tracking, f"models:/{name}@champion")
    log = tmp_path / "score.log"
    seq_key = f"{settings.redis.namespace}:~score:{name}:{settings.live.events_topic(settings.scoring.topic)}:seq"
    rng = random.Random(9)
    # Killed (the whole process group) twice, each a few batches on, at an arbitrary instant of a batch.
    for target in (4, 12):
        job = start_job("score", conf_dir, log, *args)
        deadline = time.monotonic() + 180
        while int(client.get(seq_key) or 0) < target:
            assert job.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    job = start_job("score", conf_dir, log, *args, "--until-end")
    assert job.wait(timeout=300) == 0, log.read_text()[-5000:]
    predictions = committed_predictions(settings)
    ids = [p["event_id"] for p in predictions]
    assert len(ids) == len(set(ids)), "a duplicate prediction among the committed ones"
    assert set(ids) == valid
    # Each counted in its own row, the out-of-order ones too (they are served their entity's
    # features as they stood when they came, with them counted).
    unserved = [p["event_id"] for p in predictions if (json.loads(p["features"])["account_velocity__count_1h"] or 0) < 1]
    assert unserved == []
    # The Delta table, written by the killed jobs' queries too: each prediction once.
    table = [r["event_id"] for r in spark.read.format("delta").load(predictions_path(settings, name)).collect()]
    assert sorted(table) == sorted(ids)
    # The restarts found the batch in flight at each kill (or none, if the kill fell between two).
    assert log.read_text().count(": from offsets") == 3


def test_predictions_after_the_alias_moves_carry_the_new_version_without_a_restart(spark, isolated, tracking, tmp_path):
    settings = scoring_settings(isolated)
    settings = dataclasses.replace(settings, scoring=dataclasses.replace(settings.scoring, model_refresh=timedelta(seconds=1)))
    name = f"fraud_{uuid.uuid4().hex[:6]}"
    first = register_model(tracking, tmp_path / "artifacts", name, INPUTS, seed=6)
    views = [settings.views["account_velocity"], settings.views["account_fraud_history"]]
    names = topic_names(settings)

    def send(seed: int, ago: timedelta) -> set[str]:
        spec = GeneratorSpec(count=300, accounts=20, seed=seed, bad_rate=0.0, duplicate_rate=0.0, label_rate=0.0,
                             end=datetime.now(timezone.utc) - ago, span=timedelta(minutes=30))
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
    vectors = [json.loads(predictions[i]["features"]) for i in after]
    assert all(set(v) == {*INPUTS, "account_velocity__count_1d"} and v["account_velocity__count_1d"] >= 1 for v in vectors)
    assert scorers[0].watcher.model.ref.version == second
