"""``fp-cdc`` against the real platform: PostgreSQL -> Debezium (Kafka Connect) -> Kafka -> the
current and history Delta tables. After each step the current table must equal ``SELECT * FROM
accounts`` and the history must hold one row per committed change.

The module has a connector of its own (its own slot and topic prefix): it starts with a snapshot
of the accounts table as the other tests left it, then streams."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from confluent_kafka import Consumer, TopicPartition

from pipelines.cdc.stream import rebuild_tables, run_cdc
from pipelines.core.kafka_admin import TopicSpec, ensure_topics
from pipelines.core.kafka_connect import debezium_postgres_config
from pipelines.local import appdb
from pipelines.local.generator import ACCOUNTS, AccountsTableWriter, GeneratorSpec, generate, produce
from pipelines.local.services import wait_healthy
from pipelines.online.attributes import attribute_key, read_attributes
from pipelines.online.serving import get_online_features
from pipelines.online.store import redis_client
from pipelines.scoring.features import FeatureReader, ScoredEvent, servable_features
from pipelines.training.build import TrainingSetRequest, build_training_set
from pipelines.training.join import view_request
from pipelines.training.spines import SpineSpec
from tests.support import isolation

COLUMNS = ("account_id", "status", "credit_limit", "home_country", "updated_at")


@pytest.fixture(scope="module")
def capture(cdc, base_overrides, tmp_path_factory):
    """Settings with this module's connector, topic and lake; the connector running."""
    run = uuid.uuid4().hex[:8]
    prefix = f"cdc{run}"
    topic = f"{prefix}.public.accounts"
    make = isolation(base_overrides, tmp_path_factory.mktemp("cdc"))
    settings = make(kafka={"topics": {topic: {"contract": "accounts", "partitions": 2, "replication_factor": 1}}},
                    cdc={"connector": f"cdc-test-{run}", "slot": f"cdc_test_{run}", "topic_prefix": prefix})
    ensure_topics(settings.kafka.client_properties(), [TopicSpec(topic, 2, 1)])
    client = cdc.connect.client()
    client.put_config(settings.cdc.connector, debezium_postgres_config(settings.cdc))
    client.wait_running(settings.cdc.connector)
    yield settings
    client.delete(settings.cdc.connector)
    deadline = time.monotonic() + 60
    while not cdc.postgres.drop_slot(settings.cdc.slot) and time.monotonic() < deadline:
        time.sleep(0.5)


def write(cdc, settings, *statements):
    """Runs each (sql, params) in its own committed transaction, as the application would."""
    with cdc.postgres.connect(settings.cdc.database.dbname, appdb.APP_ROLE) as conn:
        for sql, params in statements:
            conn.execute(sql, params)
            conn.commit()


def captured_up_to_now(cdc, settings, timeout: float = 90.0) -> None:
    """Waits until every change committed so far is on the topic: a marker row's change is."""
    marker = f"marker-{uuid.uuid4().hex[:8]}"
    write(cdc, settings, ("insert into accounts (account_id, status, credit_limit, home_country) "
                          "values (%s, 'marker', 0, 'ZZ')", [marker]))
    topic = settings.cdc.topic_for("public.accounts")
    consumer = Consumer({**settings.kafka.client_properties(), "group.id": f"marker-{marker}",
                         "isolation.level": "read_committed"})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None and message.key() \
                    and json.loads(message.key())["account_id"] == marker:
                return
        raise AssertionError(f"the marker row {marker} did not reach {topic} in {timeout:.0f}s")
    finally:
        consumer.close()


def database_rows(cdc, settings) -> list[tuple]:
    with cdc.postgres.connect(settings.cdc.database.dbname, appdb.APP_ROLE) as conn:
        rows = conn.execute(f"select {', '.join(COLUMNS)} from accounts").fetchall()
    return sorted((a, s, float(c) if isinstance(c, Decimal) else c, h, u.astimezone(timezone.utc)) for a, s, c, h, u in rows)


