"""JVM dependencies, resolved by Maven (never by Spark's Ivy ``--packages``, which ignores Maven's
mirror settings) into a git-ignored folder.

* ``spark``: Delta, the Kafka connector and spark-avro with their runtime dependencies, minus
  every artifact pyspark already ships in ``pyspark/jars`` (two copies of one library on the
  classpath is a bug waiting for a classloader). Passed to the session as ``spark.jars``.
* ``kafka``: the Apache Kafka broker and a log4j2 binding, run by :mod:`pipelines.local`.
* ``connect``: a Kafka Connect worker (the broker's version), run by :mod:`pipelines.local`.
* ``debezium-postgres``: Debezium's PostgreSQL connector, a plugin of that worker, in
  ``connect-plugins/debezium-postgres`` (the worker's ``plugin.path`` is ``connect-plugins``:
  each folder under it is one plugin, loaded in isolation).
* ``registry``: the Apicurio Registry distribution (a Quarkus app, ``tar.gz`` from Maven
  Central), unpacked; run by :mod:`pipelines.local` on a Java 21+ JDK.

Usage: ``python -m pipelines.local.jars fetch [--root .local/jars]`` (``make jars``). Fetching is skipped when the
folder was filled from the same descriptor (a stamp file holds the descriptor's hash).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pipelines.core.errors import MissingJarsError
from pipelines.core.settings import PROJECT_ROOT

log = logging.getLogger(__name__)

DESCRIPTORS = Path(__file__).resolve().parent / "jvm"
BUNDLES = ("spark", "kafka", "connect", "debezium-postgres")
#: Where a bundle goes under the jars root, when not in a folder of its own name.
BUNDLE_FOLDERS = {"debezium-postgres": "connect-plugins/debezium-postgres"}
DEFAULT_ROOT = PROJECT_ROOT / ".local" / "jars"
_STAMP = ".descriptor.sha256"
#: The schema registry's distribution: groupId:artifactId:version:type:classifier.
REGISTRY_ARTIFACT = "io.apicurio:apicurio-registry-app:3.3.3:tar.gz:all"
_ARTIFACT = re.compile(r"^(?P<artifact>.+)-(?P<version>\d+(?:\.\d+)+(?:[-.][A-Za-z0-9]+)*)\.jar$")


def artifact_name(jar_file: str) -> str:
    """``delta-spark_4.2_2.13-4.4.0.jar`` -> ``delta-spark_4.2_2.13``; unversioned names as is."""
    match = _ARTIFACT.match(jar_file)
    return match.group("artifact") if match else jar_file.removesuffix(".jar")


def pyspark_artifacts() -> set[str]:
    """The artifacts pyspark ships in ``pyspark/jars`` (found without importing pyspark)."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or spec.origin is None:
        raise MissingJarsError("pyspark is not installed: `make setup` installs it")
    return {artifact_name(p.name) for p in (Path(spec.origin).parent / "jars").glob("*.jar")}


def _descriptor_hash(bundle: str) -> str:
    return hashlib.sha256((DESCRIPTORS / bundle / "pom.xml").read_bytes()).hexdigest()


def bundle_folder(bundle: str, root: Path = DEFAULT_ROOT) -> Path:
    """Where ``bundle``'s jars go under ``root``."""
    return Path(root) / BUNDLE_FOLDERS.get(bundle, bundle)


def is_fetched(bundle: str, root: Path = DEFAULT_ROOT) -> bool:
    stamp = bundle_folder(bundle, root) / _STAMP
    return stamp.exists() and stamp.read_text().strip() == _descriptor_hash(bundle)


def fetch(bundle: str, root: Path = DEFAULT_ROOT, force: bool = False) -> Path:
    """Resolve ``bundle``'s jars with Maven into :func:`bundle_folder`; returns that folder."""
    target = bundle_folder(bundle, root)
    if not force and is_fetched(bundle, root):
        return target
    if shutil.which("mvn") is None:
        raise MissingJarsError("Maven (mvn) is not on PATH: it resolves the project's JVM jars")
    with tempfile.TemporaryDirectory(prefix=f"jars-{bundle}-") as staging:
        command = [
            "mvn", "-q", "-B", "-f", str(DESCRIPTORS / bundle / "pom.xml"),
            "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={staging}",
        ]
        log.info("resolving %s jars: %s", bundle, " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise MissingJarsError(f"mvn failed for the {bundle} jars:\n{result.stdout}{result.stderr}")
        shipped = pyspark_artifacts() if bundle == "spark" else set()
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        kept = []
        for jar in sorted(Path(staging).glob("*.jar")):
            if artifact_name(jar.name) not in shipped:
                shutil.copy2(jar, target / jar.name)
                kept.append(jar.name)
    (target / _STAMP).write_text(_descriptor_hash(bundle))
    log.info("%s jars: %d in %s", bundle, len(kept), target)
    return target


def fetch_registry(root: Path = DEFAULT_ROOT, force: bool = False) -> Path:
    """Download the Apicurio Registry distribution with Maven and unpack it into
    ``root/registry``; returns that folder (it holds ``quarkus-run.jar``)."""
    target = Path(root) / "registry"
    if not force and (target / _STAMP).exists() and (target / _STAMP).read_text().strip() == REGISTRY_ARTIFACT:
        return target
    if shutil.which("mvn") is None:
        raise MissingJarsError("Maven (mvn) is not on PATH: it downloads the schema registry")
    with tempfile.TemporaryDirectory(prefix="registry-") as staging:
        command = ["mvn", "-q", "-B", "dependency:copy", f"-Dartifact={REGISTRY_ARTIFACT}",
                   f"-DoutputDirectory={staging}"]
        log.info("downloading the schema registry: %s", " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True, cwd=staging)
        if result.returncode != 0:
            raise MissingJarsError(f"mvn failed for {REGISTRY_ARTIFACT}:\n{result.stdout}{result.stderr}")
        (archive,) = Path(staging).glob("*.tar.gz")
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    if not (target / "quarkus-run.jar").exists():
        raise MissingJarsError(f"{REGISTRY_ARTIFACT} unpacked without quarkus-run.jar in {target}")
    (target / _STAMP).write_text(REGISTRY_ARTIFACT)
    log.info("schema registry unpacked in %s", target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.local.jars", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder for the jar bundles")
    parser.add_argument("--force", action="store_true", help="fetch even if the stamp matches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for bundle in BUNDLES:
        folder = fetch(bundle, args.root, args.force)
        print(f"{bundle}: {len(list(folder.glob('*.jar')))} jars in {folder}")
    print(f"registry: {fetch_registry(args.root, args.force)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
