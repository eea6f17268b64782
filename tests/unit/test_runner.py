"""The query runner: its restart hook, on stand-in query objects (the runner only asks a query
whether it is active, for its failure, to wait and to stop), and its stop between batches, on a
real query."""

from __future__ import annotations

import time

import pytest

from pipelines.core.runner import BatchGate, run_queries, stop_between_batches


class StandInQuery:
    """Ends after ``polls`` waits, with ``failure`` (None: finished cleanly)."""

    def __init__(self, name: str, polls: int = 0, failure: Exception | None = None):
        self.name, self.polls, self.failure = name, polls, failure
        self.stopped = False

    @property
    def isActive(self) -> bool:
        return self.polls > 0 and not self.stopped

    @property
    def status(self) -> dict:
        return {"isTriggerActive": False}

    def awaitTermination(self, timeout: float | None = None) -> bool:
        if self.polls > 0:
            self.polls -= 1
        return not self.isActive

    def exception(self):
        return None if self.isActive else self.failure

    def stop(self) -> None:
        self.stopped = True


def test_a_query_the_hook_restarts_is_replaced_in_place_and_the_run_succeeds():
    failed = StandInQuery("ingest_a", failure=RuntimeError("NEW_WRITER_SCHEMA: id 4"))
    healthy = StandInQuery("ingest_b", polls=3)
    replacement = StandInQuery("ingest_a", polls=2)
    asked = []

    def restart(query):
        asked.append(query.name)
        return replacement if query is failed else None

    queries = [failed, healthy]
    run_queries(queries, restart=restart)
    assert queries == [replacement, healthy]
    assert asked == ["ingest_a"]


def test_a_failure_the_hook_declines_is_raised():
    failure = RuntimeError("broker gone")
    queries = [StandInQuery("ingest_a", failure=failure)]
    with pytest.raises(RuntimeError, match="broker gone"):
        run_queries(queries, restart=lambda query: None)


def test_without_a_hook_a_failure_is_raised_as_before():
    with pytest.raises(RuntimeError, match="NEW_WRITER_SCHEMA"):
        run_queries([StandInQuery("ingest_a", failure=RuntimeError("NEW_WRITER_SCHEMA"))])


def test_a_stop_holds_the_next_batch_before_its_handler_and_ends_the_query_cleanly(spark, tmp_path):
    """A real query on a file stream: after the gate closes, the batch that starts holds before
    the handler runs, the stop ends the query without a failure, and that batch is planned in
    the checkpoint but not committed (it runs again on the next start)."""
    source, checkpoint = tmp_path / "in", tmp_path / "checkpoint"
    source.mkdir()
    handled: list[int] = []
    gate = BatchGate()
    query = (spark.readStream.schema("n long").option("recursiveFileLookup", "true").parquet(str(source)).writeStream
             .foreachBatch(gate.wrap(lambda batch, batch_id: handled.append(batch_id)))
             .option("checkpointLocation", str(checkpoint)).trigger(processingTime="100 milliseconds").start())
    try:
        spark.range(3).withColumnRenamed("id", "n").write.parquet(str(source / "0"))
        query.processAllAvailable()
        assert handled == [0]
        gate.close()
        spark.range(3).withColumnRenamed("id", "n").write.parquet(str(source / "1"))
        deadline = time.monotonic() + 60
        while not gate.holds(query):
            assert time.monotonic() < deadline, "batch 1 never reached the gate"
            time.sleep(0.05)
        stop_between_batches([query], gate)
    finally:
        query.stop()
    assert not query.isActive and query.exception() is None
    assert handled == [0]
    assert sorted(p.name for p in (checkpoint / "offsets").iterdir() if p.name.isdigit()) == ["0", "1"]
    assert sorted(p.name for p in (checkpoint / "commits").iterdir() if p.name.isdigit()) == ["0"]
