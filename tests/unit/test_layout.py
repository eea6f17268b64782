"""The layering holds because `make lint` fails when it breaks: on a copy of the code, an import
inside a function, an import from a later stage and a cycle inside one stage each fail the lint,
naming the rule; the code as it is passes. And the online read path, the contract gate and the
generator load without Spark (a cluster-less machine installs the wheel without its [local] extra)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.core.settings import PROJECT_ROOT
from tests.support import BLOCK_SPARK

BIN = Path(sys.executable).parent


def lint_copy(tmp_path: Path) -> Path:
    """A copy of what `make lint` checks, with its configuration."""
    for folder in ("pipelines", "jobs"):
        shutil.copytree(PROJECT_ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("ruff.toml", ".importlinter"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    return tmp_path


def lint(root: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """(ruff, lint-imports) run in ``root`` on its own copy of the packages."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    ruff = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "pipelines", "jobs"], cwd=root, env=env,
                          capture_output=True, text=True)
    imports = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=root, env=env, capture_output=True,
                             text=True)
    return ruff, imports


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_the_code_as_it_is_passes_the_lint(tmp_path):
    ruff, imports = lint(lint_copy(tmp_path))
    assert ruff.returncode == 0, ruff.stdout
    assert imports.returncode == 0, imports.stdout
    assert "Contracts: 3 kept, 0 broken." in imports.stdout


def test_an_import_inside_a_function_fails_the_lint(tmp_path):
    root = lint_copy(tmp_path)
    append(root / "pipelines" / "core" / "times.py",
           "\n\ndef _hidden():\n    from pipelines.ingest.bronze import bronze_rows\n\n    return bronze_rows\n")
    ruff, imports = lint(root)
    assert ruff.returncode == 1
    assert "PLC0415" in ruff.stdout and "pipelines/core/times.py" in ruff.stdout
    # The import graph sees it too: core importing a later stage breaks the layers.
    assert imports.returncode == 1 and "Stages are layers" in imports.stdout and "BROKEN" in imports.stdout


def test_core_importing_a_later_stage_breaks_the_layers(tmp_path):
    root = lint_copy(tmp_path)
    path = root / "pipelines" / "core" / "delta.py"
    path.write_text(path.read_text().replace("from pipelines.core.errors import SourceError",
                                             "from pipelines.core.errors import SourceError\n"
                                             "from pipelines.features.sinks import OnlineResult  # noqa: F401"))
    _, imports = lint(root)
    assert imports.returncode == 1
    assert "pipelines.core.delta -> pipelines.features.sinks" in imports.stdout


def test_a_cycle_between_two_modules_of_one_stage_fails_the_lint(tmp_path):
    root = lint_copy(tmp_path)
    path = root / "pipelines" / "ingest" / "records.py"
    path.write_text(path.read_text().replace("from pyspark.sql import Column, DataFrame",
                                             "import pipelines.ingest.bronze  # noqa: F401\n"
                                             "from pyspark.sql import Column, DataFrame"))
    _, imports = lint(root)
    assert imports.returncode == 1
    assert "No import cycles" in imports.stdout and "BROKEN" in imports.stdout
    assert "pipelines.ingest" in imports.stdout


@pytest.mark.parametrize("module", ["pipelines.online.serving", "pipelines.core.settings", "pipelines.training.reader",
                                    "jobs.contracts", "jobs.generate", "jobs.online", "jobs.monitor"])
def test_the_read_path_the_gate_and_the_generator_import_without_spark(module):
    code = BLOCK_SPARK + f"""
import {module}
from pipelines.core.settings import load_settings
settings = load_settings("local")
assert settings.views["account_velocity"].online.enabled
assert not any(m.split(".")[0] in ("pyspark", "delta", "py4j") for m in sys.modules), sorted(sys.modules)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
