"""The ops tables' writer: metrics rows gathered into one Delta append per interval, none lost at stop."""

from __future__ import annotations

import queue
import time
from datetime import datetime, timedelta

from delta.tables import DeltaTable

from pipelines.features.live_stream import MetricsTableWriter
from pipelines.scoring.sinks import SCORING_METRICS_SCHEMA

START = datetime(2026, 12, 4, 12, 0, 0)


def interval(i: int) -> tuple:
    """A scoring_metrics row for the i-th 10-s interval, with i events scored."""
    begin = START + timedelta(seconds=10 * i)
    return (begin, begin + timedelta(seconds=10), "fraud", "3", "models:/fraud@champion", i, 0, 0, 1, i / 10,
            0.1, 0.2, 0.3, 0.0, 2.0, False)


def appends(spark, path: str) -> list[int]:
    """Rows added by each append of the table, oldest first."""
    history = DeltaTable.forPath(spark, path).history().where("operation = 'WRITE'").orderBy("version").collect()
    return [int(h["operationMetrics"]["numOutputRows"]) for h in history]


def test_rows_queued_within_an_interval_go_in_one_append_and_none_is_lost_at_stop(spark, tmp_path):
    path = str(tmp_path / "scoring_metrics")
    rows: queue.Queue = queue.Queue()
    writer = MetricsTableWriter(spark, path, rows, SCORING_METRICS_SCHEMA, every=3600)
    writer.start()
    rows.put(interval(1))
    deadline = time.monotonic() + 120
    while not (DeltaTable.isDeltaTable(spark, path) and appends(spark, path)):  # the first row at once
        assert time.monotonic() < deadline, "the first row was not appended at once"
        time.sleep(0.5)
    for i in range(2, 6):
        rows.put(interval(i))
    time.sleep(2)
    assert appends(spark, path) == [1], "the next rows waited for the interval"
    writer.stopping.set()
    writer.join(timeout=120)
    assert not writer.is_alive()
    assert appends(spark, path) == [1, 4]
    scored = sorted(r["scored"] for r in spark.read.format("delta").load(path).collect())
    assert scored == [1, 2, 3, 4, 5]
