"""The notebooks run top to bottom on demo data that the real jobs wrote (generator -> Kafka ->
ingest -> feature streams), built once for the module:

* explore_features: its online check covers every entity of every view and finds Redis holding
  exactly the latest Delta row of each, and it draws its plots;
* train_fraud_model: builds a training set, trains on it with pandas, and logs a model whose
  MLflow run points at the training-set run that built exactly the data it read, registered
  as ``fraud@champion`` with inputs fp-score serves, and its training distributions beside it
  (``reference_profile.json``, for fp-model-quality)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import mlflow
import nbformat
import pytest
from nbclient import NotebookClient

from pipelines.core.settings import PROJECT_ROOT
from pipelines.features.stream import run_features
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from pipelines.scoring.features import servable_features
from pipelines.scoring.model import load_model
from pipelines.scoring.profile import load_profile
from pipelines.training.join import content_hash
from tests.support import topic_names


@pytest.fixture(scope="module")
def demo(spark, isolated_module, tmp_path_factory):
    """Settings whose lake holds bronze, dead letters and every view's table, and the conf dir
    the notebooks read them from."""
    settings = isolated_module()
    # Every transaction labeled (5 min - 2 h later) and a high fraud rate: enough positives for a model.
    spec = GeneratorSpec(count=1500, accounts=30, merchants=10, seed=5, span=timedelta(hours=6), label_rate=1.0,
                         fraud_rate=0.08, label_delay=(timedelta(minutes=5), timedelta(hours=2)))
    produce(generate(spec), settings.kafka.client_properties(), topic_names=topic_names(settings))
    run_ingest(spark, settings, available_now=True)
    assert run_features(spark, settings, list(settings.computed_views.values()), available_now=True) == 0
    return settings, isolated_module.conf_dir(settings, tmp_path_factory.mktemp("conf") / "conf")


def run_notebook(name: str, conf_dir: Path, folder: Path, monkeypatch) -> list[dict]:
    monkeypatch.setenv("FP_ENV", "local")
    monkeypatch.setenv("FP_CONF_DIR", str(conf_dir))
    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


def text_of(outputs: list[dict]) -> str:
    return "".join(o.get("text", "") for o in outputs)


def images_in(outputs: list[dict]) -> int:
    return len([o for o in outputs if "image/png" in o.get("data", {})])


def test_feature_notebook_finds_every_online_value_equal_to_the_latest_feature_row(spark, demo, tmp_path, monkeypatch):
    settings, conf_dir = demo
    views = list(settings.computed_views.values())
    # The reference: every distinct entity of each feature table must be checked.
    entities = {view.name: spark.read.format("delta").load(settings.storage.feature_path(view.name))
                .select(view.entity).distinct().count() for view in views}

    outputs = run_notebook("explore_features.ipynb", conf_dir, tmp_path, monkeypatch)

    text = text_of(outputs)
    checks = {line.split()[2]: line for line in text.splitlines() if line.startswith("online check ")}
    assert sorted(checks) == sorted(entities), text
    assert len([line for line in text.splitlines() if line.startswith("online check ")]) == len(entities), text
    for name, n in entities.items():
        assert n > 0, name
        assert checks[name].split()[3:5] == ["OK", f"{n}/{n}"], checks[name]
    assert images_in(outputs) >= 2


def test_training_notebook_logs_a_model_linked_to_the_run_that_built_its_data(spark, demo, tmp_path, monkeypatch):
    settings, conf_dir = demo

    outputs = run_notebook("train_fraud_model.ipynb", conf_dir, tmp_path, monkeypatch)

    text = text_of(outputs)
    (line,) = [line for line in text.splitlines() if line.startswith("model run ")]
    model_run_id, training_run_id = line.split()[2], line.split()[-1]
    client = mlflow.MlflowClient(settings.mlflow.tracking_uri)
    training_run, model_run = client.get_run(training_run_id), client.get_run(model_run_id)
    assert training_run.info.status == model_run.info.status == "FINISHED"
    assert model_run.data.tags["mlflow.parentRunId"] == training_run_id
    assert model_run.data.tags["training_set.run_id"] == training_run_id
    # The table the model read is exactly the one the training-set run hashed.
    table = spark.read.format("delta").option("versionAsOf", int(model_run.data.tags["training_set.version"])).load(
        training_run.data.tags["output_path"])
    assert content_hash(table) == training_run.data.tags["content_hash"] == model_run.data.tags["training_set.content_hash"]
    (source,) = [json.loads(i.dataset.source) for i in model_run.inputs.dataset_inputs]
    assert source["delta_table_version"] == int(model_run.data.tags["training_set.version"])
    assert table.count() == training_run.data.metrics["rows"] > 500
    (model,) = client.search_logged_models([model_run.info.experiment_id],
                                           filter_string=f"source_run_id = '{model_run_id}'")
    assert model.name == "model"
    # The generator makes large amounts and one merchant in ten riskier: a model must find it.
    assert model_run.data.metrics["test_roc_auc"] > 0.7, text
    assert images_in(outputs) >= 2  # the build's feature distributions, ROC / PR curves
    # Registered and aliased: fp-score can load it and serve every input of its signature.
    (registered,) = [line for line in text.splitlines() if line.startswith("registered fraud version ")]
    version = registered.split()[3]
    assert str(client.get_model_version_by_alias("fraud", "champion").version) == version
    assert client.get_model_version("fraud", version).run_id == model_run_id
    served = load_model(client, "models:/fraud@champion", servable_features(settings, settings.ingest.topics[0]))
    assert served.ref.version == version and len(served.inputs) > 10
    # Its training distributions for fp-model-quality: every input and the score, over the training rows.
    profile = load_profile(client, "fraud", version)
    assert sorted(profile.features) == sorted(i.name for i in served.inputs)
    assert profile.rows == int(table.count() * 0.75)
