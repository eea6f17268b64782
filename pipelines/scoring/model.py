"""The model a scoring job serves, as users deploy it: from the MLflow model registry by alias
(``models:/fraud@champion``), by version (``models:/fraud/3``), or any other model URI
(``runs:/<run id>/model``).

Its signature's inputs are the contract between the model and the platform: each must be a
feature the job can serve (:class:`ServableFeature`, named as the training set names it:
``{view}__{feature}``, or a field of the scored event itself), of a type the input accepts
(:func:`check_inputs`). A model without a signature, or with an input the job cannot serve,
is refused before anything is scored.

The score is the model's pyfunc output: a 1-D output as it is, a 2-D output's last column (a
binary classifier logged with ``pyfunc_predict_fn="predict_proba"``: the positive class's
probability).
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from threadpoolctl import threadpool_limits

from pipelines.core.errors import ConfigError

log = logging.getLogger(__name__)

#: Spark/contract types -> the MLflow signature types an input of that type accepts. Integers
#: and booleans widen to doubles (the training notebook casts every feature to float64).
ACCEPTED_BY = {
    "double": ("double", "float"),
    "bigint": ("long", "double", "float"),
    "long": ("long", "double", "float"),
    "boolean": ("boolean", "double", "float", "long", "integer"),
    "string": ("string",),
    "timestamp": ("datetime",),
}
#: numpy dtypes for the signature types, for the frame handed to the model.
_DTYPES = {"double": "float64", "float": "float32", "long": "int64", "integer": "int32", "boolean": "bool",
           "string": "object", "datetime": "datetime64[us]"}


@dataclass(frozen=True)
class ServableFeature:
    """One value a scoring job can put in a feature vector: ``name`` as the model's signature
    names it, ``type`` (Spark's name: double, bigint, boolean, string, timestamp) and where it
    comes from (``view`` None: a field of the scored event)."""

    name: str
    type: str
    view: str | None = None
    feature: str | None = None
    #: Whether the value can be missing: a view's feature (no row for the entity) or an
    #: optional field of the event.
    nullable: bool = True


@dataclass(frozen=True)
class ModelInput:
    name: str
    type: str  # MLflow's: double, float, long, integer, boolean, string, datetime
    required: bool


@dataclass(frozen=True)
class ModelRef:
    """What a model URI names: the registered model and version when it names one."""

    uri: str
    name: str | None
    version: str | None
    alias: str | None


@dataclass
class ServingModel:
    """A loaded model: its reference, its inputs and the pyfunc that scores."""

    ref: ModelRef
    inputs: list[ModelInput]
    pyfunc: Any

    @property
    def label(self) -> str:
        """``name`` (registered models) or the URI, for the predictions' ``model_name``."""
        return self.ref.name or self.ref.uri

    def score(self, vectors: pd.DataFrame) -> np.ndarray:
        """One score per row of ``vectors`` (columns: the inputs, typed by :func:`model_frame`)."""
        output = self.pyfunc.predict(vectors)
        values = np.asarray(output.to_numpy() if isinstance(output, (pd.DataFrame, pd.Series)) else output,
                            dtype="float64")
        if values.ndim == 2:
            values = values[:, -1]
        if values.shape != (len(vectors),):
            raise RuntimeError(f"model {self.label}: predict gave shape {values.shape} for {len(vectors)} rows")
        return values


def parse_model_uri(uri: str) -> tuple[str | None, str | None, str | None]:
    """(name, version, alias) of a ``models:/`` URI; (None, None, None) for another URI."""
    if not uri.startswith("models:/"):
        return None, None, None
    path = uri[len("models:/"):].strip("/")
    if "@" in path:
        name, alias = path.split("@", 1)
        return name, None, alias
    if "/" in path:
        name, version = path.split("/", 1)
        return name, version, None
    raise ConfigError(f"scoring.model: {uri!r} names no version or alias (models:/<name>@<alias> or models:/<name>/<version>)")


def deployment_key(uri: str) -> str:
    """What names one deployment of a model in Kafka (consumer group, ``transactional.id``),
    Redis and the checkpoints: the URI without its scheme, ``fraud@champion`` for
    ``models:/fraud@champion``, ``fraud.v3`` for ``models:/fraud/3``, the URI with every
    character outside ``[A-Za-z0-9_.@-]`` replaced by ``_`` otherwise. A champion and a
    challenger of one model are two deployments: each scores every event once, apart."""
    name, version, alias = parse_model_uri(uri)
    if name is not None:
        return f"{name}@{alias}" if alias is not None else f"{name}.v{version}"
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", uri)


def resolve(client: mlflow.MlflowClient, uri: str) -> ModelRef:
    """The registered version ``uri`` names now (an alias is followed). Raises ConfigError for a
    model, version or alias the registry does not hold."""
    name, version, alias = parse_model_uri(uri)
    try:
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias).version
        elif version is not None:
            client.get_model_version(name, version)
    except MlflowException as exc:
        raise ConfigError(f"scoring.model: {uri!r} is not in the model registry at {client.tracking_uri}: {exc.message}") from exc
    return ModelRef(uri, name, None if version is None else str(version), alias)


