"""The scoring job's pieces that need no service: its settings, the check of a model's inputs
against what the platform serves, and the latency objective."""

from __future__ import annotations

import json
import logging

import pytest

from pipelines.core.errors import ConfigError
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.scoring.features import servable_features
from pipelines.scoring.model import ModelInput, ModelRef, ServingModel, check_inputs, deployment_key, parse_model_uri
from pipelines.scoring.sinks import check_parsed, prediction_rows
from pipelines.scoring.stream import ScoringMetrics, iso

CONF = PROJECT_ROOT / "conf"


@pytest.fixture(scope="module")
def servable():
    settings = load_settings("local", CONF)
    return servable_features(settings, "transactions")


def test_the_scored_topic_must_be_declared():
    with pytest.raises(ConfigError, match=r"scoring\.topic: 'payments' is not declared under kafka\.topics"):
        load_settings("local", CONF, {"scoring": {"topic": "payments"}})


def test_the_predictions_topic_may_not_be_a_source_topic():
    with pytest.raises(ConfigError, match=r"scoring\.predictions_topic: 'labels' is a declared topic"):
        load_settings("local", CONF, {"scoring": {"predictions_topic": "labels"}})


def test_servable_features_are_the_event_fields_and_the_views_keyed_by_one_of_them(servable):
    assert servable["amount_usd"].type == "double" and servable["amount_usd"].view is None
    assert "transaction_id" not in servable and "event_time" not in servable  # identity, not inputs
    assert servable["account_velocity__count_1h"].type == "bigint"
    assert servable["account_velocity__approx_count_distinct_merchant_id_1d"].type == "bigint"
    assert servable["account_fraud_history__any_fraud_30d"].type == "boolean"
    assert servable["merchant_hourly__avg_amount_usd"].type == "double"
    assert servable["account_sessions__event_count"].type == "bigint"
    assert servable["account_sessions__duration_seconds"].type == "double"
    # The account's row in the accounts table (fp-cdc), by the transaction's account_id.
    assert (servable["account_profile__credit_limit"].type, servable["account_profile__credit_limit"].view) == (
        "double", "account_profile")
    assert servable["account_profile__status"].type == "string"
    assert "account_profile__updated_at" not in servable  # not among the view's attributes


def test_an_input_no_feature_serves_is_refused_naming_it_and_the_close_names(servable):
    inputs = [ModelInput("amount_usd", "double", True), ModelInput("count_1h", "double", True)]
    with pytest.raises(ConfigError, match=r"input 'count_1h' is no feature the job serves \(did you mean "
                                          r"account_velocity__count_1h\?\)"):
        check_inputs("models:/m/1", inputs, servable)


def test_an_input_of_a_type_the_feature_cannot_fill_is_refused(servable):
    with pytest.raises(ConfigError, match=r"input 'merchant_id' is double, but the feature is string"):
        check_inputs("models:/m/1", [ModelInput("merchant_id", "double", True)], servable)


def test_integer_and_boolean_features_widen_to_double_inputs(servable):
    check_inputs("models:/m/1", [ModelInput("account_velocity__count_1h", "double", True),
                                 ModelInput("account_fraud_history__any_fraud_30d", "double", True)], servable)
    with pytest.raises(ConfigError, match=r"input 'amount_usd' is long, but the feature is double"):
        check_inputs("models:/m/1", [ModelInput("amount_usd", "long", True)], servable)


def test_an_integer_or_boolean_input_fed_by_a_feature_that_can_be_missing_is_refused(servable):
    # An account without a row has no count: a long column with a null fails every batch.
    with pytest.raises(ConfigError, match=r"input 'account_velocity__count_1d' is long, but the feature can be "
                                          r"missing.*input 'account_fraud_history__any_fraud_30d' is boolean"):
        check_inputs("models:/m/1", [ModelInput("account_velocity__count_1d", "long", True),
                                     ModelInput("account_fraud_history__any_fraud_30d", "boolean", True)], servable)


@pytest.mark.parametrize("uri, parsed", [
    ("models:/fraud@champion", ("fraud", None, "champion")),
    ("models:/fraud/3", ("fraud", "3", None)),
    ("runs:/abc/model", (None, None, None)),
])
def test_model_uris_name_a_version_or_an_alias(uri, parsed):
    assert parse_model_uri(uri) == parsed


