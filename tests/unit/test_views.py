"""Feature views in conf: loaded, named predictably, and rejected with clear errors."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from pipelines.core.config import build
from pipelines.core.contract_spec import load_contracts, parse_contract
from pipelines.core.errors import ConfigError
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.core.view_spec import FeatureView, check_view
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
    assert set(views) == {"account_velocity", "account_fraud_history", "merchant_hourly", "account_sessions"}
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