def model_inputs(uri: str, metadata: Any) -> list[ModelInput]:
    """The signature's named inputs. Raises ConfigError for a model without a signature or with
    unnamed (tensor) inputs: the job could not tell which feature goes where."""
    schema = metadata.get_input_schema()
    if schema is None:
        raise ConfigError(f"scoring.model: {uri} has no signature; log it with one (an input_example or signature=)")
    if not schema.has_input_names():
        raise ConfigError(f"scoring.model: {uri} has unnamed inputs; the scoring job feeds named features")
    inputs = []
    for spec in schema.inputs:
        kind = getattr(spec.type, "name", None)
        if kind is None:
            raise ConfigError(f"scoring.model: {uri}: input {spec.name!r} is of type {spec.type}; "
                              f"the scoring job feeds scalar features")
        inputs.append(ModelInput(spec.name, str(kind), bool(spec.required)))
    return inputs


#: Signature types that cannot hold a missing value: MLflow's schema check refuses a batch with a
#: null in such a column (and the same batch would fail again at every restart).
NOT_NULLABLE = ("long", "integer", "boolean")


def check_inputs(uri: str, inputs: Sequence[ModelInput], servable: Mapping[str, ServableFeature]) -> None:
    """Raises ConfigError naming every input that is no servable feature, whose feature's type
    the input does not accept, or that is an integer or boolean input fed by a feature that can
    be missing (every view's: an entity may have no row; an optional field of the event)."""
    problems = []
    for item in inputs:
        feature = servable.get(item.name)
        if feature is None:
            close = sorted(n for n in servable if n.split("__")[-1] == item.name.split("__")[-1])
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"input {item.name!r} is no feature the job serves{hint}")
        elif item.type not in ACCEPTED_BY.get(feature.type, ()):
            problems.append(f"input {item.name!r} is {item.type}, but the feature is {feature.type}")
        elif item.type in NOT_NULLABLE and feature.nullable:
            problems.append(f"input {item.name!r} is {item.type}, but the feature can be missing "
                            f"(train and sign it as double: a missing value is then NaN)")
    if problems:
        raise ConfigError(f"scoring.model {uri}: " + "; ".join(problems))


def load_model(client: mlflow.MlflowClient, uri: str, servable: Mapping[str, ServableFeature]) -> ServingModel:
    """Resolve ``uri`` (an alias to its version now), load that version and check its inputs."""
    ref = resolve(client, uri)
    fixed = f"models:/{ref.name}/{ref.version}" if ref.name and ref.version else uri
    try:
        # From where the client's registry keeps the version (mlflow's own resolution of a
        # models:/ URI would ask the process-wide registry, not this client's).
        source = client.get_model_version_download_uri(ref.name, ref.version) if ref.name and ref.version else uri
        pyfunc = mlflow.pyfunc.load_model(source)
    except MlflowException as exc:
        raise ConfigError(f"scoring.model: {fixed} could not be loaded: {exc.message}") from exc
    inputs = model_inputs(fixed, pyfunc.metadata)
    check_inputs(fixed, inputs, servable)
    log.info("scoring: model %s version %s (%s), %d inputs", ref.name or uri, ref.version or "-", fixed, len(inputs))
    return ServingModel(ref, inputs, pyfunc)


def limit_model_threads(threads: int) -> None:
    """Caps the threads of every native thread pool loaded in the process (OpenMP, BLAS) at
    ``threads``, for the model's calls; call it again after loading a model (a new library may
    have come with it).

    Why: a tree ensemble's predict (scikit-learn's HistGradientBoosting: one OpenMP parallel
    region per tree) on a machine whose cores are busy with other work (the features path's
    JVM and consumer) waits at every region's barrier for a descheduled thread: on this
    2-core machine, 60% of fp-score's CPU samples and 100-800 ms per 1,000-row batch, against
    3 ms single-threaded (BENCHMARKS.md "Streaming scoring")."""
    threadpool_limits(limits=threads)


def register_version(client: mlflow.MlflowClient, experiment_id: str, save: Callable[[str], None], name: str,
                     alias: str | None = None) -> str:
    """Log a model to a new run of ``experiment_id`` and register it as a new version of
    ``name`` (created if missing), moving ``alias`` to it; returns the version. ``save(path)``
    writes the MLflow model folder (e.g. ``mlflow.sklearn.save_model(model, path, ...)``).
    Everything goes through ``client``: no process-wide MLflow state is set (the fluent API
    exports ``MLFLOW_TRACKING_URI`` and would steer every later MLflow call of the process)."""
    run = client.create_run(experiment_id, run_name=f"{name}-model")
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/model"
        save(path)
        client.log_artifacts(run.info.run_id, path, "model")
    client.set_terminated(run.info.run_id)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
    if alias is not None:
        client.set_registered_model_alias(name, alias, version)
    return str(version)


def model_frame(inputs: Sequence[ModelInput], rows: Mapping[str, Sequence[Any]]) -> pd.DataFrame:
    """The model's input frame: one column per input, in the signature's order, converted to
    the input's type (a null stays missing: NaN in a float column, None otherwise)."""
    columns = {}
    for item in inputs:
        values = rows[item.name]
        if item.type in ("double", "float"):
            columns[item.name] = pd.array([np.nan if v is None else float(v) for v in values], dtype=_DTYPES[item.type])
        elif item.type in ("long", "integer") and all(v is not None for v in values):
            columns[item.name] = pd.array([int(v) for v in values], dtype=_DTYPES[item.type])
        else:
            columns[item.name] = pd.Series(list(values), dtype="object" if any(v is None for v in values) else None)
    return pd.DataFrame(columns)
