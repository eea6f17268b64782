"""``fp-model-quality``: a served model's drift and quality over a time range, recomputed from its
predictions table and the labels, written to ``ops/feature_drift`` and ``ops/model_quality``.

* **Drift**: the whole UTC hours of the range, each model version's predictions against the
  reference profile logged with its training run (:func:`pipelines.scoring.profile.load_profile`),
  :func:`pipelines.scoring.drift.hourly_psi`.
* **Quality**: the whole UTC days the range touches (a day's figures are of all its
  predictions, never of part of it), with the labels the bronze table of the labels topic holds
  now, :func:`pipelines.scoring.drift.daily_quality`.

Idempotent: each table's rows of the model over the recomputed hours (days) are replaced in one
Delta commit (``replaceWhere`` on the model name and the time range): a rerun over the same range
leaves the same rows, never a second copy, and rows outside the range are kept. Rerun it as
labels arrive: a day's quality changes as its labels come in (``computed_at`` says when).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import mlflow
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from pipelines.core.delta import ensure_delta_table
from pipelines.core.errors import ConfigError
from pipelines.core.settings import Settings
from pipelines.core.times import day_start, utc_assuming_local
from pipelines.scoring.drift import (
    FEATURE_DRIFT_SCHEMA,
    MODEL_QUALITY_SCHEMA,
    daily_quality,
    hourly_psi,
)
from pipelines.scoring.profile import ReferenceProfile, load_profile
from pipelines.scoring.sinks import read_predictions as read_model_predictions

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
#: A PSI above this is a large shift (the usual reading; see hourly_psi).
LARGE_PSI = 0.25


@dataclass(frozen=True)
class MonitoringRange:
    """Whole UTC hours ``[start, end)``; the quality covers the days they touch."""

    start: datetime
    end: datetime

    @classmethod
    def covering(cls, start: datetime, end: datetime) -> MonitoringRange:
        """The whole hours covering ``[start, end)`` (``start`` down to its hour, ``end`` up to
        the next one unless on one; naive datetimes are local time). ConfigError naming
        ``--to`` unless it is after ``--from``."""
        start, end = utc_assuming_local(start), utc_assuming_local(end)
        if end <= start:
            raise ConfigError(f"--to {end.isoformat()} must be after --from {start.isoformat()}")
        floor = start.replace(minute=0, second=0, microsecond=0)
        ceiling = end.replace(minute=0, second=0, microsecond=0)
        return cls(floor, ceiling if ceiling == end else ceiling + HOUR)

    @property
    def first_day(self) -> date:
        return self.start.date()

    @property
    def end_day(self) -> date:
        """The day after the last one the range touches (exclusive)."""
        return (self.end - timedelta(microseconds=1)).date() + timedelta(days=1)

    def __str__(self) -> str:
        return f"{self.start:%Y-%m-%dT%H:%MZ}..{self.end:%Y-%m-%dT%H:%MZ}"


@dataclass(frozen=True)
class MonitoringOutcome:
    model: str
    range: MonitoringRange
    versions: tuple[str, ...]
    drift_rows: int
    quality_rows: int
    #: (version, hour, feature, psi) of the hours over LARGE_PSI, largest first.
    large: tuple[tuple[str, datetime, str, float], ...]


def _sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sql_timestamp(moment: datetime) -> str:
    return f"TIMESTAMP'{moment.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S}Z'"


def read_predictions(spark: SparkSession, settings: Settings, model: str, start: datetime, end: datetime) -> DataFrame:
    """``model``'s predictions with an event time in ``[start, end)``
    (:func:`pipelines.scoring.sinks.read_predictions`), one per model version and event id (two
    deployments serving one version score an event twice: the first scored is kept)."""
    rows, _ = read_model_predictions(spark, settings, model, start, end)
    once = Window.partitionBy("model_version", "event_id").orderBy("scored_time", "kafka_partition", "kafka_offset")
    return (rows.where(F.col("model_name") == model)
            .withColumn("_n", F.row_number().over(once)).where("_n = 1").drop("_n"))


def labels_topic(settings: Settings) -> str:
    """The ingested topic that carries the ``labels`` contract."""
    topics = [t for t in settings.ingest.topics if settings.kafka.topics[t].contract == "labels"]
    if not topics:
        raise ConfigError(f"ingest.topics: no topic carries the labels contract ({', '.join(settings.ingest.topics)})")
    return topics[0]


def read_labels(spark: SparkSession, settings: Settings) -> DataFrame:
    """The labels as bronze holds them now (``transaction_id``, ``is_fraud``, ``label_time``); none,
    with a warning, before the labels topic's first ingest."""
    path = settings.storage.bronze_path(labels_topic(settings))
    if not DeltaTable.isDeltaTable(spark, path):
        log.warning("model quality: no labels table at %s yet: every prediction counts as unlabeled", path)
        return spark.createDataFrame([], "transaction_id string, is_fraud boolean, label_time timestamp")
    return spark.read.format("delta").load(path).select("transaction_id", "is_fraud", "label_time")


