"""fp-skew on the real path: generator -> Kafka -> bronze and fp-live (Redis) ->
fp-score (the served vectors, predictions/<model>) -> fp-skew. An in-order stream shows no
skew at all; with out-of-order and late events, the rows that differ are exactly those an
independent reference in plain Python says the live path served differently from the
point-in-time build.

The reference (:func:`expected_features`) replays the generated records in arrival order: one
account's events share a Kafka partition, so they reach the live path in the order generated.
For each valid event of an entity, first delivery only (a duplicate is dropped by id):

* served: the entity's events arrived so far (this one included) inside the windows ending at the
  event's own time, or, for an event at or before the entity's latest time so far (out of order,
  or late), at that latest time (the live path serves it its entity's features as they stand,
  with it counted);
* corrected: every valid event of the entity inside the windows ending at the event's time.

The live path steps each entity's windows through a batch's events in time order, so within one
batch an event that arrived behind a later one of its entity is served its own row: the rule
above is per arrival, and the disorder test runs fp-live with batches of one event
(``live.max_batch_events=1``) to hold the reference to it exactly.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any

import mlflow
import pytest

from jobs import skew as skew_job
from pipelines.batch.backfill import DayRange, backfill
from pipelines.batch.sources import BronzeSnapshot
from pipelines.contracts.validation import ValidationRules
from pipelines.features.live_stream import run_live
from pipelines.ingest.bronze import bronze_rows, check_records, drop_duplicate_events
from pipelines.local.generator import DUPLICATE, VALID_KINDS, GeneratorSpec, Record, generate, produce
from pipelines.online.store import redis_client
from pipelines.scoring.skew_report import CSV_ARTIFACT, PLOT_ARTIFACT, skew_path, skew_rows_path
from pipelines.scoring.stream import run_scoring
from tests.integration.test_score import same, scoring_settings
from tests.models import INPUTS, register_model
from tests.support import topic_names

#: The test model's inputs: test_score's, and a mean and a latest value.
SKEW_INPUTS = [*INPUTS, "account_velocity__avg_amount_usd_1h", "account_velocity__last_balance_usd_1d"]
HOUR, DAY = 3_600_000_000, 86_400_000_000


@pytest.fixture
def tracking(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def micros_of(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (moment - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def velocity(events: list[dict[str, Any]], end: int) -> dict[str, Any]:
    """account_velocity's features (those of :data:`SKEW_INPUTS`) over ``events`` for windows
    ending at ``end`` (µs): ``(end - w, end]``."""
    hour = [e for e in events if end - HOUR < e["t"] <= end]
    day = [e for e in events if end - DAY < e["t"] <= end]
    amounts = [e["amount_usd"] for e in hour]
    latest = max(((e["t"], e["balance_usd"]) for e in day), default=None)  # ties: the greatest value
    return {
        "account_velocity__count_1h": len(hour),
        "account_velocity__sum_amount_usd_1h": math.fsum(amounts),
        "account_velocity__avg_amount_usd_1h": math.fsum(amounts) / len(amounts) if amounts else None,
        "account_velocity__max_amount_usd_1d": max((e["amount_usd"] for e in day), default=None),
        "account_velocity__approx_count_distinct_merchant_id_1d": len({e["merchant_id"] for e in day}),
        "account_velocity__last_balance_usd_1d": None if latest is None else latest[1],
    }


def fraud_history(labels: list[int], at: int) -> int | None:
    """account_fraud_history__count_30d as of ``at``: the row of the entity's latest label at or
    before it within max_age (30d; none: None), which counts labels in (L - 3d - 30d, L - 3d]."""
    known = [t for t in labels if at - 30 * DAY <= t <= at]
    if not known:
        return None
    latest = max(known)
    return sum(1 for t in labels if latest - 33 * DAY < t <= latest - 3 * DAY)


def expected_features(records: list[Record]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(served, corrected): each valid transaction's vector by event id, by the rules of the
    module docstring."""
    seen: set[tuple[str, str]] = set()  # (topic, id): a label carries its transaction's id
    arrived: dict[str, list[dict[str, Any]]] = defaultdict(list)
    labels: dict[str, list[int]] = defaultdict(list)
    served: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.kind not in (*VALID_KINDS, DUPLICATE) or (record.topic, record.event_id) in seen:
            continue
        seen.add((record.topic, record.event_id))
        event = json.loads(record.value)
        if record.topic == "labels":
            labels[event["account_id"]].append(micros_of(event["label_time"]))
            continue
        event["t"] = micros_of(event["event_time"])
        history = arrived[event["account_id"]]
        latest = max((e["t"] for e in history), default=None)
        history.append(event)
        served[record.event_id] = {"amount_usd": event["amount_usd"], **velocity(history, max(event["t"], latest or 0))}
    corrected = {}
    for account, events in arrived.items():
        for event in events:
            corrected[event["transaction_id"]] = {"amount_usd": event["amount_usd"], **velocity(events, event["t"])}
    # Labels come in label-time order (the generator sends each when the stream's clock passes
    # it) and the scorer runs after fp-live applied them all: the served labels row is the
    # corrected one.
    for account, events in arrived.items():
        for event in events:
            count = fraud_history(labels[account], event["t"])
            for vector in (served, corrected):
                vector[event["transaction_id"]]["account_fraud_history__count_30d"] = count
    return served, corrected