def table_rows(spark, path) -> list[tuple]:
    frame = spark.read.format("delta").load(path).select(*COLUMNS)
    return sorted((a, s, c, h, u.replace(tzinfo=timezone.utc)) for a, s, c, h, u in frame.collect())


def redis_rows(capture, keys) -> list[tuple]:
    """The attributes Redis serves for ``keys``, as database rows (absent keys left out)."""
    stored = read_attributes(redis_client(capture.redis), capture.redis.namespace, "accounts", keys, COLUMNS[1:])
    return sorted((key, r["status"], r["credit_limit"], r["home_country"], r["updated_at"].astimezone(timezone.utc))
                  for key, r in zip(keys, stored) if r is not None)


def sync(spark, capture, cdc):
    captured_up_to_now(cdc, capture)
    run_cdc(spark, capture, available_now=True)
    return capture.storage.cdc_path(capture.cdc.topic_for("public.accounts"), "current")


def test_the_current_table_equals_the_database_after_snapshot_inserts_updates_and_deletes(spark, cdc, capture):
    run = uuid.uuid4().hex[:6]
    a, b, c = (f"acct-e2e-{run}-{n}" for n in range(3))
    insert = "insert into accounts (account_id, status, credit_limit, home_country) values (%s, %s, %s, %s)"
    write(cdc, capture, (insert, [a, "active", 100, "DE"]), (insert, [b, "active", 200, "FR"]),
          (insert, [c, "active", 300, "PL"]))
    # Several changes of one key land in one micro-batch; a delete with its tombstone.
    write(cdc, capture, *[("update accounts set credit_limit = %s, updated_at = now() where account_id = %s", [n, a])
                          for n in (110, 120, 130)])
    write(cdc, capture, ("update accounts set status = 'frozen' where account_id = %s", [b]),
          ("delete from accounts where account_id = %s", [c]))
    current = sync(spark, capture, cdc)
    database = database_rows(cdc, capture)
    assert table_rows(spark, current) == database
    assert redis_rows(capture, [row[0] for row in database] + [c]) == database  # c was deleted: not served
    history = spark.read.format("delta").load(capture.storage.cdc_path(capture.cdc.topic_for("public.accounts"),
                                                                       "history"))
    mine = history.filter(history.account_id.isin(a, b, c))
    assert mine.count() == 3 + 3 + 1 + 1  # three inserts, three updates of a, b's update, c's delete
    assert mine.filter("valid_to is null").count() == 3  # each key's latest change is open
    assert [r.credit_limit for r in mine.filter(f"account_id = '{a}'").orderBy("cdc_lsn").collect()] == [
        100.0, 110.0, 120.0, 130.0]


def test_a_column_added_to_the_table_appears_as_a_new_nullable_column(spark, cdc, capture):
    run = uuid.uuid4().hex[:6]
    column = f"tier_{run}"
    account = f"acct-col-{run}"
    with cdc.postgres.connect(capture.cdc.database.dbname, appdb.APP_ROLE, autocommit=True) as conn:
        conn.execute(f"alter table accounts add column {column} text")
    try:
        write(cdc, capture, ("insert into accounts (account_id, status, credit_limit, home_country, "
                             f"{column}) values (%s, 'active', 5, 'IT', 'gold')", [account]))
        current = sync(spark, capture, cdc)
        frame = spark.read.format("delta").load(current)
        assert column in frame.columns
        assert {r.account_id: r[column] for r in frame.filter(f"account_id = '{account}'").collect()} == {account: "gold"}
        assert table_rows(spark, current) == database_rows(cdc, capture)
    finally:
        with cdc.postgres.connect(capture.cdc.database.dbname, appdb.APP_ROLE, autocommit=True) as conn:
            conn.execute(f"alter table accounts drop column {column}")


