"""Build a training set and make it rebuildable: read the spine and the feature tables at pinned
Delta versions, join them point in time (:mod:`pipelines.training.join`), run the leakage guard,
write one Delta training table in one commit, and record the build as an MLflow run.

The run holds what a rebuild and an audit need: parameters (views, features, max ages, mode,
cutoff, spine), every input table as an MLflow dataset input (Delta path, version, a digest of
the version's files), the Kafka offsets behind the bronze rows read, the code version, the
resolved configuration, the request as ``request.json`` (the recipe :func:`rebuild_from_run`
follows), metrics (rows, match and null rates, feature ages, build seconds), a PNG of the
feature distributions and the output's content hash (tag ``content_hash``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import Enum
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import mlflow
from delta.tables import DeltaTable
from matplotlib.figure import Figure
from mlflow.data.delta_dataset_source import DeltaDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.spark_dataset_source import SparkDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType

from pipelines.cdc.tables import attribute_rows
from pipelines.core.delta import current_version, path_exists, read_delta_version
from pipelines.core.errors import ConfigError, PipelineError, SourceError
from pipelines.core.settings import PROJECT_ROOT, Settings
from pipelines.core.times import format_duration, parse_duration
from pipelines.core.view_spec import FeatureView, event_time_column
from pipelines.training.join import (
    DEFAULT_MODE,
    MODES,
    TrainingReport,
    ViewRequest,
    check_leakage,
    content_hash,
    histograms,
    numeric_columns,
    point_in_time_join,
    training_report,
    view_request,
)
from pipelines.training.spines import SpineSpec, labeled_transactions, labels_known_by

log = logging.getLogger(__name__)

REQUEST_ARTIFACT = "request.json"
INPUTS_ARTIFACT = "inputs.json"
HASH_TAG = "content_hash"


class NotReproducible(PipelineError):
    """A rebuild's content differs from the run it rebuilds (nothing is written)."""


@dataclass(frozen=True)
class TrainingSetRequest:
    """Everything that decides a training set's content. ``versions`` pins each view's feature
    table (filled by the build; a rebuild passes the logged ones)."""

    name: str
    spine: SpineSpec
    views: tuple[ViewRequest, ...]
    mode: str = DEFAULT_MODE
    output_path: str | None = None
    versions: Mapping[str, int] = field(default_factory=dict)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if not self.views:
            raise ConfigError("--views: a training set needs at least one view")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", self.name):
            raise ConfigError(f"--output: {self.name!r} is not a table name (letters, digits, _ and -)")
        names = [v.name for v in self.views]
        if len(set(names)) != len(names):
            raise ConfigError(f"--views: a view is named twice ({', '.join(names)})")
        self.spine.check()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "mode": self.mode, "output_path": self.output_path, "spine": self.spine.to_dict(),
            "views": [{**v.describe(), "entity": v.view.entity, "event_time": event_time_column(v.view),
                       "version": self.versions.get(v.name)} for v in self.views],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], settings: Settings) -> TrainingSetRequest:
        """The request a run logged, against today's view definitions: a view that is gone or
        whose entity / event-time column changed since cannot give the same rows, and fails."""
        views, versions = [], {}
        for entry in data["views"]:
            view = settings.views.get(entry["view"])
            if view is None:
                raise ConfigError(f"--from-run: view {entry['view']!r} is no longer declared in conf/features")
            if (view.entity, event_time_column(view)) != (entry["entity"], entry["event_time"]):
                raise ConfigError(f"--from-run: view {view.name}'s entity/event time changed since the run "
                                  f"({entry['entity']}/{entry['event_time']} -> {view.entity}/{event_time_column(view)})")
            views.append(view_request(view, entry["features"], parse_duration(entry["max_age"], "max_age"),
                                      entry["join_key"]))
            versions[view.name] = entry["version"]
        return cls(name=data["name"], spine=SpineSpec.from_dict(data["spine"]), views=tuple(views),
                   mode=data["mode"], output_path=data["output_path"], versions=versions)


