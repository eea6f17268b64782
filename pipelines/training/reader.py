"""Read training tables without Spark (no JVM, no session): pandas or pyarrow straight from the
Delta table, through ``deltalake`` (delta-rs). For notebooks and model code.

    from pipelines.training.reader import read_training_set
    frame = read_training_set("fraud_v1")                      # local env, latest version
    frame = read_training_set("fraud_v1", version=3, columns=["is_fraud", "account_velocity__count_1h"])
    table = read_training_arrow("/dbfs/feature-platform/prod/training/fraud_v1")
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import pyarrow as pa
from deltalake import DeltaTable

from pipelines.core.settings import load_settings


def training_table_path(name_or_path: str, env: str = "local", conf_dir: str | None = None) -> str:
    """A path is returned as is; a bare name resolves to ``<storage.root>/training/<name>`` of
    ``env``'s configuration."""
    if "/" in name_or_path or "\\" in name_or_path:
        return name_or_path
    return load_settings(env, conf_dir).storage.training_path(name_or_path)


def read_training_arrow(name_or_path: str, version: int | None = None, columns: Sequence[str] | None = None,
                        env: str = "local", conf_dir: str | None = None) -> pa.Table:
    """The training table (at ``version``, default the latest) as a pyarrow Table; timestamps are
    UTC. ``columns`` reads only those columns (unknown names raise, naming them)."""
    table = DeltaTable(training_table_path(name_or_path, env, conf_dir), version=version)
    if columns is not None:
        available = [f.name for f in table.schema().fields]
        unknown = [c for c in columns if c not in available]
        if unknown:
            raise KeyError(f"training table has no column {', '.join(unknown)} ({', '.join(available)})")
    dataset = table.to_pyarrow_dataset()
    return dataset.to_table(columns=list(columns) if columns is not None else None)


def read_training_set(name_or_path: str, version: int | None = None, columns: Sequence[str] | None = None,
                      env: str = "local", conf_dir: str | None = None) -> pd.DataFrame:
    """The training table as a pandas DataFrame (see :func:`read_training_arrow`). Integer
    columns with nulls become pandas' nullable integers, not floats."""
    return read_training_arrow(name_or_path, version, columns, env, conf_dir).to_pandas(types_mapper=_nullable)


def _nullable(arrow_type: pa.DataType):
    if pa.types.is_integer(arrow_type):
        return pd.Int64Dtype()
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    return None