def test_the_generators_account_changes_reach_the_current_table_the_history_and_redis(spark, cdc, capture):
    # The transactions keep every fault the generator injects: they go to their topic untouched by CDC.
    spec = GeneratorSpec(count=600, accounts=40, seed=5, account_change_rate=0.3)
    records = list(generate(spec))
    changes = [r for r in records if r.topic == ACCOUNTS]
    assert {r.kind for r in changes} == {"insert", "update", "delete"}
    with cdc.postgres.connect(capture.cdc.database.dbname, appdb.APP_ROLE) as conn:
        summary = produce(records, capture.kafka.client_properties(),
                          topic_names={"transactions": capture.ingest.topics[0], "labels": capture.ingest.topics[1]},
                          accounts_table=AccountsTableWriter(conn))
    assert summary.sent(ACCOUNTS) == len(changes)
    assert summary.sent(capture.ingest.topics[0]) == sum(1 for r in records if r.topic == "transactions")
    current = sync(spark, capture, cdc)
    database = database_rows(cdc, capture)
    assert table_rows(spark, current) == database
    generated = sorted({r.key.decode() for r in changes})
    assert redis_rows(capture, generated) == [row for row in database if row[0] in generated]
    history = spark.read.format("delta").load(capture.storage.cdc_path(capture.cdc.topic_for("public.accounts"),
                                                                       "history"))
    assert history.filter(history.account_id.isin(generated)).count() == len(changes)  # one row per committed change


def test_a_killed_connect_worker_and_a_restarted_database_lose_and_repeat_no_change(spark, cdc, capture):
    run = uuid.uuid4().hex[:6]
    accounts = [f"acct-crash-{run}-{n}" for n in range(4)]
    insert = "insert into accounts (account_id, status, credit_limit, home_country) values (%s, 'active', %s, 'DE')"
    update = "update accounts set credit_limit = credit_limit + 1, updated_at = now() where account_id = %s"
    write(cdc, capture, *[(insert, [a, 100]) for a in accounts])
    committed = len(accounts)
    # Streaming: the connector's offsets are committed with its records (exactly-once delivery).
    # (Killed before its first commit, a connector snapshots its tables again on restart: the
    # changes between two snapshots then reach the history as one snapshot row per key.)
    captured_up_to_now(cdc, capture)
    # The Connect worker is killed (no clean stop) while the database goes on.
    cdc.connect.stop_now()
    write(cdc, capture, *[(update, [a]) for a in accounts])
    committed += len(accounts)
    cdc.connect.start()
    wait_healthy(cdc.connect, 180)
    cdc.connect.client().wait_running(capture.cdc.connector)
    write(cdc, capture, *[(update, [a]) for a in accounts[:2]])
    committed += 2
    # PostgreSQL restarts (a fast shutdown: the connector's replication connection drops).
    cdc.postgres.stop()
    cdc.postgres.start()
    wait_healthy(cdc.postgres, 60)
    write(cdc, capture, ("delete from accounts where account_id = %s", [accounts[3]]))
    committed += 1
    current = sync(spark, capture, cdc)
    assert table_rows(spark, current) == database_rows(cdc, capture)
    history = spark.read.format("delta").load(capture.storage.cdc_path(capture.cdc.topic_for("public.accounts"),
                                                                       "history"))
    assert history.filter(history.account_id.isin(accounts)).count() == committed
    bronze = spark.read.format("delta").load(capture.storage.bronze_path(capture.cdc.topic_for("public.accounts")))
    # Exactly-once delivery: not even bronze, which keeps every change event it reads, has a repeat.
    assert bronze.filter(bronze.account_id.isin(accounts)).count() == committed


