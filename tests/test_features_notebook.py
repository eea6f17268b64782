"""The feature exploration notebook runs top to bottom on a lake and an online store the
features job wrote: its online check covers every entity of every view and finds Redis holding
exactly the latest Delta row of each, and it draws its plots."""

from __future__ import annotations

from datetime import timedelta

import nbformat
from nbclient import NotebookClient

from pipelines.config import PROJECT_ROOT
from pipelines.features import run_features
from pipelines.generator import GeneratorSpec, generate, produce
from pipelines.ingest import run_ingest
from tests.conftest import topic_names


def test_feature_notebook_finds_every_online_value_equal_to_the_latest_feature_row(
        spark, isolated, tmp_path, monkeypatch):
    settings = isolated()
    spec = GeneratorSpec(count=800, accounts=30, merchants=10, seed=5, span=timedelta(hours=6), label_rate=0.4,
                         label_delay=(timedelta(minutes=5), timedelta(hours=2)))
    produce(generate(spec), settings.kafka.client_properties(), topic_names=topic_names(settings))
    run_ingest(spark, settings, available_now=True)
    views = list(settings.views.values())
    assert run_features(spark, settings, views, available_now=True) == 0
    # The reference: every distinct entity of each feature table must be checked.
    entities = {view.name: spark.read.format("delta").load(settings.storage.feature_path(view.name))
                .select(view.entity).distinct().count() for view in views}
    monkeypatch.setenv("FP_ENV", "local")
    monkeypatch.setenv("FP_CONF_DIR", str(isolated.conf_dir(settings, tmp_path / "conf")))

    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "explore_features.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    checks = {line.split()[2]: line for line in text.splitlines() if line.startswith("online check ")}
    assert sorted(checks) == sorted(entities), text
    assert len([line for line in text.splitlines() if line.startswith("online check ")]) == len(entities), text
    for name, n in entities.items():
        assert n > 0, name
        assert checks[name].split()[3:5] == ["OK", f"{n}/{n}"], checks[name]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2
