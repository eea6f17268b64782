"""The attributes store's rules on the real Redis (:mod:`pipelines.online.attributes`): newer wins
by LSN, a snapshot read equal to the row held changes nothing, a delete leaves a marker that
keeps an older change out, and a hash from before commit times were kept still reads."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from pipelines.online.attributes import (
    DELETED_RETENTION_MS,
    AttributeChange,
    AttributeStoreWriter,
    attribute_key,
    read_attributes,
)
from pipelines.online.serving import get_online_features
from pipelines.online.store import encode_value, redis_client

COLUMNS = ["status", "credit_limit"]


@pytest.fixture
def store(settings, platform):
    client = redis_client(settings.redis)
    namespace = f"attrs-{uuid.uuid4().hex[:8]}"
    yield client, namespace, AttributeStoreWriter(client, namespace, "accounts")
    for key in client.scan_iter(f"{namespace}:*"):
        client.delete(key)


def held(client, namespace, key="a"):
    [row] = read_attributes(client, namespace, "accounts", [key], COLUMNS)
    return row


def change(lsn, at, status="active", limit=100.0, deleted=False, read=False):
    return AttributeChange("a", lsn, at, deleted, {"status": status, "credit_limit": limit}, read=read)


def test_a_snapshot_read_equal_to_the_row_held_changes_nothing_and_one_that_differs_applies(store):
    client, namespace, writer = store
    assert writer.write([change(10, 1_000)]).applied == 1
    result = writer.write([change(20, 2_000, read=True)])
    assert (result.applied, result.stale) == (0, 1)
    assert held(client, namespace) == {"status": "active", "credit_limit": 100.0, "_lsn": 10, "_at": 1_000}
    assert writer.write([change(30, 3_000, status="frozen", read=True)]).applied == 1
    assert held(client, namespace) == {"status": "frozen", "credit_limit": 100.0, "_lsn": 30, "_at": 3_000}
    assert writer.write([change(25, 2_500, status="closed")]).applied == 0  # older than held


def test_a_delete_leaves_a_marker_that_keeps_an_older_change_out_until_a_newer_one(store):
    client, namespace, writer = store
    writer.write([change(10, 1_000), change(40, 4_000, deleted=True)])
    assert held(client, namespace) is None
    assert 0 < client.pttl(attribute_key(namespace, "accounts", "a")) <= DELETED_RETENTION_MS
    assert writer.write([change(35, 3_500, status="frozen")]).applied == 0  # a replayed older change
    assert held(client, namespace) is None
    assert writer.write([change(50, 5_000, status="reopened")]).applied == 1
    assert held(client, namespace) == {"status": "reopened", "credit_limit": 100.0, "_lsn": 50, "_at": 5_000}
    assert client.pttl(attribute_key(namespace, "accounts", "a")) == -1  # a row does not expire


def test_a_hash_without_a_commit_time_still_reads(store, settings):
    client, namespace, _ = store
    client.hset(attribute_key(namespace, "accounts", "a"), mapping={"_lsn": "7", "status": encode_value("active")})
    assert held(client, namespace) == {"status": "active", "credit_limit": None, "_lsn": 7, "_at": None}
    scoped = dataclasses.replace(settings, redis=dataclasses.replace(settings.redis, namespace=namespace))
    served = get_online_features(scoped, "account_profile", ["a"], client=client)
    assert [(r["status"], r["event_time"], r["age_seconds"]) for r in served] == [("active", None, None)]