def test_a_training_spine_row_between_two_changes_gets_the_value_valid_at_its_time(spark, cdc, capture, tmp_path):
    run = uuid.uuid4().hex[:6]
    account, other = f"acct-pit-{run}", f"acct-pit-{run}-never"
    moments = []

    def now_between_commits():
        time.sleep(0.2)
        moments.append(datetime.now(timezone.utc))
        time.sleep(0.2)

    now_between_commits()  # before the account exists
    write(cdc, capture, ("insert into accounts (account_id, status, credit_limit, home_country) "
                         "values (%s, 'active', 100, 'DE')", [account]))
    now_between_commits()
    write(cdc, capture, ("update accounts set credit_limit = 250, status = 'review' where account_id = %s", [account]))
    now_between_commits()
    write(cdc, capture, ("delete from accounts where account_id = %s", [account]))
    now_between_commits()
    sync(spark, capture, cdc)
    spine_rows = [(f"e{i}", account, moment) for i, moment in enumerate(moments)]
    spine_rows.append(("e-other", other, moments[1]))
    spine_path = str(tmp_path / "spine")
    spark.createDataFrame(spine_rows, "example string, account_id string, event_time timestamp").write.parquet(spine_path)
    request = TrainingSetRequest(name=f"pit_{run}", spine=SpineSpec("files", path=spine_path),
                                 views=(view_request(capture.views["account_profile"], ["status", "credit_limit"]),))
    result = build_training_set(spark, capture, request)
    got = {r.example: (r.account_profile__status, r.account_profile__credit_limit)
           for r in spark.read.format("delta").load(result.path).collect()}
    assert got == {"e0": (None, None), "e1": ("active", 100.0), "e2": ("review", 250.0), "e3": (None, None),
                   "e-other": (None, None)}


def test_the_online_store_serves_an_accounts_current_row_to_scoring_and_to_readers(spark, cdc, capture):
    run = uuid.uuid4().hex[:6]
    account, gone = f"acct-online-{run}", f"acct-online-{run}-gone"
    insert = "insert into accounts (account_id, status, credit_limit, home_country) values (%s, 'active', %s, 'SE')"
    write(cdc, capture, (insert, [account, 300]), (insert, [gone, 10]),
          ("update accounts set credit_limit = 320 where account_id = %s", [account]),
          ("delete from accounts where account_id = %s", [gone]))
    sync(spark, capture, cdc)
    client = redis_client(capture.redis)
    served = get_online_features(capture, "account_profile", [account, gone], client=client)
    assert [(r["entity"], r["status"], r["credit_limit"], r["home_country"]) for r in served] == [
        (account, "active", 320.0, "SE"), (gone, None, None, None)]
    assert served[0]["event_time"] is not None and served[1]["event_time"] is None
    names = ["amount_usd", "account_profile__credit_limit", "account_profile__home_country"]
    servable = servable_features(capture, capture.ingest.topics[0])
    reader = FeatureReader(client, capture, capture.ingest.topics[0], servable, names)
    events = [ScoredEvent(f"tx-{n}", 0, 0, 0, n, {"account_id": a, "amount_usd": 5.0})
              for n, a in enumerate([account, gone])]
    vectors = reader.vectors(events, {}, datetime.now(timezone.utc))
    assert [v.values for v in vectors] == [
        {"amount_usd": 5.0, "account_profile__credit_limit": 320.0, "account_profile__home_country": "SE"},
        {"amount_usd": 5.0, "account_profile__credit_limit": None, "account_profile__home_country": None}]


def all_rows(spark, path) -> list[tuple]:
    frame = spark.read.format("delta").load(path)
    return sorted((tuple(row) for row in frame.select(*sorted(frame.columns)).collect()), key=repr)


def test_the_tables_rebuilt_from_bronze_or_from_the_history_equal_the_live_ones(spark, cdc, capture):
    # After every test above (snapshot, updates, deletes, an added column, a killed worker, a
    # restarted database): all of it is in the tables. (The re-snapshot test, last, damages them.)
    write(cdc, capture, ("update accounts set credit_limit = credit_limit + 7 where account_id in "
                         "(select account_id from accounts order by account_id limit 5)", []))
    current = sync(spark, capture, cdc)
    topic = capture.cdc.topic_for("public.accounts")
    history = capture.storage.cdc_path(topic, "history")
    live_current, live_history = all_rows(spark, current), all_rows(spark, history)
    assert len(live_history) > len(live_current) > 10
    counts = rebuild_tables(spark, capture, topic, "bronze")
    assert counts == {current: len(live_current), history: len(live_history)}
    assert all_rows(spark, current) == live_current
    assert all_rows(spark, history) == live_history
    rebuild_tables(spark, capture, topic, "history")
    assert all_rows(spark, current) == live_current
    assert table_rows(spark, current) == database_rows(cdc, capture)
    # fp-cdc goes on over the rebuilt tables.
    write(cdc, capture, ("update accounts set status = 'frozen' where account_id in "
                         "(select account_id from accounts order by account_id limit 2)", []))
    assert table_rows(spark, sync(spark, capture, cdc)) == database_rows(cdc, capture)


