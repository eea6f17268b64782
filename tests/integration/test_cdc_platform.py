"""Change data capture on the real platform: rows committed in PostgreSQL reach Kafka as Debezium
change events, through the connector the platform registers in its Kafka Connect worker."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from pipelines.core.kafka_connect import debezium_postgres_config
from pipelines.core.settings import CdcSettings
from pipelines.local import appdb
from pipelines.local.jars import DEFAULT_ROOT as JARS_ROOT
from pipelines.local.jars import artifact_name, bundle_folder


def read_changes(settings, topic: str, keys: set[str], until: int, timeout: float = 90.0) -> list[tuple[str, Any]]:
    """The (account id, value or None for a tombstone) of ``keys``' records on ``topic`` that
    a ``read_committed`` consumer sees, once there are ``until`` of them: in order per key (one
    key's changes are in one partition)."""
    consumer = Consumer({**settings.kafka.client_properties(), "group.id": f"cdc-test-{uuid.uuid4()}",
                         "isolation.level": "read_committed", "enable.auto.commit": False})
    deadline = time.monotonic() + timeout
    while topic not in consumer.list_topics(timeout=10).topics:  # Connect creates it with the first change
        assert time.monotonic() < deadline, f"no topic {topic}"
        time.sleep(0.5)
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    seen: list[tuple[str, Any]] = []
    try:
        while len(seen) < until and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            key = json.loads(message.key())["account_id"]
            if key in keys:
                seen.append((key, None if message.value() is None else json.loads(message.value())))
    finally:
        consumer.close()
    return seen


def account(run: str, n: int) -> str:
    return f"acct-cdc-{run}-{n}"


def test_committed_inserts_updates_and_deletes_reach_kafka_in_commit_order(cdc, settings):
    run = uuid.uuid4().hex[:8]
    a, b = account(run, 1), account(run, 2)
    with cdc.postgres.connect(settings.cdc.database.dbname, appdb.APP_ROLE) as conn:
        conn.execute("insert into accounts (account_id, status, credit_limit, home_country) values "
                     "(%s, 'active', 1000, 'DE'), (%s, 'active', 500, 'FR')", [a, b])
        conn.commit()
        # Two updates of one key in one transaction: two events, one transaction id.
        conn.execute("update accounts set credit_limit = 1500.50 where account_id = %s", [a])
        conn.execute("update accounts set status = 'frozen' where account_id = %s", [a])
        conn.commit()
        conn.execute("delete from accounts where account_id = %s", [b])
        conn.commit()
        conn.execute("insert into accounts (account_id, status, credit_limit, home_country) values "
                     "(%s, 'active', 1, 'XX')", [account(run, 3)])
        conn.rollback()  # never committed: never captured
    changes = read_changes(settings, settings.cdc.topic_for("public.accounts"), {a, b, account(run, 3)}, until=6)

    assert [(key, value and value["op"]) for key, value in changes if key == a] == [(a, "c"), (a, "u"), (a, "u")]
    assert [(key, value and value["op"]) for key, value in changes if key == b] == [(b, "c"), (b, "d"), (b, None)]
    after = [value["after"] for key, value in changes if key == a]
    assert [(r["status"], r["credit_limit"], r["home_country"]) for r in after] == [
        ("active", 1000.0, "DE"), ("active", 1500.5, "DE"), ("frozen", 1500.5, "DE")]
    for key in (a, b):
        lsns = [value["source"]["lsn"] for k, value in changes if k == key and value is not None]
        assert lsns == sorted(lsns)
    updates = [value["source"]["txId"] for key, value in changes if value and value["op"] == "u"]
    assert len(set(updates)) == 1
    [delete] = [value for key, value in changes if key == b and value and value["op"] == "d"]
    assert delete["after"] is None and delete["before"]["account_id"] == b


def test_a_new_connector_snapshots_the_rows_already_there(cdc, settings):
    run = uuid.uuid4().hex[:8]
    with cdc.postgres.connect(settings.cdc.database.dbname, appdb.APP_ROLE) as conn:
        conn.execute("insert into accounts (account_id, status, credit_limit, home_country) values "
                     "(%s, 'active', 10, 'PL'), (%s, 'closed', 20, 'PT')", [account(run, 1), account(run, 2)])
        conn.commit()
        existing = {row[0] for row in conn.execute("select account_id from accounts")}
    snapshot = dataclasses.replace(settings.cdc, connector=f"snap-{run}", slot=f"snap_{run}", topic_prefix=f"snap{run}")
    client = cdc.connect.client()
    client.put_config(snapshot.connector, debezium_postgres_config(snapshot))
    try:
        client.wait_running(snapshot.connector)
        changes = read_changes(settings, snapshot.topic_for("public.accounts"), existing, until=len(existing))
    finally:
        client.delete(snapshot.connector)
        deadline = time.monotonic() + 60
        while not cdc.postgres.drop_slot(snapshot.slot) and time.monotonic() < deadline:
            time.sleep(0.5)  # the slot is released once the task has stopped
    assert sorted(key for key, _ in changes) == sorted(existing)
    assert {value["op"] for _, value in changes} == {"r"}
    assert {key: value["after"]["status"] for key, value in changes
            if key in (account(run, 1), account(run, 2))} == {account(run, 1): "active", account(run, 2): "closed"}


def test_the_connector_config_names_the_password_variable_never_its_value(settings, monkeypatch):
    monkeypatch.setenv("CDC_DB_PASSWORD", "s3cr3t-value")
    config = debezium_postgres_config(settings.cdc)
    assert config["database.password"] == "${env:CDC_DB_PASSWORD}"
    assert "s3cr3t-value" not in json.dumps(config)
    assert config["table.include.list"] == "public.accounts"
    assert config["database.port"] == str(settings.local.postgres_port)


def test_the_connect_worker_and_its_plugin_share_one_kafka_clients_and_one_slf4j(cdc):
    jars = [artifact_name(p.name) for folder in (JARS_ROOT / "connect", bundle_folder("debezium-postgres", JARS_ROOT))
            for p in folder.glob("*.jar")]
    assert jars.count("kafka-clients") == 1
    assert jars.count("slf4j-api") == 1
    assert "debezium-connector-postgres" in jars


def test_status_reports_postgres_and_connect_healthy(cdc, settings):
    by_name = {s.name: s for s in cdc.status()}
    assert (by_name["postgres"].running, by_name["postgres"].detail) == (True, "healthy")
    assert (by_name["connect"].running, by_name["connect"].detail) == (True, "healthy")
    assert by_name["connect"].address == f"http://127.0.0.1:{settings.local.connect_port}"


def test_cdc_settings_point_at_the_local_platform_unless_the_environment_names_others(settings):
    assert isinstance(settings.cdc, CdcSettings)
    assert settings.cdc.connect_url == f"http://127.0.0.1:{settings.local.connect_port}"
    assert settings.cdc.database.port == settings.local.postgres_port
