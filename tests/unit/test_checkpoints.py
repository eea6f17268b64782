"""A checkpoint a crash left mid-write of its first batch's log: the query starts from it.

The leftover files are the ones a SIGKILL of ``fp-score`` left in the predictions table's
checkpoint (``tests/integration/test_score.py``, 2026-12-04): the empty temporary copy of
``offsets/0`` and its empty checksum file."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql.types import LongType, StructField, StructType

from pipelines.core.checkpoints import checkpoint_location

SCHEMA = StructType([StructField("n", LongType(), False)])


def left_by_a_crash_in_the_first_write(checkpoint: Path) -> list[Path]:
    offsets = checkpoint / "offsets"
    offsets.mkdir(parents=True)
    (checkpoint / "commits").mkdir()
    name = f"0.{uuid.uuid4()}.tmp"
    files = [offsets / f".{name}", offsets / f"..{name}.crc"]
    for file in files:
        file.touch()
    return files


def copy_stream(spark: SparkSession, source: Path, target: Path, checkpoint: str) -> None:
    """Copies the Parquet files under ``source`` to ``target`` once (availableNow)."""
    query = (spark.readStream.schema(SCHEMA).parquet(str(source)).writeStream.format("parquet")
             .option("path", str(target)).option("checkpointLocation", checkpoint)
             .trigger(availableNow=True).start())
    query.awaitTermination()


@pytest.fixture
def source(spark: SparkSession, tmp_path: Path) -> Path:
    path = tmp_path / "source"
    spark.createDataFrame([Row(n=1), Row(n=2), Row(n=3)], SCHEMA).write.parquet(str(path))
    return path


def rows(frame: DataFrame) -> list[int]:
    return sorted(r.n for r in frame.collect())


def test_spark_alone_refuses_to_start_from_the_leftovers_of_a_first_write(spark, source, tmp_path):
    """Why the helper exists: without it the query can never start again."""
    checkpoint = tmp_path / "checkpoint"
    left_by_a_crash_in_the_first_write(checkpoint)
    with pytest.raises(StreamingQueryException, match="STATE_STORE_CHECKPOINT_LOCATION_NOT_EMPTY"):
        copy_stream(spark, source, tmp_path / "target", str(checkpoint))


def test_a_query_starts_as_new_from_the_leftovers_of_a_first_write(spark, source, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    leftovers = left_by_a_crash_in_the_first_write(checkpoint)
    copy_stream(spark, source, tmp_path / "target", checkpoint_location(spark, str(checkpoint)))
    assert rows(spark.read.schema(SCHEMA).parquet(str(tmp_path / "target"))) == [1, 2, 3]
    assert not any(file.exists() for file in leftovers)


def test_a_checkpoint_with_a_committed_batch_is_left_as_it_is(spark, source, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    copy_stream(spark, source, tmp_path / "target", str(checkpoint))
    unfinished = checkpoint / "offsets" / f".1.{uuid.uuid4()}.tmp"  # a later batch's write, cut short
    unfinished.touch()
    before = sorted(p.name for p in (checkpoint / "offsets").iterdir())
    assert checkpoint_location(spark, str(checkpoint)) == str(checkpoint)
    assert sorted(p.name for p in (checkpoint / "offsets").iterdir()) == before
    copy_stream(spark, source, tmp_path / "target", str(checkpoint))  # resumes: nothing new to copy
    assert rows(spark.read.schema(SCHEMA).parquet(str(tmp_path / "target"))) == [1, 2, 3]


def test_a_file_that_is_no_unfinished_log_write_is_not_removed(spark, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    left_by_a_crash_in_the_first_write(checkpoint)
    stranger = checkpoint / "commits" / ".notes"
    stranger.touch()
    checkpoint_location(spark, str(checkpoint))
    assert stranger.exists()
    assert not any(p.name.endswith(".tmp") for p in (checkpoint / "offsets").iterdir())
