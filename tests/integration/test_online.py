"""The Redis online store against the real server: newer wins, idempotent, typed, with TTLs."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import redis

from jobs import online
from pipelines.core.settings import PROJECT_ROOT, RedisSettings
from pipelines.online.serving import get_online_features
from pipelines.online.store import OnlineStoreError, OnlineStoreWriter, entity_key, read_online, redis_client
from tests.support import BLOCK_SPARK

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
FEATURES = ["count_1h", "sum_amount_usd_1h", "last_seen"]


@pytest.fixture
def client(platform, settings):
    return redis_client(settings.redis)


@pytest.fixture
def namespace():
    return f"test-{uuid.uuid4().hex[:8]}"


def row(entity: str, minutes: int, count: int, total: float | None = None):
    return {"account_id": entity, "event_time": T0 + timedelta(minutes=minutes), "count_1h": count,
            "sum_amount_usd_1h": total, "last_seen": None}


def write(writer: OnlineStoreWriter, rows, version: int = 0):
    return writer.write(rows, "account_id", "event_time", FEATURES, version)


def stored(client, namespace, *entities):
    return read_online(client, namespace, "velocity", FEATURES, list(entities), now=T0 + timedelta(hours=1))


def test_values_round_trip_with_their_types(client, namespace):
    writer = OnlineStoreWriter(client, namespace, "velocity", ttl=timedelta(hours=1))
    seen = datetime(2026, 11, 23, 9, 59, 59, 123456, tzinfo=timezone.utc)
    write(writer, [{"account_id": "a", "event_time": T0, "count_1h": 3, "sum_amount_usd_1h": 0.1 + 0.2, "last_seen": seen}])
    assert stored(client, namespace, "a") == [{
        "entity": "a", "count_1h": 3, "sum_amount_usd_1h": 0.30000000000000004, "last_seen": seen,
        "event_time": T0, "age_seconds": 3600.0,
    }]


def test_naive_times_are_local_time_as_pyspark_hands_them_out(client, namespace, monkeypatch):
    """PySpark's collect/RDD rows give naive datetimes in the Python process's time zone, not
    the session's UTC: at UTC+5:30, 15:30 naive is 10:00 UTC, in the key and in the values."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        local = datetime(2026, 11, 23, 15, 30)
        writer = OnlineStoreWriter(client, namespace, "velocity", ttl=timedelta(hours=1))
        write(writer, [{"account_id": "a", "event_time": local, "count_1h": 1, "sum_amount_usd_1h": None,
                        "last_seen": local - timedelta(minutes=1)}])
    finally:
        monkeypatch.undo()
        time.tzset()
    [value] = stored(client, namespace, "a")
    assert value["event_time"] == T0
    assert value["last_seen"] == T0 - timedelta(minutes=1)


def test_older_event_never_overwrites_a_newer_one(client, namespace):
    writer = OnlineStoreWriter(client, namespace, "velocity", ttl=timedelta(hours=1))
    assert write(writer, [row("a", 10, 5)]).written == 1
    result = write(writer, [row("a", 5, 99)])
    assert (result.written, result.stale) == (0, 1)
    assert stored(client, namespace, "a")[0]["count_1h"] == 5


def test_replaying_a_batch_changes_nothing(client, namespace):
    writer = OnlineStoreWriter(client, namespace, "velocity", ttl=timedelta(hours=1))
    batch = [row("a", 10, 5, 1.5), row("b", 12, 2, None)]
    write(writer, batch)
    before = {k: client.hgetall(k) for k in client.scan_iter(f"{namespace}:*")}
    assert write(writer, batch).written == 0
    assert {k: client.hgetall(k) for k in client.scan_iter(f"{namespace}:*")} == before


def test_restatement_with_a_higher_version_overwrites_the_same_event_time(client, namespace):
    writer = OnlineStoreWriter(client, namespace, "velocity", ttl=timedelta(hours=1))
    write(writer, [row("a", 10, 5, 1.0)], version=0)
    assert write(writer, [row("a", 10, 6, None)], version=1).written == 1
    value = stored(client, namespace, "a")[0]
    assert (value["count_1h"], value["sum_amount_usd_1h"]) == (6, None)  # null replaces the old value
    assert write(writer, [row("a", 10, 7)], version=1).written == 0  # same version: a replay


