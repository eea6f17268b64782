"""One exception family: every error the platform raises on purpose carries the exit code its
job reports, and a batch job turns it into that code and a one-line reason."""

from __future__ import annotations

import pytest

from pipelines.contracts.registry import RegistryUnavailable
from pipelines.core.cli import run_job
from pipelines.core.errors import (
    BadSourceArguments,
    ConfigError,
    MissingJarsError,
    OffsetsOutOfRetention,
    SourceError,
)
from pipelines.local.platform import PlatformError
from pipelines.online.store import OnlineStoreError
from pipelines.training.build import NotReproducible
from pipelines.training.join import LeakageError


@pytest.mark.parametrize("error, code", [
    (ConfigError("ingest.trigger_interval: 'soon' is not a duration"), 2),
    (BadSourceArguments("--to 2026-11-20 must be after --from 2026-11-21"), 2),
    (SourceError("bronze table of transactions not found"), 3),
    (RegistryUnavailable("schema registry http://127.0.0.1:9 unreachable"), 3),
    (OffsetsOutOfRetention("transactions partition 0: offsets 0..9 are no longer in the topic"), 4),
    (LeakageError("leakage guard: 3 rows joined a feature row from after their timestamp"), 1),
    (NotReproducible("rebuild differs"), 1),
    (OnlineStoreError("Redis write failed 5 times"), 1),
    (PlatformError("port 9092 is taken"), 1),
    (MissingJarsError("no jars in .local/jars/spark"), 1),
])
def test_a_batch_job_exits_with_the_errors_code_and_its_reason_as_the_last_line(error, code, capsys):
    def body() -> int:
        raise error

    assert run_job("some_job", body) == code
    assert capsys.readouterr().err.splitlines()[-1] == f"some_job: error: {error}"


def test_an_unexpected_error_exits_1_with_its_first_line(capsys):
    def body() -> int:
        raise RuntimeError("first line\nsecond line")

    assert run_job("some_job", body) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "some_job: error: first line"


def test_a_config_error_is_still_a_value_error_for_callers_that_catch_those():
    assert issubclass(ConfigError, ValueError)
