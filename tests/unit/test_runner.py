"""The query runner's restart hook, on stand-in query objects (the runner only asks a query
whether it is active, for its failure, to wait and to stop)."""

from __future__ import annotations

import pytest

from pipelines.core.runner import run_queries


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
