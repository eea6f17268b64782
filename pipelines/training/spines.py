"""Spines: the rows a training set is built for (entity keys, a timestamp, labels).

Three sources (:class:`SpineSpec`):

* ``labeled-transactions``: the project's own topics. Each transaction in bronze (optionally only
  those of ``[from_day, to_day)``) with the fraud label the ``labels`` topic gave it by
  ``label_cutoff``: labels arrive days late, and a training set built at a cutoff must not use a
  label that was unknown then. Transactions without a label known at the cutoff are not
  examples (their count is reported). Timestamp: the transaction's ``event_time``.
* ``delta``: any Delta table (pinned to a version), with a timestamp column.
* ``files``: parquet, csv (header, inferred types) or json files.

For the last two, ``label_time_column`` with ``label_cutoff`` keeps only rows whose label time is
at or before the cutoff (rows with a later or null label time are not examples).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from pipelines.core.contract_spec import Contract
from pipelines.core.errors import ConfigError
from pipelines.core.times import parse_day, parse_instant, utc_assuming_local
from pipelines.core.view_spec import FILE_FORMATS

SOURCES = ("labeled-transactions", "delta", "files")


@dataclass(frozen=True)
class SpineSpec:
    """Where the spine comes from; serialised into the MLflow run so a rebuild reads the same
    rows (Delta inputs carry their pinned versions)."""

    source: str
    path: str | None = None
    format: str = "parquet"
    #: delta: the version read (None until pinned by the build).
    version: int | None = None
    timestamp_column: str = "event_time"
    label_time_column: str | None = None
    #: ISO-8601 instant; labels known after it are not used.
    label_cutoff: str | None = None
    #: labeled-transactions: transaction days [from_day, to_day), ISO dates; None = all.
    from_day: str | None = None
    to_day: str | None = None
    transactions_topic: str | None = None
    labels_topic: str | None = None
    transactions_version: int | None = None
    labels_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpineSpec:
        return cls(**data)

    @property
    def cutoff(self) -> datetime | None:
        return parse_instant(self.label_cutoff, "--label-cutoff") if self.label_cutoff else None

    def check(self) -> None:
        """Fail fast, naming the flag, on a spine that cannot be read as asked."""
        if self.source not in SOURCES:
            raise ConfigError(f"--spine: {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.label_cutoff:
            parse_instant(self.label_cutoff, "--label-cutoff")
        if self.source == "labeled-transactions":
            if not self.label_cutoff:
                raise ConfigError("--label-cutoff: required for the labeled-transactions spine "
                                  "(labels arrive late; say which were known)")
            first = parse_day(self.from_day, "--spine-from") if self.from_day else None
            last = parse_day(self.to_day, "--spine-to") if self.to_day else None
            if first and last and first >= last:
                raise ConfigError(f"--spine-to: {self.to_day} must be after --spine-from {self.from_day}")
            return
        if not self.path:
            raise ConfigError(f"--spine-path: required for a {self.source} spine")
        if self.source == "files" and self.format not in FILE_FORMATS:
            raise ConfigError(f"--spine-format: {self.format!r} is not one of {', '.join(FILE_FORMATS)}")
        if bool(self.label_time_column) != bool(self.label_cutoff):
            raise ConfigError("--label-cutoff and --label-time-column: give both (which column says when each "
                              "label became known, and the cutoff) or neither")


def labeled_transactions(transactions: DataFrame, labels: DataFrame, transactions_contract: Contract,
                         labels_contract: Contract, cutoff: datetime) -> DataFrame:
    """One row per transaction that has a label known at ``cutoff``: the transaction's contract
    fields, then the label's own fields (those the transaction does not have, e.g. ``is_fraud``,
    ``label_time``).

    Labels are matched on the labels contract's id field (``transaction_id``). A label is known
    when its event time (``label_time``) is at or before ``cutoff``; of several known labels of
    one transaction the latest wins (then the greatest values, so a rerun picks the same one).
    A transaction delivered twice (same id) counts once. ``cutoff``: aware, or naive local time
    (PySpark's rule for naive datetimes, :func:`~pipelines.core.times.utc_assuming_local`).
    """
    key = labels_contract.id_field
    label_time = labels_contract.event_time_field
    own = [f for f in labels_contract.field_names if f != key and f not in transactions_contract.field_names]
    tx_fields = list(transactions_contract.field_names)
    once = Window.partitionBy(key).orderBy(*[F.col(f).desc_nulls_last() for f in tx_fields])
    unique_transactions = (
        transactions.select(*tx_fields).withColumn("_n", F.row_number().over(once)).where("_n = 1").drop("_n")
    )
    latest = Window.partitionBy(key).orderBy(F.col(label_time).desc(), *[F.col(f).desc_nulls_last() for f in own])
    known = (
        labels.where(F.col(label_time) <= F.lit(utc_assuming_local(cutoff)))
        .select(key, *own)
        .withColumn("_n", F.row_number().over(latest)).where("_n = 1").drop("_n")
    )
    return unique_transactions.join(known, key, "inner")


def labels_known_by(spine: DataFrame, label_time_column: str, cutoff: datetime) -> DataFrame:
    """The rows of a user's spine whose label time is at or before ``cutoff`` (null: unknown);
    a naive ``cutoff`` is local time, as PySpark reads naive datetimes."""
    if label_time_column not in spine.columns:
        raise ConfigError(f"--label-time-column: the spine has no column {label_time_column!r} "
                          f"({', '.join(spine.columns)})")
    return spine.where(F.col(label_time_column) <= F.lit(utc_assuming_local(cutoff)))
