"""The predictions table: ``predictions/<model>``, the committed predictions of one model copied
from the predictions topic exactly once, each deployment of the model (``deployment``: the
champion's URI, a challenger's) by a query of its own.

A streaming query reads the predictions topic with ``kafka.isolation.level=read_committed``
(aborted transactions never reach it), keeps its deployment's predictions, parses them by the
predictions contract and appends them in ``foreachBatch`` with ``txnAppId``/``txnVersion``
(:func:`pipelines.core.delta.write_delta_idempotent`): a replayed batch writes nothing twice.
The topic holds one prediction per deployment and event id (:mod:`pipelines.scoring.stream`),
so the table does too. A record that does not parse by the contract stops the query, naming its offset: it is
never dropped.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery
from pyspark.sql.types import BooleanType, DoubleType, LongType, StringType, StructField, StructType, TimestampType

from pipelines.contracts.spark_schema import contract_schema
from pipelines.core.checkpoints import checkpoint_location
from pipelines.core.contract_spec import Contract
from pipelines.core.delta import read_delta_version, streaming_query_id, write_delta_idempotent
from pipelines.core.errors import ConfigError
from pipelines.core.runner import with_trigger
from pipelines.core.settings import Settings
from pipelines.scoring.model import deployment_key

_PARSED = "_prediction"

#: ``ops/scoring_metrics``: one row per report interval of a scoring job (seconds for latencies).
SCORING_METRICS_SCHEMA = StructType([
    StructField("interval_start", TimestampType(), False),
    StructField("interval_end", TimestampType(), False),
    StructField("model_name", StringType(), False),
    StructField("model_version", StringType(), True),
    StructField("deployment", StringType(), False),
    StructField("scored", LongType(), False),
    StructField("duplicates", LongType(), False),
    # Scored without their own row (the scorer further behind fp-live than live.served_retention).
    StructField("without_rows", LongType(), False),
    StructField("batches", LongType(), False),
    StructField("events_per_second", DoubleType(), False),
    StructField("p50_s", DoubleType(), True),
    StructField("p95_s", DoubleType(), True),
    StructField("p99_s", DoubleType(), True),
    # The longest a batch waited for fp-live to apply its events.
    StructField("max_feature_wait_s", DoubleType(), False),
    StructField("slo_p99_s", DoubleType(), False),
    StructField("slo_breached", BooleanType(), False),
])


def table_name(model: str) -> str:
    """A model's label as a folder name (a run URI's slashes and colons become underscores)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", model)


def predictions_path(settings: Settings, model: str) -> str:
    return f"{settings.storage.root}/predictions/{table_name(model)}"


def read_predictions(spark: SparkSession, settings: Settings, model: str, start: datetime,
                     end: datetime) -> tuple[DataFrame, int]:
    """``model``'s predictions (every deployment's) with an event time in ``[start, end)``, from
    the table's current version (pinned: every read of one run sees the same rows), and that
    version. A ConfigError naming the model when it has no predictions table (``fp-score`` has
    not scored with it here; the table is named for the registered model)."""
    path = predictions_path(settings, model)
    if not DeltaTable.isDeltaTable(spark, path):
        raise ConfigError(f"--model {model}: no predictions table at {path} (has fp-score scored with this model "
                          f"here? the table is named for the registered model)")
    table, version = read_delta_version(spark, path, None, f"predictions of {model}")
    first = start.astimezone(timezone.utc).date() - timedelta(days=1)  # event_date only prunes: a day either side
    last = end.astimezone(timezone.utc).date() + timedelta(days=1)
    rows = (table.where((F.col("event_date") >= F.lit(first)) & (F.col("event_date") <= F.lit(last)))
            .where((F.col("event_time") >= F.lit(start)) & (F.col("event_time") < F.lit(end))))
    return rows, version


def prediction_rows(records: DataFrame, contract: Contract, deployment: str) -> DataFrame:
    """Predictions-topic records -> table rows of ``deployment`` (its model URI): every field of the contract (typed),
    the record's ``kafka_partition``/``kafka_offset`` and ``event_date`` (UTC day of the event).
    A record that does not parse (or lacks a required field) gets a null ``event_id``, which
    :func:`check_parsed` refuses."""
    parsed = records.select(
        F.from_json(F.col("value").cast("string"), contract_schema(contract)).alias(_PARSED),
        F.col("partition").alias("kafka_partition"), F.col("offset").alias("kafka_offset"),
    )
    required = [f.name for f in contract.fields if f.required]
    complete = F.lit(True)
    for name in required:
        complete = complete & F.col(f"{_PARSED}.{name}").isNotNull()
    rows = parsed.select(
        *[F.when(complete, F.col(f"{_PARSED}.{f.name}")).alias(f.name) for f in contract.fields],
        "kafka_partition", "kafka_offset",
    )
    return (rows.where(F.col("deployment").isNull() | (F.col("deployment") == deployment))
            .withColumn("event_date", F.to_date(F.col("event_time"))))


def check_parsed(batch: DataFrame) -> None:
    """Raises naming the first offset whose record did not parse by the contract."""
    broken = batch.where(F.col("event_id").isNull()).select("kafka_partition", "kafka_offset").limit(1).collect()
    if broken:
        raise ValueError(f"predictions topic: the record at partition {broken[0][0]} offset {broken[0][1]} "
                         f"does not parse by the predictions contract")


def start_predictions_table(spark: SparkSession, settings: Settings, model: str, deployment: str,
                            available_now: bool, interval: timedelta = timedelta(seconds=10)) -> StreamingQuery:
    """The query copying the committed predictions of ``deployment`` (a model URI of ``model``)
    to :func:`predictions_path` (checkpoint ``_checkpoints/predictions/<model>/<deployment key>``)."""
    scoring = settings.scoring
    contract = settings.contracts[scoring.predictions_contract]
    reader = (spark.readStream.format("kafka").option("subscribe", scoring.predictions_topic)
              .option("startingOffsets", "earliest").option("failOnDataLoss", "true")
              .option("kafka.isolation.level", "read_committed"))
    for key, value in settings.kafka.spark_options().items():
        reader = reader.option(key, value)
    path = predictions_path(settings, model)

    def write(batch: DataFrame, batch_id: int) -> None:
        # Parsed once for the check and the write (at 5,000 predictions/s a batch is 50,000
        # JSON records, and parsing them is most of this query's work).
        parsed = batch.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            check_parsed(parsed)
            write_delta_idempotent(parsed, path, streaming_query_id(batch.sparkSession), batch_id,
                                   partition_by=["event_date"])
        finally:
            parsed.unpersist()

    key = deployment_key(deployment)
    writer = (prediction_rows(reader.load(), contract, deployment).writeStream
              .queryName(f"predictions_{table_name(model)}_{table_name(key)}")
              .foreachBatch(write)
              .option("checkpointLocation",
                      checkpoint_location(spark, settings.storage.checkpoint_path(
                          "predictions", f"{table_name(model)}/{table_name(key)}"))))
    return with_trigger(writer, available_now, interval).start()