@pytest.mark.parametrize("uri, key", [
    ("models:/fraud@champion", "fraud@champion"),
    ("models:/fraud@challenger", "fraud@challenger"),
    ("models:/fraud/3", "fraud.v3"),
    ("runs:/0a1b/model", "runs__0a1b_model"),
])
def test_each_deployment_of_a_model_has_a_key_of_its_own(uri, key):
    assert deployment_key(uri) == key


def test_a_registered_model_uri_without_version_or_alias_is_refused():
    with pytest.raises(ConfigError, match=r"names no version or alias"):
        parse_model_uri("models:/fraud")


@pytest.mark.parametrize("micros, text", [
    (1_733_270_400_000_000, "2024-12-04T00:00:00Z"),  # a whole second: no fraction, as isoformat
    (1_733_270_400_000_001, "2024-12-04T00:00:00.000001Z"),
    (1_733_270_459_999_999, "2024-12-04T00:00:59.999999Z"),
    (1_733_270_460_500_000, "2024-12-04T00:01:00.500000Z"),
    (-1, "1969-12-31T23:59:59.999999Z"),  # before the epoch: the second below, not a negative fraction
])
def test_prediction_times_are_iso_text_in_utc_with_microseconds_unless_whole(micros, text):
    assert iso(micros) == text
    assert iso(micros) == text  # the second's text comes from the cache the second time


def test_an_interval_whose_p99_is_over_the_objective_is_logged_as_an_error_and_flagged(caplog):
    model = ServingModel(ModelRef("models:/fraud@champion", "fraud", "2", "champion"), [], None)
    metrics = ScoringMetrics(interval=0.0, slo_p99_s=2.0)
    metrics.record([0.1] * 98 + [2.5, 3.0], duplicates=1, wait_s=0.0)
    with caplog.at_level(logging.INFO, logger="pipelines.scoring.stream"):
        row = metrics.flush(model)
    assert row["slo_breached"] and row["p99_s"] == 2.5 and row["p50_s"] == 0.1
    assert row["scored"] == 100 and row["duplicates"] == 1
    [record] = [r for r in caplog.records if "OVER THE LATENCY OBJECTIVE" in r.getMessage()]
    assert record.levelno == logging.ERROR
    metrics.record([0.1] * 100, duplicates=0, wait_s=0.0)
    assert not metrics.flush(model)["slo_breached"]


def prediction_record(spark, value: str, offset: int):
    return spark.createDataFrame([(value.encode(), 0, offset)], "value binary, partition int, offset long")


def test_prediction_rows_keep_the_deployments_own_and_type_them(spark):
    contract = load_settings("local", CONF).contracts["predictions"]
    base = {"event_id": "e1", "entity": "a1", "score": 0.25, "model_name": "fraud", "model_version": "2",
            "deployment": "models:/fraud@champion", "event_time": "2026-12-01T23:59:59.5Z", "append_time": "2026-12-02T00:00:00Z",
            "features_ready_time": "2026-12-02T00:00:00.1Z", "scored_time": "2026-12-02T00:00:00.2Z",
            "latency_ms": 700.0, "view_times": "{}", "features": "{\"amount_usd\":3.0}"}
    records = prediction_record(spark, json.dumps(base), 7).union(
        prediction_record(spark, json.dumps({**base, "event_id": "e2", "deployment": "models:/fraud@challenger"}), 8))
    [row] = prediction_rows(records, contract, "models:/fraud@champion").collect()
    assert (row["event_id"], row["score"], row["kafka_offset"]) == ("e1", 0.25, 7)
    assert str(row["event_date"]) == "2026-12-01"  # the event's UTC day


def test_a_prediction_record_that_does_not_parse_stops_the_table_naming_its_offset(spark):
    contract = load_settings("local", CONF).contracts["predictions"]
    rows = prediction_rows(prediction_record(spark, '{"event_id": "e1", "score": "high"', 42), contract,
                           "models:/fraud@champion")
    with pytest.raises(ValueError, match=r"partition 0 offset 42 does not parse"):
        check_parsed(rows)
