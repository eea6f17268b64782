"""The point-in-time join against two independent references on random data, row for row: a
brute-force scan of every candidate row (both modes) and pandas ``merge_asof`` (as corrected)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pandas as pd
import pytest

from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.training.join import point_in_time_join, view_request

VIEWS = load_settings("local", PROJECT_ROOT / "conf").views
START = datetime(2026, 11, 20)
MAX_AGE = {"account_velocity": timedelta(minutes=40), "merchant_hourly": timedelta(minutes=90)}


def random_data(seed: int):
    """Spine and two feature tables over 5 accounts / 3 merchants in 4 hours, on a coarse time
    grid so that equal times (spine = feature, feature = feature) are frequent."""
    rng = random.Random(seed)

    def moment() -> datetime:
        return START + timedelta(minutes=5 * rng.randrange(48))

    accounts = [f"a{i}" for i in range(5)] + [None]
    merchants = [f"m{i}" for i in range(3)]
    spine = [(f"e{i}", rng.choice(accounts), rng.choice(merchants), moment()) for i in range(120)]
    spine += spine[:10]  # duplicate examples
    velocity = []
    for _ in range(150):
        when = moment()
        computed = when + timedelta(minutes=rng.choice([0, 1, 7, 30, 120]))
        velocity.append((rng.choice(accounts[:-1]), when, computed, rng.randrange(4), rng.choice([None, 1.5, 2.5])))
    hourly = []
    for _ in range(60):
        end = moment()
        hourly.append((rng.choice(merchants), end - timedelta(hours=1), end,
                       end + timedelta(minutes=rng.choice([0, 11, 50])), rng.randrange(3)))
    return spine, velocity, hourly


def brute_force(spine, tables, mode):
    """For each spine row and view: scan every row of the entity, keep those in range (and, as
    served, computed by T), take the max by (event time, computed_at, values)."""
    out = []
    for example, account, merchant, ts in spine:
        row = [example, account, merchant, ts]
        for name, key in (("account_velocity", account), ("merchant_hourly", merchant)):
            candidates = [
                (r["event_time"], r["computed_at"], *r["values"]) for r in tables[name]
                if r["key"] == key and key is not None and ts - MAX_AGE[name] <= r["event_time"] <= ts
                and (mode == "as_corrected" or r["computed_at"] <= ts)
            ]
            width = 2 + len(tables[name][0]["values"])
            row += list(max(candidates, key=_order)) if candidates else [None] * width
        out.append(tuple(row))
    return out


def _order(candidate):
    # Spark orders nulls first (lowest) inside structs.
    return tuple((value is not None, value) for value in candidate)


def spark_join(spark, spine, velocity, hourly, mode):
    spine_df = spark.createDataFrame(spine, "example string, account_id string, merchant_id string, ts timestamp")
    tables = {
        "account_velocity": spark.createDataFrame(velocity, "account_id string, event_time timestamp, "
                                                  "computed_at timestamp, count_1h long, avg_amount_usd_1h double"),
        "merchant_hourly": spark.createDataFrame(hourly, "merchant_id string, window_start timestamp, "
                                                 "window_end timestamp, computed_at timestamp, count long"),
    }
    requests = [view_request(VIEWS["account_velocity"], ["count_1h", "avg_amount_usd_1h"],
                             MAX_AGE["account_velocity"]),
                view_request(VIEWS["merchant_hourly"], ["count"], MAX_AGE["merchant_hourly"])]
    return point_in_time_join(spine_df, tables, requests, "ts", mode)


def as_tables(velocity, hourly):
    return {
        "account_velocity": [{"key": a, "event_time": e, "computed_at": c, "values": (n, avg)}
                             for a, e, c, n, avg in velocity],
        "merchant_hourly": [{"key": m, "event_time": end, "computed_at": c, "values": (n,)}
                            for m, _, end, c, n in hourly],
    }


def _sorted(rows):
    return sorted(rows, key=lambda r: tuple((v is None, str(v)) for v in r))


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("mode", ["as_corrected", "as_served"])
def test_the_join_equals_a_brute_force_scan(spark, seed, mode):
    spine, velocity, hourly = random_data(seed)
    got = [tuple(r) for r in spark_join(spark, spine, velocity, hourly, mode).collect()]
    expected = brute_force(spine, as_tables(velocity, hourly), mode)
    assert len(got) == len(spine)
    assert _sorted(got) == _sorted(expected)


@pytest.mark.parametrize("seed", [4, 5])
def test_the_join_equals_pandas_merge_asof_with_the_same_tolerance(spark, seed):
    spine, velocity, hourly = random_data(seed)
    got = spark_join(spark, spine, velocity, hourly, "as_corrected").toPandas()
    frame = pd.DataFrame(spine, columns=["example", "account_id", "merchant_id", "ts"])
    frame["row"] = range(len(frame))
    for name, rows, key, columns in (
        ("account_velocity", velocity, "account_id", ["count_1h", "avg_amount_usd_1h"]),
        ("merchant_hourly", [(m, end, c, n) for m, _, end, c, n in hourly], "merchant_id", ["count"]),
    ):
        table = pd.DataFrame(rows, columns=[key, "event_time", "computed_at", *columns])
        # merge_asof takes the last of equal times: sort so that "last" is our tie-break order.
        table = table.sort_values(["event_time", "computed_at", *columns], na_position="first", kind="stable")
        table = table.rename(columns={c: f"{name}__{c}" for c in ["event_time", "computed_at", *columns]})
        table["_t"] = table[f"{name}__event_time"]
        known = frame[frame[key].notna()].sort_values("ts")
        merged = pd.merge_asof(known, table, left_on="ts", right_on="_t", by=key,
                               tolerance=pd.Timedelta(MAX_AGE[name]), direction="backward",
                               allow_exact_matches=True).drop(columns="_t")
        frame = frame.merge(merged[["row", *[c for c in table.columns if c.startswith(name)]]], on="row", how="left")
    expected = frame.drop(columns="row")
    assert len(got) == len(expected)
    assert _rows(got[list(expected.columns)]) == _rows(expected)


def _rows(frame: pd.DataFrame) -> list[tuple]:
    """Sorted rows with one spelling per value: None for every missing value, floats for numbers
    (Spark's nullable longs arrive in pandas as floats)."""
    def value(v):
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            return None
        return float(v) if isinstance(v, (int, float)) else v
    rows = [tuple(value(v) for v in r) for r in frame.astype(object).itertuples(index=False)]
    return _sorted(rows)