@dataclass(frozen=True)
class InputTable:
    """One table a build read: its role (``feature_table``, ``spine``, ``bronze``), name, path,
    Delta version (None for files) and a digest of exactly the files read."""

    role: str
    name: str
    path: str
    version: int | None
    digest: str


@dataclass(frozen=True)
class BuildResult:
    run_id: str
    path: str
    version: int
    rows: int
    content_hash: str
    report: TrainingReport
    seconds: float


# --------------------------------------------------------------------------- reading pinned inputs


def files_digest(spark: SparkSession, frame: DataFrame, delta: bool) -> str:
    """A digest of exactly the files behind ``frame``. A Delta version's data files are immutable
    and uniquely named, so their names are enough (no file-system calls); plain files are
    digested with their sizes and modification times, so a rewrite in place shows."""
    names = sorted(frame.inputFiles())
    if delta:
        entries = names
    else:
        jvm = spark.sparkContext._jvm
        conf = spark.sparkContext._jsc.hadoopConfiguration()
        entries = []
        for name in names:
            path = jvm.org.apache.hadoop.fs.Path(name)
            status = path.getFileSystem(conf).getFileStatus(path)
            entries.append(f"{name}|{status.getLen()}|{status.getModificationTime()}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:32]


def kafka_offsets(frame: DataFrame) -> dict[str, dict[str, int]]:
    """Per Kafka partition of bronze rows: first and last offset and the row count (one grouped
    aggregation; only one row per partition reaches the driver)."""
    rows = frame.groupBy("kafka_partition").agg(
        F.min("kafka_offset").alias("first"), F.max("kafka_offset").alias("last"), F.count(F.lit(1)).alias("rows")
    ).collect()
    return {str(r["kafka_partition"]): {"first": r["first"], "last": r["last"], "rows": r["rows"]}
            for r in sorted(rows, key=lambda r: r["kafka_partition"])}


@dataclass
class LoadedSpine:
    frame: DataFrame
    spec: SpineSpec  # with versions pinned
    inputs: list[InputTable]
    offsets: dict[str, Any]
    #: Label time column the guard checks against the cutoff (None: no cutoff).
    label_time: str | None


def load_spine(spark: SparkSession, settings: Settings, spec: SpineSpec) -> LoadedSpine:
    """The spine's rows, read at pinned versions, with the inputs it read."""
    spec.check()
    if spec.source == "labeled-transactions":
        return _labeled_transactions_spine(spark, settings, spec)
    if spec.source == "delta":
        frame, version = read_delta_version(spark, spec.path, spec.version, "spine")
        pinned = dataclasses.replace(spec, version=version)
        inputs = [InputTable("spine", "spine", spec.path, version, files_digest(spark, frame, delta=True))]
    else:
        reader = spark.read.format(spec.format)
        if spec.format == "csv":
            reader = reader.option("header", "true").option("inferSchema", "true")
        try:
            frame = reader.load(spec.path)
        except Exception as exc:  # noqa: BLE001 - Spark's path errors, as the source's reason
            raise SourceError(f"spine files {spec.path}: {str(exc).strip().splitlines()[0]}") from exc
        pinned = spec
        inputs = [InputTable("spine", "spine", spec.path, None, files_digest(spark, frame, delta=False))]
        # Text formats carry times as strings: parsed here; an unparseable one becomes null,
        # which the leakage guard rejects (null timestamp) rather than the join skipping it.
        for column in (spec.timestamp_column, spec.label_time_column):
            if column and column in frame.columns and isinstance(frame.schema[column].dataType, StringType):
                frame = frame.withColumn(column, F.expr(f"try_cast(`{column}` AS timestamp)"))
    if spec.label_time_column:
        frame = labels_known_by(frame, spec.label_time_column, spec.cutoff)
    return LoadedSpine(frame, pinned, inputs, {}, spec.label_time_column)


def _topic_with_contract(settings: Settings, contract: str, given: str | None) -> str:
    if given:
        if given not in settings.kafka.topics:
            raise ConfigError(f"--spine: topic {given!r} is not declared under kafka.topics")
        return given
    for topic in settings.ingest.topics:
        if settings.kafka.topics[topic].contract == contract:
            return topic
    raise ConfigError(f"--spine labeled-transactions: no ingested topic has contract {contract!r}")


def _labeled_transactions_spine(spark: SparkSession, settings: Settings, spec: SpineSpec) -> LoadedSpine:
    tx_topic = _topic_with_contract(settings, "transactions", spec.transactions_topic)
    label_topic = _topic_with_contract(settings, "labels", spec.labels_topic)
    transactions, tx_version = read_delta_version(spark, settings.storage.bronze_path(tx_topic),
                                                  spec.transactions_version, f"bronze table of {tx_topic}")
    labels, label_version = read_delta_version(spark, settings.storage.bronze_path(label_topic), spec.labels_version,
                                               f"bronze table of {label_topic}")
    inputs = [
        InputTable("bronze", tx_topic, settings.storage.bronze_path(tx_topic), tx_version,
                   files_digest(spark, transactions, delta=True)),
        InputTable("bronze", label_topic, settings.storage.bronze_path(label_topic), label_version,
                   files_digest(spark, labels, delta=True)),
    ]
    if spec.from_day:
        transactions = transactions.where(F.col("event_date") >= F.lit(date.fromisoformat(spec.from_day)))
    if spec.to_day:
        transactions = transactions.where(F.col("event_date") < F.lit(date.fromisoformat(spec.to_day)))
    cutoff = spec.cutoff
    known_labels = labels.where(F.col(settings.contract_for(label_topic).event_time_field) <= F.lit(cutoff))
    offsets = {tx_topic: kafka_offsets(transactions), label_topic: kafka_offsets(known_labels)}
    frame = labeled_transactions(transactions, labels, settings.contract_for(tx_topic),
                                 settings.contract_for(label_topic), cutoff)
    pinned = dataclasses.replace(spec, transactions_topic=tx_topic, labels_topic=label_topic,
                                 transactions_version=tx_version, labels_version=label_version)
    return LoadedSpine(frame, pinned, inputs, offsets, settings.contract_for(label_topic).event_time_field)


# --------------------------------------------------------------------------- MLflow


def tracking_uri(settings: Settings, override: str | None = None) -> str | None:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``mlflow.tracking_uri`` in conf."""
    uri = override or os.environ.get("MLFLOW_TRACKING_URI") or settings.mlflow.tracking_uri
    if uri and uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


class TrackedRun:
    """One MLflow run, written through an explicit client: no process-wide MLflow state is set
    (the fluent API would export ``MLFLOW_TRACKING_URI`` and steer every later build in the
    same process, e.g. a notebook, to this store)."""

    def __init__(self, settings: Settings, uri: str | None, run_name: str):
        self.client = mlflow.MlflowClient(uri)
        self.uri = self.client.tracking_uri
        name = settings.mlflow.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = settings.mlflow.artifact_location
            if location and "://" not in location:
                location = Path(location).as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def params(self, values: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in values.items() if v is not None])

    def tags(self, values: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def metrics(self, values: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])

    def json(self, value: Any, name: str) -> None:
        self.client.log_dict(self.run_id, value, name)

    def file(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def inputs(self, tables: Sequence[InputTable]) -> None:
        logged = [DatasetInput(mlflow_dataset(t.path, t.version, t.digest, t.name)._to_mlflow_entity(),
                               tags=[InputTag(MLFLOW_DATASET_CONTEXT, t.role)]) for t in tables]
        self.client.log_inputs(self.run_id, datasets=logged)

    def end(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def mlflow_dataset(path: str, version: int | None, digest: str, name: str) -> MetaDataset:
    """An MLflow dataset for a table read at ``version`` (None: plain files), for
    ``mlflow.log_input``: no profile, so logging it never scans the table. A model's run logs its
    training table with this (``digest``: the training set's content hash)."""
    class PinnedDeltaSource(DeltaDatasetSource):
        # MLflow's to_dict drops a falsy version, and version 0 is a real one (a table's first).
        def to_dict(self) -> dict[str, Any]:
            return {**super().to_dict(), "delta_table_version": self._delta_table_version}

    source = (PinnedDeltaSource(path=path, delta_table_version=version) if version is not None
              else SparkDatasetSource(path=path))
    return MetaDataset(source=source, name=name, digest=digest[:16])


def code_version() -> dict[str, str]:
    """The git commit of the project checkout, whether tracked files had uncommitted changes,
    and the installed package version; ``unknown`` where not available (a wheel on a cluster)."""
    try:
        package = package_version("feature-platform")
    except PackageNotFoundError:
        package = "unknown"
    commit, dirty = "unknown", "unknown"
    if (PROJECT_ROOT / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                  text=True, check=True, timeout=10).stdout.strip()
            changes = subprocess.run(["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                     capture_output=True, text=True, check=True, timeout=10).stdout.strip()
            commit, dirty = head, str(bool(changes)).lower()
        except (OSError, subprocess.SubprocessError):
            pass
    return {"git_commit": commit, "git_dirty": dirty, "package_version": package}


_SECRET_KEY = re.compile(r"(password|passwd|secret|token|credential|api[_.-]?key|sasl\.jaas)", re.IGNORECASE)
_URI_USER_INFO = re.compile(r"(?<=://)[^/@\s]+@")


def plain(value: Any, key: str = "") -> Any:
    """Settings and requests as JSON-ready values (dataclasses, mappings, durations, dates), with
    anything that may be a secret masked: values under keys that name one (except ``*_env``,
    which hold only a variable's name) and the user-info part of URIs (``https://user:pw@...``).
    The project keeps secrets out of its settings; this guards against a ``--set`` or a URI."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name), f.name) for f in dataclasses.fields(value)}
    if isinstance(value, (Mapping, types.MappingProxyType)):
        return {str(k): plain(v, str(k)) for k, v in value.items()}
    if isinstance(value, str):
        if _SECRET_KEY.search(key) and not key.endswith("_env") and key != "secret_env":
            return "***"
        return _URI_USER_INFO.sub("***@", value)
    if isinstance(value, (list, tuple)):
        return [plain(v, key) for v in value]
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return str(value)


def _plot(hists: Mapping[str, tuple[list[float], list[int]]], title: str, path: Path) -> None:
    # A bare Figure, not pyplot: no backend is chosen, so a notebook's own plotting is untouched.
    columns = list(hists)
    per_row = 4
    rows = max(1, (len(columns) + per_row - 1) // per_row)
    figure = Figure(figsize=(4 * per_row, 2.6 * rows))
    axes = figure.subplots(rows, per_row, squeeze=False)
    for ax in axes.flat[len(columns):]:
        ax.axis("off")
    for ax, column in zip(axes.flat, columns):
        edges, counts = hists[column]
        ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge", color="#4472c4")
        ax.set_title(column, fontsize=8)
        ax.tick_params(labelsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


# --------------------------------------------------------------------------- the build


def pin_versions(spark: SparkSession, settings: Settings, request: TrainingSetRequest) -> dict[str, tuple[DataFrame, int]]:
    """Each view's table at the request's version (or the current one), read once: a computed
    view's feature table, an attributes view's history table as its rows."""
    tables = {}
    for request_view in request.views:
        tables[request_view.name] = read_view_table(spark, settings, request_view.view, request.versions.get(request_view.name))
    return tables


def read_view_table(spark: SparkSession, settings: Settings, view: FeatureView, version: int | None
                    ) -> tuple[DataFrame, int]:
    """``view``'s rows at ``version`` of its table (None: the current one), and that version."""
    what = f"feature table of {view.name}" if view.computed else f"history table of attributes view {view.name}"
    frame, read = read_delta_version(spark, settings.view_table_path(view), version, what)
    if not view.computed:
        frame = attribute_rows(frame, view.entity, view.attributes)
    return frame, read


def build_training_set(spark: SparkSession, settings: Settings, request: TrainingSetRequest,
                       tracking: str | None = None, expected_hash: str | None = None,
                       rebuilt_from: str | None = None, expected_files: Mapping[str, str] | None = None
                       ) -> BuildResult:
    """Build, check, write and record one training set; returns where it went and its hash.

    Fails before writing anything when an input cannot be read (:class:`SourceError`, before the
    run starts), the leakage guard finds a violation (:class:`LeakageError`) or, for a rebuild,
    the content differs from ``expected_hash`` (:class:`NotReproducible`); the run is then
    marked FAILED with what it had logged. ``expected_files`` (``role:name`` -> digest) are the
    file inputs (no Delta version to travel to) a rebuild must find unchanged, or it fails
    before the run starts.
    """
    request.check()
    started = time.monotonic()
    output_path = request.output_path or settings.storage.training_path(request.name)
    tables = pin_versions(spark, settings, request)
    spine = load_spine(spark, settings, request.spine)
    request = dataclasses.replace(request, spine=spine.spec, output_path=output_path,
                                  versions={name: version for name, (_, version) in tables.items()})
    inputs = spine.inputs + [
        InputTable("feature_table", name, settings.view_table_path(settings.views[name]), version,
                   files_digest(spark, frame, delta=True)) for name, (frame, version) in tables.items()
    ]
    for table in inputs:
        expected = (expected_files or {}).get(f"{table.role}:{table.name}")
        if expected is not None and expected != table.digest:
            raise NotReproducible(f"rebuild of run {rebuilt_from}: the {table.role} files at {table.path} changed since "
                                  f"the run (digest {table.digest[:16]} != {expected[:16]}); nothing written")
    check_output(spark, output_path)
    run = TrackedRun(settings, tracking_uri(settings, tracking), f"{request.name}-{request.mode}")
    log.info("training set %s: MLflow run %s at %s; inputs %s", request.name, run.run_id, run.uri,
             ", ".join(f"{t.name}@{t.version if t.version is not None else 'files'}" for t in inputs))
    failed = True
    try:
        _log_request(run, request, settings, spine, inputs, rebuilt_from)
        joined = point_in_time_join(spine.frame, {n: f for n, (f, _) in tables.items()}, request.views,
                                    request.spine.timestamp_column, request.mode)
        training = joined.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            report = training_report(training, request.views, request.spine.timestamp_column, request.mode,
                                     spine.label_time, request.spine.cutoff)
            run.metrics(report.metrics())
            run.json(plain(report), "report.json")
            log.info("training set %s: joined %d rows (%s) in %.0f s; leakage guard: %s", request.name, report.rows,
                     ", ".join(f"{v.name} {v.matched / report.rows:.0%} matched" if report.rows else v.name
                               for v in report.views),
                     time.monotonic() - started, "; ".join(report.violations()) or "OK")
            check_leakage(report)
            digest = content_hash(training)
            if expected_hash is not None and digest != expected_hash:
                raise NotReproducible(f"rebuild of run {rebuilt_from}: content hash {digest} != {expected_hash} "
                                      "(an input changed in place or the code changed); nothing written")
            features = numeric_columns(training, [c for v in request.views for c in v.feature_outputs()])
            with tempfile.TemporaryDirectory() as scratch:
                picture = Path(scratch) / "feature_distributions.png"
                _plot(histograms(training, features), f"{request.name} ({request.mode}, {report.rows} rows)", picture)
                run.file(picture)
            log.info("training set %s: content hash %s, histograms logged (%.0f s); writing %s", request.name,
                     digest[:16], time.monotonic() - started, output_path)
            (training.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
             .option("userMetadata", json.dumps({"mlflow_run_id": run.run_id, HASH_TAG: digest}))
             .save(output_path))
        finally:
            training.unpersist()
        version = current_version(spark, output_path)
        seconds = time.monotonic() - started
        # The hash tag marks a finished build: a rebuild only trusts runs that carry it.
        run.tags({HASH_TAG: digest, "output_path": output_path, "output_version": str(version)})
        run.metrics({"build_seconds": seconds})
        failed = False
    finally:
        run.end(failed)
    log.info("training set %s: %d rows -> %s (version %d) in %.1f s, content hash %s", request.name,
             report.rows, output_path, version, seconds, digest)
    return BuildResult(run.run_id, output_path, version, report.rows, digest, report, seconds)


def check_output(spark: SparkSession, path: str) -> None:
    """Refuse to overwrite anything but a training table: a path that exists must be a Delta
    table whose last commit a build wrote (its ``userMetadata`` names an MLflow run)."""
    if not path_exists(spark, path):
        return
    if not DeltaTable.isDeltaTable(spark, path):
        raise ConfigError(f"--output: {path} exists and is not a Delta table; refusing to overwrite it")
    metadata = DeltaTable.forPath(spark, path).history(1).collect()[0]["userMetadata"] or ""
    if "mlflow_run_id" not in metadata:
        raise ConfigError(f"--output: {path} is a Delta table no training-set build wrote; refusing to overwrite it")


def _log_request(run: TrackedRun, request: TrainingSetRequest, settings: Settings, spine: LoadedSpine,
                 inputs: Sequence[InputTable], rebuilt_from: str | None) -> None:
    params = {
        "name": request.name, "mode": request.mode, "output_path": request.output_path,
        "spine.source": request.spine.source, "spine.path": request.spine.path,
        "spine.timestamp_column": request.spine.timestamp_column, "label_cutoff": request.spine.label_cutoff,
        "spine.days": f"{request.spine.from_day or '-'}..{request.spine.to_day or '-'}",
        "views": ",".join(v.name for v in request.views),
    }
    for view in request.views:
        params[f"features.{view.name}"] = ",".join(view.features)
        params[f"max_age.{view.name}"] = format_duration(view.max_age)
        params[f"join_key.{view.name}"] = view.join_key
    run.params(params)
    tags = {f"code.{k}": v for k, v in code_version().items()}
    tags["mlflow.source.git.commit"] = tags["code.git_commit"]
    if rebuilt_from:
        tags["rebuilt_from"] = rebuilt_from
    for table in inputs:
        tags[f"input.{table.role}.{table.name}"] = f"{table.path}@{table.version if table.version is not None else 'files'}"
    run.tags(tags)
    run.inputs(inputs)
    run.json(request.to_dict(), REQUEST_ARTIFACT)
    run.json(plain(settings), "resolved_config.json")
    run.json({"inputs": [plain(t) for t in inputs], "kafka_offsets": spine.offsets}, INPUTS_ARTIFACT)


def rebuild_from_run(spark: SparkSession, settings: Settings, run_id: str, tracking: str | None = None,
                     output_path: str | None = None) -> BuildResult:
    """Build again what run ``run_id`` built, from the versions it logged (Delta time travel),
    and fail unless the content hash equals the run's. Logged as a new run tagged
    ``rebuilt_from``; writes beside the run's table (``<its path>_rebuilt_<run id[:8]>``), never
    over it, unless ``output_path`` says where. Only a finished build can be rebuilt."""
    uri = tracking_uri(settings, tracking)
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise SourceError(f"--from-run: no run {run_id} at {client.tracking_uri}: "
                          f"{str(exc).splitlines()[0]}") from exc
    expected = run.data.tags.get(HASH_TAG)
    if run.info.status != "FINISHED" or not expected:
        raise SourceError(f"--from-run: run {run_id} is not a finished training-set build (status {run.info.status}"
                          f"{'' if expected else f', no {HASH_TAG} tag'})")
    with tempfile.TemporaryDirectory() as scratch:
        data = json.loads(Path(client.download_artifacts(run_id, REQUEST_ARTIFACT, scratch)).read_text())
        logged = json.loads(Path(client.download_artifacts(run_id, INPUTS_ARTIFACT, scratch)).read_text())
    request = TrainingSetRequest.from_dict(data, settings)
    request = dataclasses.replace(request, output_path=output_path or f"{data['output_path'].rstrip('/')}_rebuilt_{run_id[:8]}")
    files = {f"{i['role']}:{i['name']}": i["digest"] for i in logged["inputs"] if i["version"] is None}
    return build_training_set(spark, settings, request, tracking, expected_hash=expected, rebuilt_from=run_id,
                              expected_files=files)

