"""Sliding and session views on a stream emit exactly the batch rows whose window has closed
(seeded random in-order streams)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from pipelines.core.config import build
from pipelines.core.contract_spec import load_contracts
from pipelines.core.settings import PROJECT_ROOT
from pipelines.core.view_spec import FeatureView, check_view
from pipelines.features.transforms import session_features, sliding_features
from tests.support import run_stream_in_steps

CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")
SCHEMA = "merchant_id string, event_time timestamp, amount_usd double, account_id string"
LATENESS = timedelta(minutes=10)


def view(**spec) -> FeatureView:
    base = {"name": "v", "source": {"contract": "transactions"}, "entity": "merchant_id", "event_time": "event_time",
            "allowed_lateness": "10m"}
    built = build(FeatureView, {**base, **spec}, "test")
    check_view(built, CONTRACTS, "test")
    return built


SLIDING = view(kind="sliding", window="30m", slide="10m", aggregations=[
    {"column": "*", "functions": ["count"]}, {"column": "amount_usd", "functions": ["sum", "max", "last"]},
    {"column": "account_id", "functions": ["approx_count_distinct"]}])
SESSION = view(kind="session", gap="15m", aggregations=[{"column": "amount_usd", "functions": ["sum", "avg"]}],
               count_by=[{"column": "account_id", "values": ["a1", "a2"]}])


def random_steps(seed: int, steps: int = 4, per_step: int = 30):
    rng = random.Random(seed)
    clock = datetime(2026, 11, 23, 8, 0)
    result = []
    for _ in range(steps):
        rows = []
        for _ in range(per_step):
            clock += timedelta(seconds=rng.choice([0, 20, 60, 300, 1100]))
            amount = None if rng.random() < 0.1 else round(rng.uniform(1, 50), 2)
            rows.append((rng.choice(["m1", "m2"]), clock, amount, rng.choice(["a1", "a2", "a3"])))
        result.append(rows)
    return result


def normalised(rows, columns):
    return sorted(tuple(round(r[c], 9) if isinstance(r[c], float) else r[c] for c in columns) for r in rows)


@pytest.mark.parametrize("transform, v, end_column", [(sliding_features, SLIDING, "window_end"),
                                                      (session_features, SESSION, "session_end")],
                         ids=["sliding", "session"])
@pytest.mark.parametrize("seed", [3, 17])
def test_stream_emits_exactly_the_closed_batch_rows(spark, tmp_path, transform, v, end_column, seed):
    steps = random_steps(seed)
    streamed = run_stream_in_steps(spark, tmp_path / "events", SCHEMA, lambda s: transform(s, v), steps)
    everything = [r for rows in steps for r in rows]
    watermark = max(r[1] for r in everything) - LATENESS
    batch = transform(spark.createDataFrame(everything, SCHEMA), v)
    closed = [r for r in batch.collect() if r[end_column] <= watermark]
    assert closed, "the random stream should close some windows"
    assert normalised(streamed, batch.columns) == normalised(closed, batch.columns)
