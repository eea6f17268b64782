"""Trailing views on a stream equal the batch transform, row for row (seeded random streams)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from pipelines.core.config import build
from pipelines.core.contract_spec import load_contracts
from pipelines.core.settings import PROJECT_ROOT
from pipelines.core.view_spec import FeatureView, check_view
from pipelines.features.trailing_state import trailing_features_stream
from pipelines.features.transforms import trailing_features
from tests.support import run_stream_batches, run_stream_in_steps

CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")
SCHEMA = "account_id string, event_time timestamp, amount_usd double, merchant_id string"
VIEW = build(FeatureView, {
    "name": "velocity", "source": {"contract": "transactions"}, "entity": "account_id", "event_time": "event_time",
    "kind": "trailing", "delay": "5m",
    "aggregations": [
        {"column": "*", "functions": ["count"], "windows": ["10m", "1h"]},
        {"column": "amount_usd", "functions": ["sum", "avg", "min", "max", "last"], "windows": ["30m"]},
        {"column": "merchant_id", "functions": ["approx_count_distinct"], "windows": ["1h"]},
        # A timestamp feature: state must hand stored timestamps back as datetimes.
        {"column": "event_time", "functions": ["min", "last", "approx_count_distinct"], "windows": ["2h"]},
    ],
}, "test")
check_view(VIEW, CONTRACTS, "test")


def random_steps(seed: int, steps: int = 3, per_step: int = 40):
    """In-order events: each step's times are after every earlier step's; ties only within a step."""
    rng = random.Random(seed)
    clock = datetime(2026, 11, 23, 8, 0)
    result = []
    for _ in range(steps):
        rows = []
        for _ in range(per_step):
            clock += timedelta(seconds=rng.choice([0, 0, 30, 90, 400, 1200]))
            amount = None if rng.random() < 0.1 else round(rng.uniform(1, 100), 2)
            rows.append((rng.choice(["a", "b", "c"]), clock, amount, rng.choice(["m1", "m2", "m3", None])))
        clock += timedelta(seconds=1)
        result.append(rows)
    return result


def rounded(rows):
    return sorted(tuple(round(v, 9) if isinstance(v, float) else v for v in r) for r in rows)


@pytest.mark.parametrize("seed", [5, 11, 23])
def test_streaming_trailing_view_equals_the_batch_view(spark, tmp_path, seed):
    steps = random_steps(seed)
    streamed = run_stream_in_steps(spark, tmp_path / "events", SCHEMA, lambda s: trailing_features_stream(s, VIEW), steps)
    everything = spark.createDataFrame([r for rows in steps for r in rows], SCHEMA)
    batch = trailing_features(everything, VIEW)
    columns = batch.columns
    assert rounded(tuple(r[c] for c in columns) for r in streamed) == rounded(tuple(r[c] for c in columns) for r in batch.collect())
    assert len(streamed) == sum(len(rows) for rows in steps)


def test_events_behind_the_watermark_are_left_out(spark, tmp_path):
    """Allowed lateness 10m: after 11:00 the watermark is 10:50, so a 10:30 event that arrives
    next is not computed (its interval may reach events already dropped from state)."""
    view = build(FeatureView, {
        "name": "count_only", "source": {"contract": "transactions"}, "entity": "account_id",
        "event_time": "event_time", "kind": "trailing", "allowed_lateness": "10m",
        "aggregations": [{"column": "*", "functions": ["count"], "windows": ["2h"]}],
    }, "test")
    steps = [[("a", datetime(2026, 11, 23, 10, 0), 1.0, "m1"), ("a", datetime(2026, 11, 23, 11, 0), 1.0, "m1")],
             [("a", datetime(2026, 11, 23, 10, 30), 1.0, "m1"), ("a", datetime(2026, 11, 23, 11, 5), 1.0, "m1")]]
    rows = run_stream_in_steps(spark, tmp_path / "events", SCHEMA, lambda s: trailing_features_stream(s, view), steps)
    streamed = sorted((r.event_time, r.count_2h) for r in rows)
    assert streamed == [(datetime(2026, 11, 23, 10, 0), 1), (datetime(2026, 11, 23, 11, 0), 2),
                        (datetime(2026, 11, 23, 11, 5), 3)]


def test_state_per_entity_keeps_only_the_newest_max_events(spark, tmp_path):
    """max_events_per_entity 2: the first batch's three events are computed over all three,
    then only the newest two stay in state, so the next event counts 3, not 4. The other
    entity, under the bound, is unaffected."""
    view = build(FeatureView, {
        "name": "bounded", "source": {"contract": "transactions"}, "entity": "account_id",
        "event_time": "event_time", "kind": "trailing", "max_events_per_entity": 2,
        "aggregations": [{"column": "*", "functions": ["count"], "windows": ["1h"]}],
    }, "test")
    check_view(view, CONTRACTS, "test")
    at = lambda minute: datetime(2026, 11, 23, 10, minute)  # noqa: E731
    steps = [[("a", at(0), 1.0, "m1"), ("a", at(1), 1.0, "m1"), ("a", at(2), 1.0, "m1"), ("b", at(0), 1.0, "m1")],
             [("a", at(3), 1.0, "m1"), ("b", at(3), 1.0, "m1")]]
    rows = run_stream_in_steps(spark, tmp_path / "events", SCHEMA, lambda s: trailing_features_stream(s, view), steps)
    assert sorted((r.account_id, r.event_time, r.count_1h) for r in rows) == [
        ("a", at(0), 1), ("a", at(1), 2), ("a", at(2), 3), ("a", at(3), 3),
        ("b", at(0), 1), ("b", at(3), 2),
    ]


def test_an_idle_entitys_state_is_cleared_by_its_timer(spark, tmp_path):
    """A 1-hour count, lateness 10m: "a", last seen at 10:00, needs nothing in state once the
    watermark passes 11:00, and its timer clears it; "b", still active, keeps its events."""
    view = build(FeatureView, {
        "name": "idle", "source": {"contract": "transactions"}, "entity": "account_id",
        "event_time": "event_time", "kind": "trailing", "allowed_lateness": "10m",
        "aggregations": [{"column": "*", "functions": ["count"], "windows": ["1h"]}],
    }, "test")
    at = lambda hour, minute: datetime(2026, 11, 23, hour, minute)  # noqa: E731
    # The watermark reaches 11:20 after the second step; a's timer (11:00) fires in the next batch.
    steps = [[("a", at(10, 0), 1.0, "m1"), ("b", at(10, 0), 1.0, "m1")], [("b", at(11, 30), 1.0, "m1")],
             [("b", at(11, 40), 1.0, "m1")]]
    checkpoint = tmp_path / "checkpoint"
    rows = run_stream_in_steps(spark, tmp_path / "events", SCHEMA, lambda s: trailing_features_stream(s, view), steps,
                               checkpoint=checkpoint)
    assert len(rows) == 4

    def entities_in_state(batch_id: int) -> set[str]:
        state = (spark.read.format("statestore").option("stateVarName", "events").option("batchId", batch_id)
                 .load(str(checkpoint)))
        return {r.key[0] for r in state.collect()}

    last_batch = max(int(p.name) for p in (checkpoint / "commits").iterdir() if p.name.isdigit())
    assert entities_in_state(0) == {"a", "b"}
    # "a" got no event after the first batch, so only its timer can have removed it.
    assert entities_in_state(last_batch) == {"b"}


def disordered_steps(seed: int, steps: int = 4, per_step: int = 30):
    """Events up to 9 minutes behind the stream's clock (inside the view's 10-minute lateness)."""
    rng = random.Random(seed)
    clock = datetime(2026, 11, 23, 8, 0)
    result = []
    for step in range(steps):
        # From the second step on, one event of "a" 8 minutes before the last one of the step
        # before: it lands in rows already emitted, which must be corrected.
        rows = [("a", clock - timedelta(minutes=8), 1.5, "m9")] if step else []
        for _ in range(per_step):
            clock += timedelta(seconds=rng.choice([0, 30, 90, 400]))
            at = clock - timedelta(seconds=rng.choice([0, 0, 45, 300, 540]))
            amount = None if rng.random() < 0.1 else round(rng.uniform(1, 100), 2)
            rows.append((rng.choice(["a", "b", "c"]), at, amount, rng.choice(["m1", "m2", "m3", None])))
        rows.append(("a", clock, 2.5, "m1"))
        result.append(rows)
    return result


@pytest.mark.parametrize("seed", [3, 17])
def test_out_of_order_events_correct_the_rows_already_emitted(spark, tmp_path, seed):
    steps = disordered_steps(seed)
    batches = run_stream_batches(spark, tmp_path / "events", SCHEMA, lambda s: trailing_features_stream(s, VIEW), steps)
    everything = spark.createDataFrame([r for rows in steps for r in rows], SCHEMA)
    batch = trailing_features(everything, VIEW)
    columns = batch.columns
    # Each event's latest rows: those of the last micro-batch that emitted its entity and time.
    last = {(r.account_id, r.event_time): number for number, rows in enumerate(batches) for r in rows}
    latest = [r for number, rows in enumerate(batches) for r in rows if last[(r.account_id, r.event_time)] == number]
    assert rounded(tuple(r[c] for c in columns) for r in latest) == \
        rounded(tuple(r[c] for c in columns) for r in batch.collect())
    emitted = sum(len(rows) for rows in batches)
    assert emitted > sum(len(rows) for rows in steps)  # corrections were emitted