def profiles_of(client: mlflow.MlflowClient, model: str, versions: list[str | None]) -> dict[str, ReferenceProfile]:
    """Each version's reference profile; ConfigError naming every version without one (and
    predictions without a version: a model served outside the registry has no profile)."""
    if None in versions:
        raise ConfigError(f"--model {model}: predictions without a model version (served outside the registry) "
                          f"have no reference profile")
    found, problems = {}, []
    for version in versions:
        try:
            found[version] = load_profile(client, model, version)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    return found


def replace_range(rows: DataFrame, path: str, schema: StructType, predicate: str) -> None:
    """Overwrite the rows of the table at ``path`` matching ``predicate`` with ``rows`` (all of
    which must match it) in one commit; the table is created first if needed."""
    ensure_delta_table(rows.sparkSession, path, schema)
    (rows.select(*[F.col(f.name).cast(f.dataType) for f in schema.fields])
     .write.format("delta").mode("overwrite").option("replaceWhere", predicate).save(path))


def refresh_monitoring(spark: SparkSession, settings: Settings, client: mlflow.MlflowClient, model: str,
                       hours: MonitoringRange, now: datetime | None = None) -> MonitoringOutcome:
    """Recompute and replace ``model``'s drift over ``hours`` and its quality over the days they
    touch (module docstring). Every version's profile is loaded before anything is written."""
    computed_at = F.lit(now or datetime.now(timezone.utc))
    predictions = read_predictions(spark, settings, model, hours.start, hours.end)
    found = [r[0] for r in predictions.select("model_version").distinct().collect()]
    profiles: Mapping[str, ReferenceProfile] = profiles_of(client, model, found)
    versions = sorted(profiles, key=lambda v: (len(v), v))  # 2 before 10

    drift = None
    for version in versions:
        part = hourly_psi(predictions.where(F.col("model_version") == version), profiles[version])
        drift = part if drift is None else drift.unionByName(part)
    if drift is None:
        drift = spark.createDataFrame([], FEATURE_DRIFT_SCHEMA).drop("computed_at")
    replace_range(drift.withColumn("computed_at", computed_at), settings.storage.feature_drift_path,
                  FEATURE_DRIFT_SCHEMA,
                  f"model_name = {_sql_string(model)} AND hour >= {_sql_timestamp(hours.start)} "
                  f"AND hour < {_sql_timestamp(hours.end)}")

    days = read_predictions(spark, settings, model, day_start(hours.first_day), day_start(hours.end_day))
    quality = daily_quality(days, read_labels(spark, settings), settings.scoring.threshold)
    replace_range(quality.withColumn("computed_at", computed_at), settings.storage.model_quality_path,
                  MODEL_QUALITY_SCHEMA,
                  f"model_name = {_sql_string(model)} AND day >= DATE'{hours.first_day}' AND day < DATE'{hours.end_day}'")

    # What the range holds now (a few hundred rows a day): counted and sorted here.
    written = (spark.read.format("delta").load(settings.storage.feature_drift_path)
               .where(F.col("model_name") == model)
               .where((F.col("hour") >= F.lit(hours.start)) & (F.col("hour") < F.lit(hours.end)))
               .select("model_version", "hour", "feature", "psi").collect())
    large = sorted((r for r in written if r.psi > LARGE_PSI), key=lambda r: -r.psi)
    quality_rows = (spark.read.format("delta").load(settings.storage.model_quality_path)
                    .where(F.col("model_name") == model)
                    .where((F.col("day") >= F.lit(hours.first_day)) & (F.col("day") < F.lit(hours.end_day))).count())
    return MonitoringOutcome(model, hours, tuple(versions), len(written), quality_rows,
                             tuple((r.model_version, utc_assuming_local(r.hour), r.feature, r.psi) for r in large))