def test_a_resnapshot_of_the_table_restores_a_lost_row_and_adds_no_history_for_unchanged_ones(spark, cdc, capture):
    # Last in the module: it deletes a row from the tables by hand (bronze keeps it).
    run = uuid.uuid4().hex[:6]
    lost, changed = f"acct-snap-{run}-lost", f"acct-snap-{run}-changed"
    insert = "insert into accounts (account_id, status, credit_limit, home_country) values (%s, 'active', %s, 'NO')"
    write(cdc, capture, (insert, [lost, 10]), (insert, [changed, 20]))
    current = sync(spark, capture, cdc)
    topic = capture.cdc.topic_for("public.accounts")
    history, bronze = capture.storage.cdc_path(topic, "history"), capture.storage.bronze_path(topic)
    # An operator's mistake: one account's rows deleted from both tables and from Redis.
    for path in (current, history):
        spark.sql(f"DELETE FROM delta.`{path}` WHERE account_id = '{lost}'")
    client = redis_client(capture.redis)
    client.delete(attribute_key(capture.redis.namespace, "accounts", lost))
    write(cdc, capture, ("update accounts set credit_limit = 21 where account_id = %s", [changed]))
    sync(spark, capture, cdc)
    # The rows the history holds as the database has them (no column the table has since lost).
    held = spark.read.format("delta").load(history).filter("valid_to is null and not cdc_deleted")
    extra = [c for c in held.columns if c.startswith("tier_")]
    unchanged = {(r.account_id, r.status, r.credit_limit, r.home_country, r.updated_at.replace(tzinfo=timezone.utc))
                 for r in held.collect() if all(r[c] is None for c in extra)} & set(database_rows(cdc, capture))
    last_lsn = spark.read.format("delta").load(bronze).agg({"cdc_lsn": "max"}).first()[0]
    cdc.request_snapshot(capture.cdc, ["public.accounts"])
    sync(spark, capture, cdc)
    database = database_rows(cdc, capture)
    assert table_rows(spark, current) == database
    assert redis_rows(capture, [row[0] for row in database]) == database
    # Bronze keeps every read: each row of the table (a marker row may be written meanwhile).
    read = {r.account_id for r in spark.read.format("delta").load(bronze)
            .filter(f"cdc_op = 'r' and cdc_lsn > {last_lsn}").collect()}
    assert {row[0] for row in database if not row[0].startswith("marker-")} <= read <= {row[0] for row in database}
    # The history gains the restored row, and none for a row it held unchanged.
    frame = spark.read.format("delta").load(history)
    new_reads = {r.account_id for r in frame.filter(f"cdc_op = 'r' and cdc_lsn > {last_lsn}").collect()}
    assert lost in new_reads and not new_reads & {row[0] for row in unchanged}
    assert len(unchanged) > 10
    assert [(r.cdc_op, r.credit_limit, r.valid_to) for r in frame.filter(f"account_id = '{lost}'").collect()] == [
        ("r", 10.0, None)]
    assert [r.credit_limit for r in frame.filter(f"account_id = '{changed}'").orderBy("cdc_lsn").collect()] == [20.0, 21.0]
    # No key has two rows in force at once (a read that saw a concurrent change gave way to it).
    overlaps = frame.alias("a").join(frame.alias("b"), "account_id").filter(
        "a.cdc_lsn < b.cdc_lsn and (a.valid_to is null or a.valid_to > b.valid_from)")
    assert overlaps.count() == 0