def test_every_written_key_has_the_view_ttl(client, namespace):
    writer = OnlineStoreWriter(client, namespace, "velocity", ttl=timedelta(minutes=30))
    write(writer, [row(f"acct-{i}", i, i) for i in range(50)])
    ttls = [client.pttl(k) for k in client.scan_iter(f"{namespace}:*")]
    assert len(ttls) == 50 and all(0 < t <= 30 * 60 * 1000 for t in ttls)


def test_missing_and_expired_entities_read_as_explicit_nulls(client, namespace):
    writer = OnlineStoreWriter(client, namespace, "velocity", ttl=timedelta(milliseconds=50))
    write(writer, [row("gone", 1, 1)])
    assert client.exists(entity_key(namespace, "velocity", "gone"))
    time.sleep(0.2)  # past the 50 ms TTL
    rows = read_online(client, namespace, "velocity", FEATURES, ["gone", "never"])
    assert rows == [
        {"entity": "gone", "count_1h": None, "sum_amount_usd_1h": None, "last_seen": None, "event_time": None, "age_seconds": None},
        {"entity": "never", "count_1h": None, "sum_amount_usd_1h": None, "last_seen": None, "event_time": None, "age_seconds": None},
    ]


def test_racing_writers_with_shuffled_and_duplicate_writes_leave_the_newest(client, namespace):
    """Two writers send the same 600 versions of 20 keys, each in its own shuffled order with
    duplicates; whatever the interleaving, every key ends at its greatest (event time, version)."""
    rng = random.Random(42)
    writes = [(f"acct-{k}", minute, version) for k in range(20) for minute in range(10) for version in range(3)]
    newest = {}
    for entity, minute, version in writes:
        newest[entity] = max(newest.get(entity, (-1, -1)), (minute, version))

    def run(seed: int) -> None:
        own = redis_client(RedisSettings(host="127.0.0.1", port=client.connection_pool.connection_kwargs["port"]))
        writer = OnlineStoreWriter(own, namespace, "velocity", ttl=timedelta(hours=1), chunk_size=7)
        order = writes + random.Random(seed).sample(writes, 200)
        random.Random(seed).shuffle(order)
        for entity, minute, version in order:
            write(writer, [row(entity, minute, minute * 10 + version)], version=version)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (rng.random(), rng.random())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    values = stored(client, namespace, *sorted(newest))
    assert {v["entity"]: v["count_1h"] for v in values} == {e: m * 10 + v for e, (m, v) in newest.items()}


def test_a_dropped_connection_is_retried(client, namespace):
    own = redis.Redis(host="127.0.0.1", port=client.connection_pool.connection_kwargs["port"])
    writer = OnlineStoreWriter(own, namespace, "velocity", ttl=timedelta(hours=1), backoff=0.01)
    write(writer, [row("a", 1, 1)])
    client.client_kill_filter(_type="normal", skipme=True)  # drops the writer's pooled connection
    assert write(writer, [row("a", 2, 2)]).written == 1
    assert stored(client, namespace, "a")[0]["count_1h"] == 2


def test_redis_down_fails_the_batch_loudly_after_bounded_retries(namespace):
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    writer = OnlineStoreWriter(dead, namespace, "velocity", ttl=timedelta(hours=1), attempts=3, backoff=0.01)
    with pytest.raises(OnlineStoreError, match="failed 3 times"):
        write(writer, [row("a", 1, 1)])


