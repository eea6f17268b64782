"""The exploration notebook runs top to bottom on a lake the ingest wrote, and its
reconciliation cell reports every record accounted for."""

from __future__ import annotations

from datetime import timedelta

import nbformat
from nbclient import NotebookClient

from pipelines.core.settings import PROJECT_ROOT
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from tests.support import topic_names


def test_exploration_notebook_runs_on_an_ingested_lake(spark, isolated, tmp_path, monkeypatch):
    settings = isolated()
    spec = GeneratorSpec(count=400, seed=2, span=timedelta(hours=6), bad_rate=0.05, label_rate=0.5,
                         label_delay=(timedelta(minutes=5), timedelta(hours=1)))
    produce(generate(spec), settings.kafka.client_properties(), topic_names=topic_names(settings))
    run_ingest(spark, settings, available_now=True)
    monkeypatch.setenv("FP_ENV", "local")
    monkeypatch.setenv("FP_CONF_DIR", str(isolated.conf_dir(settings, tmp_path / "conf")))

    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "explore_bronze.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    last = "".join(o.get("text", "") for o in notebook.cells[-1].outputs)
    status = [line for line in last.splitlines() if line.startswith("status")]
    assert status and status[0].split()[1:] == ["OK", "OK"], last
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3
