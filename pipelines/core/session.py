"""The one session factory. Pipelines never build sessions; jobs and tests call this."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from pyspark import SparkConf, SparkContext
from pyspark.java_gateway import launch_gateway
from pyspark.sql import SparkSession

from pipelines.core.errors import MissingJarsError
from pipelines.core.settings import SparkSettings

log = logging.getLogger(__name__)

ROCKSDB_PROVIDER = "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"


def jar_paths(folder: str | Path) -> list[str]:
    """The jars in a fetched folder; a clear error if it was never fetched."""
    jars = sorted(str(p) for p in Path(folder).glob("*.jar"))
    if not jars:
        raise MissingJarsError(f"no jars in {folder}: run `make jars` (python -m pipelines.local.jars fetch)")
    return jars


def local_session_settings(spark: SparkSettings) -> dict[str, str]:
    """Spark settings of a local session built from ``spark`` (jars resolved, Delta on)."""
    settings = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(spark.shuffle_partitions),
        "spark.sql.streaming.stateStore.providerClass": ROCKSDB_PROVIDER,
        "spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled": "true",
        # Delta reads its log with 50 tasks by default: every small batch would pay for them.
        "spark.databricks.delta.snapshotPartitions": "2",
        "spark.ui.enabled": str(spark.ui_enabled).lower(),
        "spark.ui.showConsoleProgress": "false",
        # Contracts make wide plans; the default (25) fills logs with truncation warnings.
        "spark.sql.debug.maxToStringFields": "200",
        # Whole-stage code generation of the JSON contract checks makes methods over HotSpot's
        # 8,000-byte JIT limit; left interpreted they validate at 45k records/s, compiled at 71k.
        # The executors of a standalone master (cluster mode) need it too; on Databricks the
        # cluster's spark_conf sets it (databricks.yml).
        "spark.driver.extraJavaOptions": "-XX:-DontCompileHugeMethods",
        "spark.executor.extraJavaOptions": "-XX:-DontCompileHugeMethods",
        # Python workers must run the driver's interpreter, or Arrow UDFs miss pyarrow/pandas.
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
    }
    if spark.jars_dir:
        settings["spark.jars"] = ",".join(jar_paths(spark.jars_dir))
    if spark.driver_memory:
        settings["spark.driver.memory"] = spark.driver_memory
    settings.update(spark.conf)
    return settings


def launch_detached_gateway(conf: SparkConf):
    """Start the Spark JVM (and so its Python workers) in a session of its own.

    A terminal's Ctrl-C and ``kill -- -PGID`` signal the whole foreground process group. In
    it, the JVM would run its shutdown hooks on SIGTERM (the SparkContext stops under the
    running query: a NullPointerException, exit 1) and the Python workers would raise
    KeyboardInterrupt on SIGINT mid-task. Detached, only the driver gets the signal, and the
    job's runner stops the queries between batches. The JVM still ends with the driver: it
    exits when its stdin, a pipe from the driver, closes (also when the driver is SIGKILLed).
    """
    return launch_gateway(conf, popen_kwargs={"start_new_session": True})


def build_session(spark: SparkSettings, overrides: Mapping[str, str] | None = None) -> SparkSession:
    """The SparkSession for a job.

    With ``spark.master`` set (local), builds a session with Delta, the fetched jars, UTC,
    the RocksDB state store and few shuffle partitions. Without it (on a cluster) returns the
    active session, applying only ``spark.conf`` and the shuffle partitions at runtime.
    """
    if spark.master is None:
        session = SparkSession.builder.getOrCreate()
        session.conf.set("spark.sql.shuffle.partitions", str(spark.shuffle_partitions))
        session.conf.set("spark.sql.session.timeZone", "UTC")
        for key, value in {**spark.conf, **(overrides or {})}.items():
            session.conf.set(key, value)
        return session
    # The Python side picks the worker interpreter from the environment, not from the conf.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    conf = SparkConf().setMaster(spark.master).setAppName(spark.app_name)
    conf.setAll(list({**local_session_settings(spark), **(overrides or {})}.items()))
    if SparkContext._gateway is None:  # the process's first session starts the JVM
        SparkContext(conf=conf, gateway=launch_detached_gateway(conf))
    session = SparkSession.builder.config(conf=conf).getOrCreate()
    session.sparkContext.setLogLevel(spark.log_level)
    log.info("spark %s session on %s", session.version, spark.master)
    return session
