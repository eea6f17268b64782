"""fp-model-quality on a real Delta lake and MLflow registry (no Kafka or Redis needed): the
reference profile read back per registered version, the drift and quality tables replaced over
their range (a rerun duplicates nothing), the job's exit 2 naming what is missing, and the
monitoring notebook plotting what the job wrote."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path
from typing import Any

import mlflow
import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from jobs import model_quality
from pipelines.core.config import deep_merge, read_yaml
from pipelines.core.errors import ConfigError
from pipelines.core.settings import PROJECT_ROOT, Settings, load_settings
from pipelines.scoring.monitoring import MonitoringRange, labels_topic, refresh_monitoring
from pipelines.scoring.profile import PROFILE_ARTIFACT, Binned, ReferenceProfile, load_profile
from pipelines.scoring.sinks import predictions_path
from tests.support import naive, utc

PROFILE = ReferenceProfile({"x": Binned((1.0, 2.0), (0.25, 0.5, 0.25), 0.0)}, Binned((0.5,), (0.5, 0.5), 0.0), 100)
PREDICTIONS = ("event_id string, entity string, score double, model_name string, model_version string, "
               "event_time timestamp, scored_time timestamp, features string, kafka_partition int, kafka_offset long, "
               "event_date date")
LABELS = "transaction_id string, account_id string, is_fraud boolean, label_time timestamp, event_date date"
#: (event id, version, event time, score, x): hours 10 and 11 of 2026-11-23, and one the day before.
SCORED = [("tx-1", "1", "2026-11-23 10:05:00", 0.9, 0.5), ("tx-2", "1", "2026-11-23 10:40:00", 0.2, 1.5),
          ("tx-3", "1", "2026-11-23 11:10:00", 0.7, 2.5), ("tx-0", "1", "2026-11-22 23:30:00", 0.4, 1.0)]
RANGE = MonitoringRange.covering(utc("2026-11-23 00:00:00"), utc("2026-11-23 12:00:00"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A tracking store where ``fraud`` version 1 has its profile logged and ``bare`` version 1
    has none. Returns its URI."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("model-quality-tests", artifact_location=(folder / "artifacts").as_uri())
    for name, profile in (("fraud", PROFILE), ("bare", None)):
        run = client.create_run(experiment)
        if profile is not None:
            client.log_dict(run.info.run_id, profile.to_dict(), PROFILE_ARTIFACT)
        client.log_text(run.info.run_id, "a model folder would be here", "model/README")
        client.set_terminated(run.info.run_id)
        client.create_registered_model(name)
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return uri


def lake(spark, base_overrides: dict[str, Any], root: Path, model: str = "fraud",
         rows: list[tuple] = SCORED) -> Settings:
    """Settings whose lake at ``root`` holds ``model``'s predictions ``rows`` and the labels of
    tx-1 (fraud) and tx-2 (not; first labeled fraud, then corrected)."""
    settings = load_settings("local", PROJECT_ROOT / "conf", deep_merge(base_overrides, {"storage": {"root": str(root)}}))
    predictions = [(tx, "acct-1", score, model, version, naive(when), naive(when), f'{{"x": {x}}}', 0, offset,
                    naive(when).date()) for offset, (tx, version, when, score, x) in enumerate(rows)]
    (spark.createDataFrame(predictions, PREDICTIONS).write.format("delta").partitionBy("event_date")
     .save(predictions_path(settings, model)))
    labels = [("tx-1", True, "2026-11-24 08:00:00"), ("tx-2", True, "2026-11-24 08:00:00"),
              ("tx-2", False, "2026-11-25 08:00:00")]
    (spark.createDataFrame([(tx, "acct-1", fraud, naive(when), naive(when).date()) for tx, fraud, when in labels], LABELS)
     .write.format("delta").partitionBy("event_date").save(settings.storage.bronze_path(labels_topic(settings))))
    return settings


def conf_dir(base_overrides: dict[str, Any], root: Path, dest: Path) -> Path:
    """A conf folder whose ``local`` environment is the test settings with the lake at ``root``:
    for the job's ``--conf-dir`` and the notebook's ``FP_CONF_DIR``."""
    shutil.copytree(PROJECT_ROOT / "conf", dest)
    local = deep_merge(read_yaml(dest / "local.yaml"), deep_merge(base_overrides, {"storage": {"root": str(root)}}))
    (dest / "local.yaml").write_text(yaml.safe_dump(local))
    return dest


def table_rows(spark, path: str) -> list[tuple]:
    """Every row of a monitoring table but its computed_at, sorted."""
    frame = spark.read.format("delta").load(path)
    return sorted(tuple(r) for r in frame.drop("computed_at").collect())


def test_the_profile_logged_with_a_version_is_read_back(registry):
    assert load_profile(mlflow.MlflowClient(registry), "fraud", "1") == PROFILE


def test_a_version_without_its_profile_fails_naming_it(registry):
    with pytest.raises(ConfigError, match=r"model bare version 1: its run \w+ has no reference_profile\.json"):
        load_profile(mlflow.MlflowClient(registry), "bare", "1")


def test_a_rerun_over_the_same_range_leaves_the_same_rows(spark, base_overrides, registry, tmp_path):
    settings = lake(spark, base_overrides, tmp_path / "lake")
    client = mlflow.MlflowClient(registry)

    refresh_monitoring(spark, settings, client, "fraud", RANGE)
    drift, quality = (table_rows(spark, settings.storage.feature_drift_path),
                      table_rows(spark, settings.storage.model_quality_path))
    refresh_monitoring(spark, settings, client, "fraud", RANGE)

    # Hours 10 and 11, features x and score; the one day 2026-11-23 (tx-0 is outside the range).
    assert [(r[1], r[2], r[3]) for r in drift] == [("1", naive(f"2026-11-23 {h}:00:00"), f)
                                                  for h in (10, 11) for f in ("score", "x")]
    assert [r[:9] for r in quality] == [("fraud", "1", date(2026, 11, 23), 0.5, 3, 2, 1, 2, 1)]
    assert table_rows(spark, settings.storage.feature_drift_path) == drift
    assert table_rows(spark, settings.storage.model_quality_path) == quality


def test_a_rerun_over_part_of_the_range_keeps_the_rest(spark, base_overrides, registry, tmp_path):
    settings = lake(spark, base_overrides, tmp_path / "lake")
    client = mlflow.MlflowClient(registry)
    refresh_monitoring(spark, settings, client, "fraud", RANGE)
    drift = table_rows(spark, settings.storage.feature_drift_path)

    refresh_monitoring(spark, settings, client, "fraud",
                       MonitoringRange.covering(utc("2026-11-23 11:00:00"), utc("2026-11-23 12:00:00")))

    assert table_rows(spark, settings.storage.feature_drift_path) == drift
    assert len(table_rows(spark, settings.storage.model_quality_path)) == 1


def test_an_event_scored_twice_by_one_version_counts_once(spark, base_overrides, registry, tmp_path):
    # Two deployments serving version 1 both scored tx-1.
    settings = lake(spark, base_overrides, tmp_path / "lake", rows=SCORED + [SCORED[0]])

    refresh_monitoring(spark, settings, mlflow.MlflowClient(registry), "fraud", RANGE)

    (quality,) = table_rows(spark, settings.storage.model_quality_path)
    assert quality[4] == 3  # scored
    assert [r[4] for r in table_rows(spark, settings.storage.feature_drift_path)] == [2, 2, 1, 1]  # rows per hour


def test_the_job_exits_2_naming_a_version_without_its_profile(spark, base_overrides, registry, tmp_path, capsys):
    lake(spark, base_overrides, tmp_path / "lake", model="bare")
    conf = conf_dir(base_overrides, tmp_path / "lake", tmp_path / "conf")

    code = model_quality.main(["--env", "local", "--conf-dir", str(conf), "--model", "bare", "--tracking-uri", registry,
                               "--from", "2026-11-23T00:00:00Z", "--to", "2026-11-23T12:00:00Z"])

    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("model_quality: error: model bare version 1: its run") and "no reference_profile.json" in err


def test_the_job_exits_2_naming_a_model_without_predictions(spark, base_overrides, registry, tmp_path, capsys):
    conf = conf_dir(base_overrides, tmp_path / "lake", tmp_path / "conf")

    code = model_quality.main(["--env", "local", "--conf-dir", str(conf), "--model", "fraud", "--tracking-uri", registry])

    assert code == 2
    assert f"--model fraud: no predictions table at {tmp_path / 'lake'}/predictions/fraud" in capsys.readouterr().err


def test_the_monitor_notebook_plots_what_the_job_wrote(spark, base_overrides, registry, tmp_path, monkeypatch, capsys):
    settings = lake(spark, base_overrides, tmp_path / "lake")
    conf = conf_dir(base_overrides, tmp_path / "lake", tmp_path / "conf")
    assert model_quality.main(["--env", "local", "--conf-dir", str(conf), "--tracking-uri", registry,
                               "--from", "2026-11-23T00:00:00Z", "--to", "2026-11-23T12:00:00Z"]) == 0
    assert "model quality fraud versions 1: drift" in capsys.readouterr().out
    drift_rows = spark.read.format("delta").load(settings.storage.feature_drift_path).count()
    monkeypatch.setenv("FP_ENV", "local")
    monkeypatch.setenv("FP_CONF_DIR", str(conf))
    monkeypatch.delenv("FP_MODEL", raising=False)

    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "monitor_model.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"drift: {drift_rows} rows, versions 1, 2 features, 2 hours" in text, text
    assert "quality: 1 rows, 1 days" in text, text
    # The heat map, the PSI lines, and the quality per day.
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 3
