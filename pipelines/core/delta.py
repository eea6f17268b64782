"""Delta helpers every stage shares: idempotent appends from ``foreachBatch``, table creation and
additive schema evolution, pinned reads, versions.

Exactly once: every Delta write made from ``foreachBatch`` carries ``txnAppId`` (derived from
the streaming query's id, which lives in its checkpoint: a new checkpoint is a new id, so a
fresh start is never mistaken for a replay) and ``txnVersion`` = the batch id. When a batch is
replayed after a crash, Delta skips every write that already committed for that id and
version, and performs the ones that did not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

from pipelines.core.errors import SourceError

log = logging.getLogger(__name__)

QUERY_ID_PROPERTY = "sql.streaming.queryId"


def write_delta_idempotent(
    df: DataFrame, path: str, app_id: str, version: int, partition_by: Sequence[str] = ()
) -> None:
    """Append ``df`` to the Delta table at ``path`` unless ``(app_id, version)`` already committed."""
    writer = (
        df.write.format("delta")
        .mode("append")
        .option("txnAppId", app_id)
        .option("txnVersion", str(version))
    )
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.save(path)


def current_version(spark: SparkSession, path: str) -> int:
    """The latest committed version of the Delta table at ``path``."""
    return DeltaTable.forPath(spark, path).history(1).collect()[0]["version"]


def ensure_delta_table(spark: SparkSession, path: str, schema: StructType, partition_by: Sequence[str] = ()) -> None:
    """Create the Delta table at ``path`` if it does not exist; an existing one gains the
    columns of ``schema`` it lacks (:func:`add_missing_columns`).

    Tables are created before the queries start: two queries creating the same table (the
    shared dead-letter and metrics tables) in their first batches would conflict.
    """
    if DeltaTable.isDeltaTable(spark, path):
        add_missing_columns(spark, path, schema)
        return
    builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(schema)
    if partition_by:
        builder = builder.partitionedBy(*partition_by)
    builder.execute()


def add_missing_columns(spark: SparkSession, path: str, schema: StructType) -> list[str]:
    """Add to the Delta table at ``path`` the columns of ``schema`` it lacks (nullable: rows
    written before read null), as when a contract gains an optional field; returns their names.
    Columns the table has and ``schema`` does not are kept (later rows hold null there). A
    column whose type differs fails with the table, the column and both types named."""
    # Types compared without nullability (simpleString leaves it out).
    existing = {f.name: f.dataType.simpleString() for f in spark.read.format("delta").load(path).schema.fields}
    clashes = [f"{f.name}: table has {existing[f.name]}, now {f.dataType.simpleString()}"
               for f in schema.fields if f.name in existing and existing[f.name] != f.dataType.simpleString()]
    if clashes:
        raise ValueError(f"Delta table {path}: column types changed ({'; '.join(clashes)}); "
                         "a type change needs a new table or a rewrite, not an append")
    missing = [f for f in schema.fields if f.name not in existing]
    if missing:
        columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
        spark.sql(f"ALTER TABLE delta.`{path}` ADD COLUMNS ({columns})")
        log.info("added column(s) %s to %s", ", ".join(f.name for f in missing), path)
    return [f.name for f in missing]


def streaming_query_id(spark: SparkSession) -> str:
    """The id of the streaming query running this ``foreachBatch`` call (stable across restarts
    from the same checkpoint)."""
    query_id = spark.sparkContext.getLocalProperty(QUERY_ID_PROPERTY)
    if not query_id:
        raise RuntimeError("not inside a streaming query's foreachBatch: no query id to derive txnAppId from")
    return query_id


def path_exists(spark: SparkSession, path: str) -> bool:
    """Whether ``path`` exists, on any file system Spark reads (local, s3a, abfss, dbfs)."""
    jvm = spark.sparkContext._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    return hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).exists(hadoop_path)


def read_delta_version(spark: SparkSession, path: str, version: int | None, what: str) -> tuple[DataFrame, int]:
    """The Delta table at ``path`` as of ``version`` (None: the current one, pinned, so every
    read of one run sees the same rows), and that version. A SourceError naming ``what`` when
    there is no table, the version's log is gone, or (for an older version) one of its data
    files was vacuumed: found now, not halfway through a job."""
    if not DeltaTable.isDeltaTable(spark, path):
        raise SourceError(f"{what}: no Delta table at {path}")
    latest = current_version(spark, path)
    pinned = latest if version is None else version
    try:
        frame = spark.read.format("delta").option("versionAsOf", pinned).load(path)
        files = frame.inputFiles()  # reads the version's log now, so a missing version fails here
    except Exception as exc:  # noqa: BLE001 - Delta's time-travel errors, named as the source
        raise SourceError(f"{what}: cannot read version {pinned} of {path}: {str(exc).strip().splitlines()[0]}") from exc
    if pinned != latest:  # only time travel can meet files VACUUM removed
        missing = [f for f in files if not path_exists(spark, f)]
        if missing:
            raise SourceError(f"{what}: version {pinned} of {path} lost {len(missing)} data files to VACUUM "
                              f"(e.g. {missing[0]}); it cannot be read any more")
    return frame, pinned
