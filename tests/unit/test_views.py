"""Feature views in conf: loaded, named predictably, and rejected with clear errors."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
import yaml

from pipelines.core.cli import views_from_args
from pipelines.core.config import build
from pipelines.core.contract_spec import load_contracts, parse_contract
from pipelines.core.errors import ConfigError
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.core.view_spec import FeatureView, check_view, event_time_column, load_views
from tests.support import contract_conf

CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")
BASE = {"name": "v", "source": {"contract": "transactions"}, "entity": "account_id", "event_time": "event_time",
        "kind": "trailing", "aggregations": [{"column": "amount_usd", "functions": ["sum"], "windows": ["1h"]}]}


def checked(**changes) -> FeatureView:
    view = build(FeatureView, {**BASE, **changes}, "test")
    check_view(view, CONTRACTS, "test")
    return view


def test_the_shipped_views_load():
    views = load_settings("local").views
    assert set(views) == {"account_velocity", "account_fraud_history", "merchant_hourly", "account_sessions",
                          "account_profile"}
    assert views["account_fraud_history"].max_lookback == timedelta(days=33)


def test_output_names_are_derived_and_can_be_overridden():
    view = checked(aggregations=[
        {"column": "*", "functions": ["count"], "windows": ["1h", "1d"]},
        {"column": "amount_usd", "functions": ["sum", "max"], "windows": ["30m"], "names": {"max_amount_usd_30m": "biggest_30m"}},
    ])
    assert [name for name, *_ in view.outputs()] == ["count_1h", "count_1d", "sum_amount_usd_30m", "biggest_30m"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"entity": "acct"}, r"test\.entity: no column 'acct' in the source"),
        ({"event_time": "amount_usd"}, r"test\.event_time: 'amount_usd' is not a timestamp"),
        ({"kind": "hopping"}, r"test\.kind: 'hopping' is not one of trailing, sliding, session"),
        ({"aggregations": [{"column": "amount_usd", "functions": ["median"], "windows": ["1h"]}]},
         r"test\.aggregations\[0\]\.functions: 'median' is not one of"),
        ({"aggregations": [{"column": "merchant_id", "functions": ["sum"], "windows": ["1h"]}]},
         r"test\.aggregations\[0\]: sum needs a numeric column, 'merchant_id' is string"),
        ({"aggregations": [{"column": "amount_usd", "functions": ["sum"], "windows": ["an hour"]}]},
         r"test\.aggregations\[0\]\.windows\[0\]: 'an hour' is not a duration"),
        ({"aggregations": [{"column": "amount_usd", "functions": ["sum"]}]},
         r"test\.aggregations\[0\]\.windows: a trailing view needs windows"),
        ({"source": {"contract": "payments"}}, r"test\.source\.contract: no contract 'payments'"),
        ({"kind": "sliding", "aggregations": [{"column": "*", "functions": ["count"]}]},
         r"test\.window: a sliding view needs a positive window"),
        ({"kind": "session", "aggregations": []}, r"test\.gap: a session view needs a positive gap"),
        ({"aggregations": [{"column": "amount_usd", "functions": ["sum", "sum"], "windows": ["1h"]}]},
         r"output name 'sum_amount_usd_1h' is used twice"),
        ({"windw": "1h"}, r"test\.windw: unknown key"),
        ({"max_events_per_entity": 0}, r"test\.max_events_per_entity: must be positive"),
    ],
    ids=["unknown-entity", "event-time-not-timestamp", "unknown-kind", "unknown-function", "sum-of-string",
         "bad-duration", "trailing-without-windows", "unknown-contract",
         "sliding-without-window", "session-without-gap", "duplicate-output", "unknown-key",
         "state-bound-zero"],
)
def test_bad_views_fail_naming_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        checked(**changes)


CLICKS = parse_contract({
    "name": "clicks", "version": 1, "key_field": "user", "id_field": "id", "event_time_field": "at",
    "fields": [{"name": "id", "type": "string"}, {"name": "user", "type": "string"}, {"name": "at", "type": "timestamp"},
               {"name": "n", "type": "long"}, {"name": "score", "type": "double"}, {"name": "bot", "type": "boolean"}]},
    "clicks.yaml")


def clicks_view(column: str, functions: list[str]) -> None:
    spec = {"name": "v", "source": {"contract": "clicks"}, "entity": "user", "event_time": "at", "kind": "trailing",
            "aggregations": [{"column": column, "functions": functions, "windows": ["1h"]}]}
    check_view(build(FeatureView, spec, "test"), {"clicks": CLICKS}, "test")


@pytest.mark.parametrize("column, functions", [("n", ["sum", "avg", "min", "max"]), ("score", ["sum", "last"]),
                                               ("bot", ["min", "max", "last"]), ("at", ["min", "last", "count"]),
                                               ("user", ["max", "approx_count_distinct"])])
def test_each_field_type_allows_the_functions_spark_can_compute(column, functions):
    clicks_view(column, functions)


@pytest.mark.parametrize("column, function, message", [
    ("bot", "sum", r"sum needs a numeric column, 'bot' is boolean"),
    ("at", "avg", r"avg needs a numeric column, 'at' is timestamp"),
    ("user", "sum", r"sum needs a numeric column, 'user' is string"),
])
def test_a_function_the_field_type_cannot_take_is_refused_naming_its_spark_type(column, function, message):
    with pytest.raises(ConfigError, match=rf"test\.aggregations\[0\]: {message}"):
        clicks_view(column, [function])


def test_a_path_source_fails_when_the_config_loads_naming_the_key(tmp_path):
    conf = contract_conf(tmp_path / "conf", transactions_format="json")
    views = conf / "features" / "payments.yaml"
    data = yaml.safe_load(views.read_text())
    data["views"][0]["source"] = {"path": "/data/history", "format": "parquet", "schema": "account_id string"}
    views.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"payments\.yaml: views\[0\]\.source\.path: path sources are not supported"):
        load_settings("local", conf)


def test_a_view_whose_contract_no_ingested_topic_carries_fails_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"view 'account_fraud_history' reads contract 'labels', which no topic of "
                                          r"ingest\.topics carries \(transactions\)"):
        load_settings("local", overrides={"ingest": {"topics": ["transactions"]}})


PROFILE = {"name": "p", "source": {"contract": "accounts"}, "entity": "account_id", "kind": "attributes"}


def test_an_attributes_view_serves_every_column_but_the_key_unless_it_names_some(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"views": [PROFILE, {**PROFILE, "name": "q",
                                                                          "attributes": ["status"]}]}))
    views = load_views(tmp_path, CONTRACTS)
    assert views["p"].attributes == ("status", "credit_limit", "home_country", "updated_at")
    assert views["q"].attributes == ("status",)
    assert event_time_column(views["p"]) == "valid_from"
    assert not views["p"].computed
    # A row holds until the table changes it: no age limit unless the view sets one.
    assert views["p"].training_max_age > timedelta(days=365 * 50)
    assert load_settings("local").views["account_profile"].attributes == ("status", "credit_limit", "home_country")


@pytest.mark.parametrize("changes, message", [
    ({"source": {"contract": "transactions"}}, "test.source.contract: an attributes view reads a table's changes"),
    ({"entity": "status"}, "test.entity: an attributes view's entity is its table's key 'account_id'"),
    ({"event_time": "updated_at"}, "test.event_time: an attributes view takes none"),
    ({"aggregations": [{"column": "credit_limit", "functions": ["max"]}]}, "test.aggregations: an attributes view"),
    ({"attributes": ["account_id"]}, "test.attributes: no column 'account_id' in accounts besides its key"),
    ({"attributes": ["tier"]}, "test.attributes: no column 'tier'"),
    ({"attributes": ["status", "status"]}, "test.attributes: a column is listed twice"),
    ({"max_age": "30d"}, "test.max_age: an attributes view takes none"),
])
def test_a_bad_attributes_view_fails_naming_the_key(changes, message):
    view = build(FeatureView, {**PROFILE, **changes}, "test")
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_view(view, CONTRACTS, "test")


def test_a_computed_view_takes_no_attributes_and_needs_an_event_time():
    with pytest.raises(ConfigError, match=re.escape("test.attributes: only attributes views take attributes")):
        checked(attributes=["amount_usd"])
    with pytest.raises(ConfigError, match=re.escape("test.event_time: a trailing view needs its source's event-time")):
        checked(event_time="")


def test_the_feature_jobs_take_every_computed_view_and_refuse_an_attributes_view():
    settings = load_settings("local")
    assert [v.name for v in views_from_args(None, settings)] == list(settings.computed_views)
    assert "account_profile" not in settings.computed_views
    with pytest.raises(ConfigError, match="--views: account_profile: attributes views are kept by fp-cdc"):
        views_from_args("account_velocity,account_profile", settings)


def test_an_attributes_view_whose_contract_no_cdc_table_has_fails_when_the_config_loads():
    with pytest.raises(ConfigError, match="view 'account_profile' reads the changes of contract 'accounts'"):
        load_settings("local", overrides={"cdc": {"tables": []}})