def write_bronze(spark, settings) -> None:
    """Bronze as the ingest writes it (its checks, its duplicate filter, its rows, partitioned by
    event date) from everything Kafka holds, in one static batch: the streaming ingest would take
    some 40 s here and adds nothing this test looks at."""
    rules = ValidationRules.of(settings.ingest)
    for topic in settings.ingest.topics:
        reader = spark.read.format("kafka").option("subscribe", topic).option("startingOffsets", "earliest")
        for key, value in settings.kafka.spark_options().items():
            reader = reader.option(key, value)
        contract = settings.contract_for(topic)
        rows = bronze_rows(drop_duplicate_events(check_records(reader.load(), contract, rules), contract, rules), contract)
        rows.write.format("delta").partitionBy("event_date").save(settings.storage.bronze_path(topic))


def run_platform(spark, settings, tracking: str, tmp_path, spec: GeneratorSpec, name: str) -> list[Record]:
    """generate -> produce -> bronze, fp-live -> fp-score, all to the end of what was sent."""
    records = list(generate(spec))
    produce(iter(records), settings.kafka.client_properties(), topic_names=topic_names(settings))
    write_bronze(spark, settings)
    assert run_live(spark, settings, [settings.views["account_velocity"], settings.views["account_fraud_history"]],
                    available_now=True) == 0
    register_model(tracking, tmp_path / "artifacts", name, SKEW_INPUTS, seed=11)
    assert run_scoring(settings, redis_client(settings.redis), tracking, f"models:/{name}@champion", until_end=True,
                       spark=spark) == 0
    return records


def event_times(spec: GeneratorSpec) -> tuple[datetime, datetime]:
    """A range holding every generated event time, late ones included."""
    return spec.end - spec.span - spec.late_by[1] - timedelta(minutes=1), spec.end + timedelta(minutes=1)


def run_skew_job(isolated, settings, tracking: str, tmp_path, name: str, spec: GeneratorSpec, capsys,
                 *extra: str) -> str:
    """fp-skew over :func:`event_times`; returns its stdout."""
    start, end = event_times(spec)
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    capsys.readouterr()
    assert skew_job.main(["--env", "local", "--conf-dir", str(conf_dir), "--set", f"scoring.topic={settings.scoring.topic}",
                          "--model", name, "--from", start.isoformat(), "--to", end.isoformat(),
                          "--tracking-uri", tracking, *extra]) == 0
    return capsys.readouterr().out


def summary(spark, settings, name: str) -> dict[str, dict[str, Any]]:
    return {r["feature"]: r.asDict() for r in spark.read.format("delta").load(skew_path(settings, name)).collect()}


