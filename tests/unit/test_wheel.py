"""The wheel the bundle installs on a cluster: it must not bring its own Spark, Delta or MLflow
(pip would lay them over the runtime's), and it carries every stage package and what the jobs
need from the repository (the JVM descriptors)."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from pipelines.core.settings import PROJECT_ROOT

#: What a Databricks runtime provides: never a plain requirement of the wheel.
RUNTIME_PROVIDED = {"pyspark", "delta-spark", "mlflow", "matplotlib"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a clean copy: a build/ folder left in the checkout would leak old files in.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    shutil.copy(PROJECT_ROOT / "setup.py", source / "setup.py")
    for package in ("pipelines", "jobs"):
        shutil.copytree(PROJECT_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("feature_platform-*.whl")
    return path


def metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(archive.read(name).decode())


def requirement_name(line: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", line, maxsplit=1)[0].lower()


def test_the_runtimes_own_packages_are_only_in_the_local_extra(wheel):
    requires = metadata(wheel).get_all("Requires-Dist")
    plain = {requirement_name(r) for r in requires if "extra ==" not in r}
    local = {requirement_name(r) for r in requires if re.search(r"""extra == ["']local["']""", r)}
    assert not plain & RUNTIME_PROVIDED, plain & RUNTIME_PROVIDED
    assert RUNTIME_PROVIDED <= local
    assert {"confluent-kafka", "redis", "deltalake"} <= plain


def test_packages_a_runtime_ships_are_ranges_that_keep_the_runtimes_copy(wheel):
    requires = [r for r in metadata(wheel).get_all("Requires-Dist") if "extra ==" not in r]
    for name in ("pandas", "pyarrow", "pyyaml"):
        (line,) = [r for r in requires if requirement_name(r) == name]
        assert "==" not in line, line


def test_the_wheel_carries_every_stage_package_and_the_jvm_descriptors(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for stage in ("core", "contracts", "ingest", "features", "online", "batch", "training", "local"):
        assert f"pipelines/{stage}/__init__.py" in names, stage
    assert {"pipelines/local/jvm/spark/pom.xml", "pipelines/local/jvm/kafka/pom.xml"} <= names
    # Every module lives in a stage package: nothing beside them at the top of pipelines/.
    assert sorted(n for n in names if re.fullmatch(r"pipelines/[^/]+\.py", n)) == ["pipelines/__init__.py"]


def test_the_wheel_installs_on_the_runtimes_python_and_the_local_one(wheel):
    accepted = SpecifierSet(metadata(wheel)["Requires-Python"])
    assert ("3.12.3" in accepted, "3.11.7" in accepted) == (True, True)  # DBR 18 LTS; the local venv


def imported_modules() -> dict[str, set[str]]:
    """Top-level modules imported by the package, the jobs and the notebooks, by where."""
    found: dict[str, set[str]] = {}
    for path in [*(PROJECT_ROOT / "pipelines").rglob("*.py"), *(PROJECT_ROOT / "jobs").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(PROJECT_ROOT)))
    for notebook in (PROJECT_ROOT / "notebooks").glob("*.ipynb"):
        for cell in json.loads(notebook.read_text())["cells"]:
            if cell["cell_type"] == "code":
                for name in re.findall(r"^\s*(?:from|import)\s+(\w+)", "".join(cell["source"]), re.M):
                    found.setdefault(name, set()).add(str(notebook.relative_to(PROJECT_ROOT)))
    return found


def test_every_third_party_import_is_a_declared_requirement_or_extra(wheel):
    declared = {requirement_name(r).replace("_", "-") for r in metadata(wheel).get_all("Requires-Dist")}
    providers = packages_distributions()
    undeclared = {}
    for module, where in imported_modules().items():
        if module in sys.stdlib_module_names or module in ("pipelines", "jobs", "__future__"):
            continue
        names = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not names & declared:
            undeclared[module] = (sorted(names), sorted(where)[:2])
    assert undeclared == {}
