"""The reference a served model's inputs and scores are compared with: the distribution of each
numeric feature and of the score over the training set, binned, logged as ``reference_profile.json``
in the model's training run (:data:`PROFILE_ARTIFACT`) and read back per registered version.

Each distribution (:class:`Binned`) is cut at the training values' quantiles (deciles by default;
repeated edges, as a feature with many equal values gives, are dropped): with edges
``e1 < ... < ek`` the value bins are ``(-inf, e1)``, ``[e1, e2)``, ..., ``[ek, +inf)``, a value
equal to an edge falls in the bin above it, and the first and last bins are open-ended, so every
value has a bin. A missing value (null, NaN) is a bin of its own: a feature that is never missing
in training and always missing at serving has all its rows in a bin the reference says is empty,
which is the largest drift there is, not a feature left out. Shares are of all rows, missing ones
included (the value bins and ``missing`` sum to 1).

Nothing here imports Spark: the training notebook (pandas) builds the profile, and
:mod:`pipelines.scoring.drift` bins the served values with the same edges in Spark.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from pipelines.core.errors import ConfigError

#: The artifact of the model's training run that holds its profile.
PROFILE_ARTIFACT = "reference_profile.json"
#: The name the score's distribution goes by, beside the model's inputs.
SCORE = "score"
#: Quantile bins per distribution (before repeated edges are dropped).
DEFAULT_BINS = 10
FORMAT = 1


@dataclass(frozen=True)
class Binned:
    """A distribution over ``len(edges) + 1`` value bins and a missing bin (module docstring)."""

    #: Strictly increasing, finite cut points.
    edges: tuple[float, ...]
    #: Share of all rows in each value bin, low to high.
    shares: tuple[float, ...]
    #: Share of all rows whose value is missing.
    missing: float

    def __post_init__(self) -> None:
        if len(self.shares) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges need {len(self.edges) + 1} shares, not {len(self.shares)}")
        if any(not math.isfinite(e) for e in self.edges) or any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError(f"edges must be finite and strictly increasing: {self.edges}")

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "shares": list(self.shares), "missing": self.missing}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Binned:
        return cls(tuple(float(e) for e in data["edges"]), tuple(float(s) for s in data["shares"]),
                   float(data["missing"]))


@dataclass(frozen=True)
class ReferenceProfile:
    """The training distribution of every model input (by the signature's names) and of the score."""

    features: Mapping[str, Binned]
    score: Binned
    #: Training rows the shares are of.
    rows: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (edges are finite; shares are plain floats)."""
        return {"format": FORMAT, "rows": self.rows, "features": {n: b.to_dict() for n, b in self.features.items()},
                SCORE: self.score.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        if data.get("format") != FORMAT:
            raise ValueError(f"reference profile format {data.get('format')!r}; this code reads format {FORMAT}")
        return cls({n: Binned.from_dict(b) for n, b in data["features"].items()}, Binned.from_dict(data[SCORE]),
                   int(data["rows"]))


def _as_floats(values: Any, name: str) -> np.ndarray:
    series = pd.Series(values)
    if not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)):
        raise ValueError(f"{name}: {series.dtype} is not numeric (a profile bins numbers; booleans count as 0/1)")
    # Nullable integers and booleans: pd.NA becomes NaN, True 1.0, as the training notebook casts them.
    return series.astype("Float64").to_numpy(dtype="float64", na_value=np.nan)


def binned(values: Any, bins: int = DEFAULT_BINS) -> Binned:
    """The distribution of ``values`` (numbers or booleans; None/NaN/pd.NA are missing) cut at
    its quantiles ``1/bins, ..., (bins-1)/bins`` (linear interpolation, of the finite values;
    repeated edges dropped). No value present: no edges, one value bin with share 0."""
    floats = _as_floats(values, "values")
    if len(floats) == 0:
        raise ValueError("no rows: a distribution needs at least one")
    present = ~np.isnan(floats)
    finite = floats[np.isfinite(floats)]
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])) if len(finite) else np.array([])
    # The number of edges at or below a value is its bin: a value on an edge goes to the bin above.
    counts = np.bincount(np.searchsorted(edges, floats[present], side="right"), minlength=len(edges) + 1)
    total = len(floats)
    return Binned(tuple(float(e) for e in edges), tuple(float(c) / total for c in counts),
                  float((~present).sum()) / total)


def reference_profile(features: pd.DataFrame, scores: Sequence[float] | np.ndarray,
                      bins: int = DEFAULT_BINS) -> ReferenceProfile:
    """The profile of a training frame: one :func:`binned` distribution per column of
    ``features`` (named as the model's inputs, all numeric or boolean: a ValueError names the
    first that is not) and one of ``scores`` (the model's score for each row of ``features``)."""
    if len(scores) != len(features):
        raise ValueError(f"{len(scores)} scores for {len(features)} rows")
    if SCORE in features.columns:
        raise ValueError(f"a feature may not be named {SCORE!r}: the score's distribution goes by that name")
    for name in features.columns:
        _as_floats(features[name], name)
    return ReferenceProfile({str(name): binned(features[name], bins) for name in features.columns},
                            binned(np.asarray(scores, dtype="float64"), bins), len(features))


def load_profile(client: mlflow.MlflowClient, name: str, version: str) -> ReferenceProfile:
    """The profile logged in the training run of registered model ``name`` version ``version``.
    Raises ConfigError naming the version when it is not in the registry, has no run, or its run
    has no :data:`PROFILE_ARTIFACT` (or one this code cannot read)."""
    what = f"model {name} version {version}"
    try:
        run_id = client.get_model_version(name, version).run_id
    except MlflowException as exc:
        raise ConfigError(f"{what}: not in the model registry at {client.tracking_uri}: {exc.message}") from exc
    if not run_id:
        raise ConfigError(f"{what}: registered without a run, so without a {PROFILE_ARTIFACT}")
    if PROFILE_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
        raise ConfigError(f"{what}: its run {run_id} has no {PROFILE_ARTIFACT} (log the training set's profile "
                          f"with the model: pipelines.scoring.profile.reference_profile, as the training notebook does)")
    with tempfile.TemporaryDirectory() as folder:
        text = Path(client.download_artifacts(run_id, PROFILE_ARTIFACT, folder)).read_text()
    try:
        return ReferenceProfile.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{what}: {PROFILE_ARTIFACT} of run {run_id} cannot be read: {exc}") from exc
