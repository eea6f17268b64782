"""Streaming checkpoints: what a query's checkpoint needs before the query starts from it."""

from __future__ import annotations

import logging
import re

from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

#: The directories Spark requires empty when a query starts with no offsets committed.
_LOG_DIRS = ("offsets", "commits")
#: A log file written halfway: Spark writes ``<dir>/<batch>`` as ``.<batch>.<uuid>.tmp`` (and
#: Hadoop's checksum ``..<batch>.<uuid>.tmp.crc``) and renames it into place.
_UNFINISHED = re.compile(r"^\.\.?\d+\.[0-9a-f-]+\.tmp(\.crc)?$")


def checkpoint_location(spark: SparkSession, path: str) -> str:
    """``path``, ready for a streaming query to start from it: a first batch's log write that a
    crash cut short is cleared.

    A query that starts with no offsets file committed is new, and Spark 4.2 requires its
    ``offsets`` and ``commits`` directories to be empty. A crash (SIGKILL, a lost driver) while
    Spark writes the very first offsets file leaves that file's temporary copy behind, and every
    later start then fails with ``STATE_STORE_CHECKPOINT_LOCATION_NOT_EMPTY`` until someone
    deletes it by hand. Nothing of the query's progress is in such a file (the batch it was to
    record never started), so when ``offsets`` holds no committed file, the temporary files of
    ``offsets`` and ``commits`` are removed and the query starts as new, as it would have had
    the crash come a moment earlier. Any other file is left where it is (Spark names it in its
    error), and a checkpoint with an offsets file committed is not touched. Works on any file
    system Spark checkpoints to (local, s3a, abfss, dbfs)."""
    jvm = spark.sparkContext._jvm
    root = jvm.org.apache.hadoop.fs.Path(path)
    fs = root.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    offsets = jvm.org.apache.hadoop.fs.Path(root, "offsets")
    if not fs.exists(offsets):
        return path
    if any(not status.getPath().getName().startswith(".") for status in fs.listStatus(offsets)):
        return path  # a committed offsets file: the query resumes from it
    for name in _LOG_DIRS:
        directory = jvm.org.apache.hadoop.fs.Path(root, name)
        if not fs.exists(directory):
            continue
        for status in fs.listStatus(directory):
            if _UNFINISHED.match(status.getPath().getName()):
                fs.delete(status.getPath(), False)
                log.warning("checkpoint %s: removed %s/%s, left by a crash while the query wrote its first "
                            "batch's log (the query starts as new)", path, name, status.getPath().getName())
    return path
