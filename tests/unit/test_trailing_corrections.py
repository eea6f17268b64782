"""Trailing views under real arrival order: events out of order (ahead of the watermark), in
micro-batches of any size. The stream's logic (the events a new arrival changes, and their rows
recomputed over the entity's state) is replayed batch by batch at many seeds, and the latest row
of each event must equal a brute-force computation over every event the stream accepted."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from pipelines.core.config import build
from pipelines.core.contract_spec import load_contracts
from pipelines.core.settings import PROJECT_ROOT
from pipelines.core.times import micros
from pipelines.core.view_spec import FeatureView, check_view
from pipelines.features.trailing_state import affected, compute_trailing

CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")
COLUMNS = ["account_id", "event_time", "amount_usd", "merchant_id"]
MINUTE = 60_000_000


def view(delay: str) -> FeatureView:
    built = build(FeatureView, {
        "name": "velocity", "source": {"contract": "transactions"}, "entity": "account_id",
        "event_time": "event_time", "kind": "trailing", "delay": delay, "allowed_lateness": "10m",
        "aggregations": [
            {"column": "*", "functions": ["count"], "windows": ["5m", "30m"]},
            {"column": "amount_usd", "functions": ["sum", "avg", "min", "max", "last"], "windows": ["15m"]},
            {"column": "merchant_id", "functions": ["approx_count_distinct"], "windows": ["30m"]},
        ]}, "test")
    check_view(built, CONTRACTS, "test")
    return built


def brute_force(event: tuple, events: list[tuple], subject: FeatureView) -> dict:
    """The batch definition, written out plainly: each feature over the entity's events with time
    in ``(t - delay - w, t - delay]``."""
    row = {"account_id": event[0], "event_time": event[1]}
    t, delay = event[-1], micros(subject.delay)
    for name, function, column, window in subject.outputs():
        inside = [e for e in events if e[0] == event[0] and t - delay - micros(window) < e[-1] <= t - delay]
        if column == "*":
            row[name] = len(inside)
            continue
        at = COLUMNS.index(column)
        present = sorted(((e[-1], e[at]) for e in inside if e[at] is not None), key=lambda p: p[0])
        values = [v for _, v in present]
        if function == "count":
            row[name] = len(values)
        elif function == "approx_count_distinct":
            row[name] = len(set(values))
        elif function == "sum":
            row[name] = sum(values) if values else 0
        elif not values:
            row[name] = None
        elif function == "avg":
            row[name] = sum(values) / len(values)
        elif function == "min":
            row[name] = min(values)
        elif function == "max":
            row[name] = max(values)
        else:  # last: the latest time's value, the greatest among ties
            row[name] = max(v for when, v in present if when == present[-1][0])
    return row


def arrivals(seed: int, batches: int = 6) -> list[list[tuple]]:
    """Micro-batches of events: a clock that moves on, each event up to 9 minutes behind it
    (out of order, inside the 10-minute lateness), ties, nulls, three entities."""
    rng = random.Random(seed)
    clock = 1_795_000_000 * 1_000_000
    result = []
    for _ in range(batches):
        rows = []
        for _ in range(rng.randint(1, 25)):
            clock += rng.choice([0, 20, 60, 240]) * 1_000_000
            at = clock - rng.choice([0, 0, 0, 30, 200, 540]) * 1_000_000
            amount = None if rng.random() < 0.1 else round(rng.uniform(1, 100), 2)
            rows.append((rng.choice("abc"), f"t{at}", amount, rng.choice(["m1", "m2", None]), at))
        result.append(rows)
    return result


def replay(batches: list[list[tuple]], subject: FeatureView) -> tuple[list[tuple], list[tuple[int, dict]]]:
    """What the processor does, batch by batch: the watermark is the previous batches' latest
    event time minus the lateness; events behind it are left out; each entity's new events and
    the stored events they change are emitted. Returns the accepted events and (batch, row)."""
    lateness = micros(subject.allowed_lateness)
    state: dict[str, list[tuple]] = defaultdict(list)
    accepted, emitted, latest = [], [], None
    for number, rows in enumerate(batches):
        watermark = latest - lateness if latest is not None else -(2**62)
        for entity in sorted({r[0] for r in rows}):
            new = [r for r in rows if r[0] == entity and r[-1] >= watermark]
            if not new:
                continue
            stored = state[entity]
            targets = affected([e[-1] for e in stored], [e[-1] for e in new], subject)
            everything = stored + new
            targets += list(range(len(stored), len(everything)))
            emitted += [(number, row) for row in compute_trailing(everything, targets, COLUMNS, subject)]
            state[entity] = everything
            accepted += new
        latest = max([latest or -(2**62), *(r[-1] for r in rows)])
    return accepted, emitted


def latest_rows(emitted: list[tuple[int, dict]]) -> Counter:
    """Per event (entity, time): the rows of the last batch that emitted it."""
    last: dict[tuple, int] = {}
    for number, row in emitted:
        key = (row["account_id"], row["event_time"])
        last[key] = max(last.get(key, -1), number)
    return Counter(frozenset(_rounded(row).items()) for number, row in emitted
                   if number == last[(row["account_id"], row["event_time"])])


def _rounded(row: dict) -> dict:
    return {k: round(v, 9) if isinstance(v, float) else v for k, v in row.items()}


@pytest.mark.parametrize("delay", ["0s", "2m"])
@pytest.mark.parametrize("seed", range(60))
def test_the_latest_row_of_every_event_is_the_batch_row_whatever_the_arrival_order(seed, delay):
    subject = view(delay)
    accepted, emitted = replay(arrivals(seed), subject)
    expected = Counter(frozenset(_rounded(brute_force(e, accepted, subject)).items()) for e in accepted)
    assert latest_rows(emitted) == expected


def test_in_order_arrivals_emit_no_correction():
    subject = view("0s")
    in_order = [[("a", f"t{m}", 1.0, "m1", m * MINUTE) for m in range(step * 3, step * 3 + 3)] for step in range(4)]
    accepted, emitted = replay(in_order, subject)
    assert len(emitted) == len(accepted) == 12


def test_an_earlier_arrival_corrects_exactly_the_rows_whose_interval_holds_it():
    later = [("a", "t10", 5.0, "m1", 10 * MINUTE), ("a", "t14", 1.0, "m1", 14 * MINUTE),
             ("a", "t18", 2.0, "m1", 18 * MINUTE), ("b", "t12", 3.0, "m1", 12 * MINUTE)]
    # 9:00 arrives next, ahead of the watermark (18:00 - 10 minutes).
    _, emitted = replay([later, [("a", "t9", 7.0, "m2", 9 * MINUTE)]], view("0s"))
    corrected = sorted((row["event_time"], row["count_5m"], row["count_30m"], row["sum_amount_usd_15m"])
                       for number, row in emitted if number == 1)
    # Every later row of a holds 9:00 in its 30 minutes; only 10:00 in its 5 minutes; b is untouched.
    assert corrected == [("t10", 2, 2, 12.0), ("t14", 2, 3, 13.0), ("t18", 2, 4, 15.0), ("t9", 1, 1, 7.0)]


def test_the_events_emitted_again_are_those_whose_interval_holds_a_new_time_or_that_share_it():
    subject = view("2m")  # an event at s covers (s - 2m - 30m, s - 2m] at the widest
    stored = [0, 10 * MINUTE, 33 * MINUTE, 40 * MINUTE]
    # (1m, 31m] and (8m, 38m] hold 10m; the stored 10m event is at the same time: emitted with it.
    assert affected(stored, [10 * MINUTE], subject) == [1, 2, 3]
    assert affected(stored, [8 * MINUTE], subject) == [1, 2]  # (-22m, 8m] and (1m, 31m]; not (8m, 38m]
    assert affected(stored, [], subject) == [] and affected([], [MINUTE], subject) == []