def test_cli_prints_values_with_their_age_and_nulls_for_unknown_entities(client, settings, capsys):
    writer = OnlineStoreWriter(client, settings.redis.namespace, "merchant_hourly", ttl=timedelta(hours=1))
    writer.write([{"merchant_id": "cli-m1", "window_end": T0, "count": 4, "sum_amount_usd": 12.5, "avg_amount_usd": 3.125,
                   "approx_count_distinct_account_id": 2}], "merchant_id", "window_end",
                 ["count", "sum_amount_usd", "avg_amount_usd", "approx_count_distinct_account_id"], version=0)
    code = online.main(["get", "--env", "local", "--set", f"redis.port={settings.redis.port}",
                        "--view", "merchant_hourly", "--entity", "cli-m1,cli-unknown", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [(r["entity"], r["count"], r["sum_amount_usd"], r["event_time"]) for r in lines] == [
        ("cli-m1", 4, 12.5, "2026-11-23 10:00:00+00:00"), ("cli-unknown", None, None, None)]
    assert lines[0]["age_seconds"] > 0 and lines[1]["age_seconds"] is None


def test_cli_rejects_an_undeclared_view(capsys):
    assert online.main(["get", "--env", "local", "--view", "nope", "--entity", "x"]) == 2
    assert "--view: 'nope' is not declared in conf/features" in capsys.readouterr().err


def test_get_online_features_as_pandas_keeps_request_order_and_nulls(client, settings):
    writer = OnlineStoreWriter(client, settings.redis.namespace, "merchant_hourly", ttl=timedelta(hours=1))
    writer.write([{"merchant_id": "api-m1", "window_end": T0, "count": 4, "sum_amount_usd": 12.5, "avg_amount_usd": None,
                   "approx_count_distinct_account_id": 2}], "merchant_id", "window_end",
                 ["count", "sum_amount_usd", "avg_amount_usd", "approx_count_distinct_account_id"], version=0)
    frame = get_online_features(settings, "merchant_hourly", ["api-unknown", "api-m1"], as_pandas=True, client=client)
    assert list(frame.columns) == ["entity", "count", "sum_amount_usd", "avg_amount_usd",
                                   "approx_count_distinct_account_id", "event_time", "age_seconds"]
    assert list(frame["entity"]) == ["api-unknown", "api-m1"]
    assert frame.loc[1, "count"] == 4 and frame.loc[1, "event_time"] == pd.Timestamp(T0)
    assert frame.loc[0, ["count", "sum_amount_usd", "event_time", "age_seconds"]].isna().all()
    assert pd.isna(frame.loc[1, "avg_amount_usd"])
    with pytest.raises(KeyError, match="'nope' is not declared"):
        get_online_features(settings, "nope", ["x"], client=client)
    with pytest.raises(TypeError, match="not one string"):
        get_online_features(settings, "merchant_hourly", "api-m1", client=client)


def test_a_model_server_reads_features_with_no_spark_installed(client, settings):
    writer = OnlineStoreWriter(client, settings.redis.namespace, "merchant_hourly", ttl=timedelta(hours=1))
    writer.write([{"merchant_id": "srv-m1", "window_end": T0, "count": 7, "sum_amount_usd": 21.0, "avg_amount_usd": 3.0,
                   "approx_count_distinct_account_id": 5}], "merchant_id", "window_end",
                 ["count", "sum_amount_usd", "avg_amount_usd", "approx_count_distinct_account_id"], version=0)
    server = BLOCK_SPARK + f"""
import json
from pipelines.core.settings import load_settings
from pipelines.online.serving import get_online_features
settings = load_settings("local", overrides={{"redis": {{"port": {settings.redis.port},
                                                       "namespace": "{settings.redis.namespace}"}}}})
rows = get_online_features(settings, "merchant_hourly", ["srv-m1", "srv-unknown"])
assert not any(m.split(".")[0] in ("pyspark", "delta", "py4j") for m in sys.modules)
print(json.dumps(rows, default=str))
"""
    done = subprocess.run([sys.executable, "-c", server], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    served = json.loads(done.stdout)
    assert [(r["entity"], r["count"], r["sum_amount_usd"], r["avg_amount_usd"], r["event_time"]) for r in served] == [
        ("srv-m1", 7, 21.0, 3.0, "2026-11-23 10:00:00+00:00"), ("srv-unknown", None, None, None, None)]
