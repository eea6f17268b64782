"""A registered MLflow model for the scoring tests and the chaos run, the arguments that point
fp-score at it, and the predictions a read_committed consumer sees."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from confluent_kafka import Consumer, TopicPartition
from sklearn.ensemble import HistGradientBoostingClassifier

from pipelines.core.settings import Settings
from pipelines.scoring.model import register_version

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


def score_job_args(settings: Settings, tracking: str, model_uri: str, batch: int = 40) -> list[str]:
    return ["--set", f"scoring.topic={settings.scoring.topic}",
            "--set", f"scoring.predictions_topic={settings.scoring.predictions_topic}",
            "--set", f"scoring.max_batch_events={batch}", "--model", model_uri, "--tracking-uri", tracking]
