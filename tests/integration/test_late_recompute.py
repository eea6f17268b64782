"""Late events on the real platform: the stream leaves them out, the late recompute finds them,
rewrites exactly the feature rows they belong to (Delta time-travel diff) and Redis serves the
corrected values; a run with nothing new changes nothing."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, time, timedelta, timezone

from pipelines.batch.late import recompute_late
from pipelines.core.times import utc_assuming_local
from pipelines.core.view_spec import event_time_column, feature_names
from pipelines.features.sinks import latest_per_entity
from pipelines.features.stream import run_features
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from pipelines.online.store import read_online, redis_client
from tests.support import topic_names

QUARTER = timedelta(minutes=15)


def rows_by_key(spark, path, version, key):
    """The table's rows at ``version`` by ``key``, ``computed_at`` aside, floats to 9 significant
    digits (a sum of doubles in another order differs in its last bits)."""
    table = spark.read.format("delta").option("versionAsOf", version).load(path).drop("computed_at")
    return {tuple(r[k] for k in key): {c: float(f"{v:.9g}") if isinstance(v, float) else v for c, v in r.asDict().items()}
            for r in table.collect()}


def changed_keys(before: dict, after: dict) -> set:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def version(spark, path) -> int:
    return spark.sql(f"DESCRIBE HISTORY delta.`{path}` LIMIT 1").collect()[0]["version"]


def naive_utc(moment: datetime) -> datetime:
    """An aware time as PySpark collects timestamps here (naive, the local zone)."""
    return moment.astimezone().replace(tzinfo=None)


def clean_spec(**changes) -> GeneratorSpec:
    base = dict(accounts=30, merchants=12, late_rate=0.0, out_of_order_rate=0.0, duplicate_rate=0.0, bad_rate=0.0,
                label_rate=0.0)
    return GeneratorSpec(**{**base, **changes})


def stream(spark, settings, spec: GeneratorSpec, views) -> None:
    produce(generate(spec), settings.kafka.client_properties(), topic_names=topic_names(settings))
    run_ingest(spark, settings, available_now=True)
    run_features(spark, settings, views, available_now=True)


def test_late_events_rewrite_exactly_their_rows_and_redis_serves_the_corrections(spark, isolated):
    settings = isolated()
    views = [settings.views[n] for n in ("account_velocity", "merchant_hourly", "account_sessions")]
    midnight = datetime.combine(datetime.now(timezone.utc).date(), time(0), timezone.utc) - timedelta(days=3)
    on_time = clean_spec(count=800, seed=5, end=midnight + timedelta(hours=3), span=timedelta(hours=6))
    stream(spark, settings, on_time, views)
    keys = {"account_velocity": ("account_id", "event_time"), "merchant_hourly": ("merchant_id", "window_start"),
            "account_sessions": ("account_id", "session_start")}
    first_paths = {v.name: settings.storage.feature_path(v.name) for v in views}
    streamed = {n: rows_by_key(spark, p, version(spark, p), keys[n]) for n, p in first_paths.items()}
    # Its one ingest batch spans 6 hours: a feature micro-batch could have read part of it under
    # a watermark the rest had moved, so its events count as possibly late. Recomputing the days
    # the stream is done with changes no row; the last day waits for the watermark.
    first = recompute_late(spark, settings, views)
    assert all(o.late_events > 0 and o.pending for o in first), first
    assert {n: rows_by_key(spark, p, version(spark, p), keys[n]) for n, p in first_paths.items()} == streamed

    # Events of the second day (00:10-01:40), 1-2 hours behind the stream and sent after it:
    # each is behind every watermark, and every window holding one has closed.
    late_spec = clean_spec(count=6, seed=77, end=midnight + timedelta(hours=2, minutes=40), span=timedelta(minutes=40),
                           late_rate=1.0, late_by=(timedelta(hours=1), timedelta(hours=1, minutes=50)))
    late = [json.loads(r.value) for r in generate(late_spec)]
    for event in late:
        event["time"] = datetime.fromisoformat(event["event_time"].replace("Z", "+00:00"))
    stream(spark, settings, late_spec, views)
    paths = {v.name: settings.storage.feature_path(v.name) for v in views}
    unchanged = {name: version(spark, path) for name, path in paths.items()}

    # The stream still writes the late events' days (its watermark is 2:50 on the second day):
    # they wait.
    waiting = recompute_late(spark, settings, views)
    assert all(o.late_events == len(late) and not o.days and o.pending for o in waiting), waiting
    assert {name: version(spark, path) for name, path in paths.items()} == unchanged

    # Two days later the stream's watermark has passed them: the next run recomputes them.
    stream(spark, settings, clean_spec(count=20, seed=99, end=midnight + timedelta(days=2, hours=1),
                                       span=timedelta(minutes=8)), views)  # within the lateness: none late
    paths = {v.name: settings.storage.feature_path(v.name) for v in views}
    before = {name: version(spark, path) for name, path in paths.items()}
    client = redis_client(settings.redis)
    outcomes = {o.view: o for o in recompute_late(spark, settings, views)}
    assert all(o.days == waiting[i].pending and not o.pending for i, o in enumerate(outcomes.values()))

    # account_velocity: each late event's own row is new, and every later row of its account
    # within a day counts it; no other row changes.
    key = ("account_id", "event_time")
    old = rows_by_key(spark, paths["account_velocity"], before["account_velocity"], key)
    new = rows_by_key(spark, paths["account_velocity"], outcomes["account_velocity"].feature_table_version, key)
    expected = set()
    for event in late:
        at = naive_utc(event["time"])
        expected.add((event["account_id"], at))
        expected |= {k for k in old if k[0] == event["account_id"] and at <= k[1] < at + timedelta(days=1)}
    assert changed_keys(old, new) == expected
    for (account, at) in expected & old.keys():
        counted = sum(1 for e in late if e["account_id"] == account and at - timedelta(days=1) < naive_utc(e["time"]) <= at)
        assert new[(account, at)]["count_1d"] == old[(account, at)]["count_1d"] + counted

    # merchant_hourly: the four 1-hour windows (15-minute slide) holding each late event.
    key = ("merchant_id", "window_start")
    old = rows_by_key(spark, paths["merchant_hourly"], before["merchant_hourly"], key)
    new = rows_by_key(spark, paths["merchant_hourly"], outcomes["merchant_hourly"].feature_table_version, key)
    windows = Counter()
    for event in late:
        first = naive_utc(event["time"]).replace(minute=event["time"].minute // 15 * 15, second=0, microsecond=0)
        windows.update((event["merchant_id"], first - i * QUARTER) for i in range(4))
    assert changed_keys(old, new) == set(windows)
    for window, count in windows.items():
        assert new[window]["count"] == (old[window]["count"] if window in old else 0) + count

    # account_sessions: only sessions of accounts with late events change.
    key = ("account_id", "session_start")
    old = rows_by_key(spark, paths["account_sessions"], before["account_sessions"], key)
    new = rows_by_key(spark, paths["account_sessions"], outcomes["account_sessions"].feature_table_version, key)
    assert changed_keys(old, new) and {k[0] for k in changed_keys(old, new)} <= {e["account_id"] for e in late}

    # Redis serves each entity's latest corrected row.
    for view in views:
        table = spark.read.format("delta").load(paths[view.name])
        latest = {r[view.entity]: r for r in latest_per_entity(table, view).collect()}
        for value in read_online(client, settings.redis.namespace, view.name, feature_names(view), sorted(latest)):
            expected_row = latest[value["entity"]]
            assert value["event_time"] == utc_assuming_local(expected_row[event_time_column(view)]), (view.name, value)
            assert all(value[n] == expected_row[n] or abs(value[n] - expected_row[n]) < 1e-9
                       for n in feature_names(view)), (view.name, value, expected_row)
    assert outcomes["account_velocity"].online_restated > 0

    # Nothing new since: the next run finds nothing and writes no feature table.
    again = recompute_late(spark, settings, views)
    assert [(o.new_rows, o.late_events, o.days, o.pending) for o in again] == [(0, 0, [], [])] * 3
    assert {n: version(spark, p) for n, p in paths.items()} == \
        {n: o.feature_table_version for n, o in outcomes.items()}
    state = spark.read.format("delta").load(settings.storage.late_recompute_path)
    # One state row per view and run: nothing late, late but waiting, recomputed, nothing new.
    assert state.count() == 12 and state.filter("late_events = 6 AND size(days_pending) > 0").count() == 3
