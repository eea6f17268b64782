"""The seeded stream = batch property, with disorder, for every view kind: 60 seeds, each its
own entities, streamed together in micro-batches whose events arrive up to 9 minutes out of
order (inside the 10-minute lateness) and with ties. Then a trailing view's latest row per
event, and every sliding window and session the watermark has closed, equal the batch
transform over all events, row for row."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from pipelines.core.config import build
from pipelines.core.contract_spec import load_contracts
from pipelines.core.settings import PROJECT_ROOT
from pipelines.core.view_spec import FeatureView, check_view
from pipelines.features.trailing_state import trailing_features_stream
from pipelines.features.transforms import session_features, sliding_features, trailing_features
from tests.support import run_stream_batches

CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")
LATENESS = timedelta(minutes=10)
SEEDS = range(60)
STEPS = 4
STEP = timedelta(minutes=20)
START = datetime(2026, 11, 23, 8, 0)


def view(**spec) -> FeatureView:
    base = {"name": "v", "source": {"contract": "transactions"}, "event_time": "event_time", "allowed_lateness": "10m"}
    built = build(FeatureView, {**base, **spec}, "test")
    check_view(built, CONTRACTS, "test")
    return built


TRAILING = view(kind="trailing", entity="account_id", delay="2m", aggregations=[
    {"column": "*", "functions": ["count"], "windows": ["10m", "1h"]},
    {"column": "amount_usd", "functions": ["sum", "max", "last"], "windows": ["30m"]},
    {"column": "merchant_id", "functions": ["approx_count_distinct"], "windows": ["1h"]}])
SLIDING = view(kind="sliding", entity="merchant_id", window="30m", slide="10m", aggregations=[
    {"column": "*", "functions": ["count"]}, {"column": "amount_usd", "functions": ["sum", "max", "last"]},
    {"column": "account_id", "functions": ["approx_count_distinct"]}])
SESSION = view(kind="session", entity="merchant_id", gap="15m",
               aggregations=[{"column": "amount_usd", "functions": ["sum", "avg"]}],
               count_by=[{"column": "account_id", "values": ["a1", "a2"]}])


def seeded_steps(seed: int) -> list[list[tuple]]:
    """One seed's events in ``STEPS`` micro-batches. Step k's events fall in its 20 minutes, or
    (one in four) up to 9 minutes before it: behind events of earlier steps, never behind the
    watermark (at most the previous step's end minus 10 minutes). Every time is on a 30-second
    grid, so ties are common."""
    rng = random.Random(seed)
    steps = []
    for k in range(STEPS):
        begin = START + k * STEP
        rows = []
        for _ in range(rng.randint(4, 12)):
            offset = rng.randrange(-18 if k else 0, 40) * 30  # seconds from the step's start
            amount = None if rng.random() < 0.1 else round(rng.uniform(1, 50), 2)
            rows.append((f"s{seed}-{rng.choice('ab')}", begin + timedelta(seconds=offset), amount,
                         rng.choice(["a1", "a2", "a3", None])))
        rng.shuffle(rows)
        steps.append(rows)
    return steps


def all_steps() -> list[list[tuple]]:
    """Every seed's step k in micro-batch k: one stream, 60 independent histories; then one
    event an hour on, alone in the last micro-batch, whose watermark closes every window."""
    per_seed = [seeded_steps(seed) for seed in SEEDS]
    clock = [("clock", START + STEPS * STEP + timedelta(hours=1), 1.0, None)]
    return [[row for steps in per_seed for row in steps[k]] for k in range(STEPS)] + [clock]


def schema_for(v: FeatureView) -> str:
    """The rows' columns named for the view: its entity, the event time, an amount, the other id."""
    other = "merchant_id" if v.entity == "account_id" else "account_id"
    return f"{v.entity} string, event_time timestamp, amount_usd double, {other} string"


def normalised(rows, columns):
    return sorted(tuple(round(r[c], 9) if isinstance(r[c], float) else r[c] for c in columns) for r in rows)


def test_the_steps_are_disordered_but_never_behind_the_watermark():
    steps = all_steps()
    behind_their_entity = 0
    for k in range(1, STEPS + 1):
        earlier = [r for rows in steps[:k] for r in rows]
        assert min(r[1] for r in steps[k]) >= max(r[1] for r in earlier) - LATENESS
        latest = {}
        for entity, at, *_ in earlier:
            latest[entity] = max(at, latest.get(entity, at))
        behind_their_entity += sum(1 for entity, at, *_ in steps[k] if entity in latest and at < latest[entity])
    assert behind_their_entity > 200


@pytest.mark.parametrize("v", [TRAILING, SLIDING, SESSION], ids=["trailing", "sliding", "session"])
def test_disordered_stream_equals_the_batch_transform_at_60_seeds(spark, tmp_path, v):
    steps = all_steps()
    schema = schema_for(v)
    everything = spark.createDataFrame([r for rows in steps for r in rows], schema)
    if v.kind == "trailing":
        batches = run_stream_batches(spark, tmp_path / "events", schema, lambda s: trailing_features_stream(s, v), steps)
        batch = trailing_features(everything, v)
        # Each event's latest rows: those of the last micro-batch that emitted its entity and time.
        last = {(r[v.entity], r.event_time): n for n, rows in enumerate(batches) for r in rows}
        streamed = [r for n, rows in enumerate(batches) for r in rows if last[(r[v.entity], r.event_time)] == n]
        expected = batch.collect()
    else:
        transform, end = (sliding_features, "window_end") if v.kind == "sliding" else (session_features, "session_end")
        batches = run_stream_batches(spark, tmp_path / "events", schema, lambda s: transform(s, v), steps)
        streamed = [r for rows in batches for r in rows]
        watermark = max(r[1] for rows in steps for r in rows) - LATENESS
        batch = transform(everything, v)
        expected = [r for r in batch.collect() if r[end] <= watermark]
    seeds = {r[v.entity].split("-")[0] for r in expected} - {"clock"}
    assert len(seeds) == len(SEEDS), len(seeds)
    assert normalised(streamed, batch.columns) == normalised(expected, batch.columns)
    if v.kind == "trailing":
        assert sum(len(rows) for rows in batches) > len(expected)  # corrections were emitted