def test_an_in_order_stream_shows_no_skew_in_any_feature(spark, isolated, tracking, tmp_path, capsys):
    settings = scoring_settings(isolated)
    name = f"fraud_{uuid.uuid4().hex[:6]}"
    # In order, with duplicates and bad records.
    spec = GeneratorSpec(count=300, accounts=20, merchants=8, seed=91, label_rate=0.4, out_of_order_rate=0.0,
                         late_rate=0.0, duplicate_rate=0.03, bad_rate=0.03,
                         end=datetime.now(timezone.utc) - timedelta(hours=1), span=timedelta(hours=3))
    records = run_platform(spark, settings, tracking, tmp_path, spec, name)
    valid = {r.event_id for r in records if r.topic == "transactions" and r.kind in VALID_KINDS}
    assert any(r.kind == DUPLICATE and r.topic == "transactions" for r in records)
    out = run_skew_job(isolated, settings, tracking, tmp_path, name, spec, capsys)

    rows = summary(spark, settings, name)
    assert set(rows) == set(SKEW_INPUTS)
    assert {f: (r["rows"], r["differing"], r["rows_without_corrected"]) for f, r in rows.items()} == {
        f: (len(valid), 0, 0) for f in SKEW_INPUTS}
    assert spark.read.format("delta").load(skew_rows_path(settings, name)).count() == 0
    assert "account_velocity__count_1h" in out and "0.00%" in out
    # The MLflow run: the range, a share per feature, the plot and the CSV.
    (run,) = mlflow.MlflowClient(tracking).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking).search_experiments()], "tags.model = '" + name + "'")
    assert run.data.metrics["share_differing.account_velocity__count_1h"] == 0.0
    assert {"range_start", "range_end", "model"} <= set(run.data.params)
    assert {a.path for a in mlflow.MlflowClient(tracking).list_artifacts(run.info.run_id)} == {PLOT_ARTIFACT, CSV_ARTIFACT}

    # The feature tables, once a backfill of bronze wrote them, give the same answer; the rerun
    # of the range replaces its rows.
    start, end = event_times(spec)
    backfill(spark, settings, [settings.views["account_velocity"], settings.views["account_fraud_history"]],
             [DayRange(start.date(), end.date() + timedelta(days=1))], BronzeSnapshot())
    run_skew_job(isolated, settings, tracking, tmp_path / "features", name, spec, capsys, "--corrected-from", "features")
    table = spark.read.format("delta").load(skew_path(settings, name)).collect()
    assert sorted((r["feature"], r["rows"], r["differing"], r["corrected_from"]) for r in table) == sorted(
        (f, len(valid), 0, "features") for f in SKEW_INPUTS)


def test_out_of_order_and_late_events_show_exactly_the_skew_the_arrival_order_implies(spark, isolated, tracking,
                                                                                      tmp_path, capsys):
    settings = scoring_settings(isolated, max_batch_events=1)
    name = f"fraud_{uuid.uuid4().hex[:6]}"
    spec = GeneratorSpec(count=400, accounts=20, merchants=8, seed=92, label_rate=0.3, out_of_order_rate=0.15,
                         late_rate=0.05, duplicate_rate=0.03, bad_rate=0.03,
                         end=datetime.now(timezone.utc) - timedelta(hours=1), span=timedelta(hours=2))
    records = run_platform(spark, settings, tracking, tmp_path, spec, name)
    kinds = {r.event_id: r.kind for r in records if r.topic == "transactions" and r.kind in VALID_KINDS}
    served, corrected = expected_features(records)
    assert set(served) == set(kinds)
    expected = {f: {i for i in kinds if not same(served[i][f], corrected[i][f])} for f in SKEW_INPUTS}
    # Skew where the reference says, and on more than the disordered events themselves: events
    # served before a late one of their entity arrived lack it.
    assert expected["account_velocity__count_1h"]
    assert any(kinds[i] == "valid" for i in expected["account_velocity__count_1h"])
    assert expected["amount_usd"] == set() and expected["account_fraud_history__count_30d"] == set()

    out = run_skew_job(isolated, settings, tracking, tmp_path, name, spec, capsys)
    differing = spark.read.format("delta").load(skew_rows_path(settings, name)).collect()
    found = {f: {r["event_id"] for r in differing if r["feature"] == f} for f in SKEW_INPUTS}
    assert found == expected
    rows = summary(spark, settings, name)
    assert {f: (r["rows"], r["differing"]) for f, r in rows.items()} == {f: (len(kinds), len(expected[f]))
                                                                           for f in SKEW_INPUTS}
    # The served and corrected values of the drill-down are the reference's.
    for row in differing:
        feature = row["feature"]
        for side, reference in (("served", served), ("corrected", corrected)):
            value = None if row[side] is None else float(row[side])
            assert same(value, reference[row["event_id"]][feature]), (row, reference[row["event_id"]][feature])
    count = rows["account_velocity__count_1h"]
    assert f"{count['share_differing']:.2%}" in out

    # A rerun of the range replaces its rows.
    run_skew_job(isolated, settings, tracking, tmp_path / "again", name, spec, capsys)
    assert spark.read.format("delta").load(skew_path(settings, name)).count() == len(SKEW_INPUTS)
    assert spark.read.format("delta").load(skew_rows_path(settings, name)).count() == len(differing)
