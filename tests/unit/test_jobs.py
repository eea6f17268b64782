"""Job entry points fail fast on bad arguments, naming what is wrong (exit code 2)."""

from __future__ import annotations

import pytest

from jobs import features, generate, ingest, live, reconcile
from pipelines.features.live_stream import realtime_session_settings


def test_ingest_rejects_an_undeclared_topic(capsys):
    assert ingest.main(["--env", "local", "--topics", "transactions,payments"]) == 2
    assert "--topics: payments not declared under kafka.topics" in capsys.readouterr().err


def test_ingest_rejects_a_bad_override(capsys):
    assert ingest.main(["--env", "local", "--set", "ingest.trigger_interval=soon"]) == 2
    assert "ingest.trigger_interval: 'soon' is not a duration" in capsys.readouterr().err


def test_unknown_environment_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ingest.main(["--env", "staging"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'staging'" in capsys.readouterr().err


def test_generator_rejects_a_rate_outside_zero_to_one(capsys):
    assert generate.main(["--env", "local", "--late-rate", "2"]) == 2
    assert "late_rate: 2.0 is not a fraction in [0, 1]" in capsys.readouterr().err


def test_generator_rejects_an_end_without_offset(capsys):
    assert generate.main(["--env", "local", "--end", "2026-11-23T10:00:00"]) == 2
    assert "--end: give a UTC offset" in capsys.readouterr().err


def test_reconcile_rejects_a_missing_summary_file(capsys, tmp_path):
    assert reconcile.main(["--env", "local", "--expect", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_generator_duration_needs_a_rate(capsys):
    assert generate.main(["--env", "local", "--duration", "10m"]) == 2
    assert "--duration needs --rate" in capsys.readouterr().err


def test_features_rejects_an_undeclared_view(capsys):
    assert features.main(["--env", "local", "--views", "account_velocity,nope"]) == 2
    assert "--views: nope not declared in conf/features" in capsys.readouterr().err


def test_features_before_the_first_ingest_fails_naming_the_missing_bronze_table(capsys, spark, tmp_path):
    lake = tmp_path / "lake"
    assert features.main(["--env", "local", "--views", "account_velocity", "--set", f"storage.root={lake}"]) == 3
    err = capsys.readouterr().err
    assert f"no bronze table at {lake}/bronze/transactions yet" in err and "start it first" in err


@pytest.mark.parametrize(
    "master, expected",
    [("local[2]", {"spark.master": "local[9]"}), ("local[*]", {"spark.master": "local[9]"}),
     ("local", {"spark.master": "local[9]"}), ("local[8]", {"spark.master": "local[9]"}), ("local[9]", {}),
     ("local[16]", {}), ("spark://master:7077", {}), (None, {})],
)
def test_real_time_mode_gets_a_local_task_slot_per_partition_and_one_to_spare(master, expected):
    # Real-time mode runs every task of its stage at once, one per Kafka partition, for a whole
    # batch; the metrics table's appends need a slot of their own meanwhile.
    assert realtime_session_settings(master, 8) == expected


def test_live_rejects_an_undeclared_view_before_touching_kafka(capsys):
    assert live.main(["--env", "local", "--views", "account_velocity,card_velocity"]) == 2
    assert "--views: card_velocity not declared in conf/features" in capsys.readouterr().err
