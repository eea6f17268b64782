"""Feature views in conf: loaded, named predictably, and rejected with clear errors."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pipelines.core.config import build
from pipelines.core.contract_spec import load_contracts, parse_contract
from pipelines.core.errors import ConfigError
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.core.view_spec import FeatureView, check_view, parse_schema

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
        ({"source": {"path": "/data/events"}}, r"test\.source\.schema: a path source needs its schema"),
        ({"kind": "sliding", "aggregations": [{"column": "*", "functions": ["count"]}]},
         r"test\.window: a sliding view needs a positive window"),
        ({"kind": "session", "aggregations": []}, r"test\.gap: a session view needs a positive gap"),
        ({"aggregations": [{"column": "amount_usd", "functions": ["sum", "sum"], "windows": ["1h"]}]},
         r"output name 'sum_amount_usd_1h' is used twice"),
        ({"windw": "1h"}, r"test\.windw: unknown key"),
        ({"max_events_per_entity": 0}, r"test\.max_events_per_entity: must be positive"),
    ],
    ids=["unknown-entity", "event-time-not-timestamp", "unknown-kind", "unknown-function", "sum-of-string",
         "bad-duration", "trailing-without-windows", "unknown-contract", "path-without-schema",
         "sliding-without-window", "session-without-gap", "duplicate-output", "unknown-key",
         "state-bound-zero"],
)
def test_bad_views_fail_naming_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        checked(**changes)


def test_a_path_source_is_checked_against_its_declared_schema():
    view = checked(source={"path": "/data/history", "format": "parquet",
                           "schema": "account_id string, event_time timestamp, amount_usd double"})
    assert view.source.format == "parquet"
    with pytest.raises(ConfigError, match=r"test\.aggregations\[0\]\.column: no column 'amount_usd'"):
        checked(source={"path": "/data/history", "schema": "account_id string, event_time timestamp"})


def test_declared_schemas_parse_without_spark():
    schema = parse_schema("account_id string, amount decimal(10, 2), seen_at timestamp, n long", "k")
    assert schema == [("account_id", "string"), ("amount", "decimal(10,2)"), ("seen_at", "timestamp"), ("n", "bigint")]
    with pytest.raises(ConfigError, match=r"k: column 'tags' has type 'array<string>'"):
        parse_schema("account_id string, tags array<string>", "k")


PATH_SOURCE = {"path": "/data/history", "format": "parquet",
               "schema": "account_id string, event_time timestamp, n long, price decimal(10, 2), day date, flag boolean"}


@pytest.mark.parametrize("column, functions", [("n", ["sum", "avg", "min", "max"]), ("price", ["sum", "avg"]),
                                               ("flag", ["min", "max", "last"]), ("day", ["last", "count"])])
def test_declared_column_types_allow_the_functions_spark_can_compute(column, functions):
    checked(source=PATH_SOURCE, aggregations=[{"column": column, "functions": functions, "windows": ["1h"]}])


@pytest.mark.parametrize("column, function, message", [
    ("day", "sum", r"sum needs a numeric column, 'day' is date"),
    ("flag", "avg", r"avg needs a numeric column, 'flag' is boolean"),
    ("day", "max", r"max needs a numeric, string, boolean or timestamp column, 'day' is date"),
])
def test_a_function_the_column_type_cannot_take_is_refused_naming_spark_type(column, function, message):
    with pytest.raises(ConfigError, match=rf"test\.aggregations\[0\]: {message}"):
        checked(source=PATH_SOURCE, aggregations=[{"column": column, "functions": [function], "windows": ["1h"]}])


def test_a_long_contract_field_is_numeric_and_a_boolean_one_is_not():
    contract = parse_contract({
        "name": "clicks", "version": 1, "key_field": "user", "id_field": "id", "event_time_field": "at",
        "fields": [{"name": "id", "type": "string"}, {"name": "user", "type": "string"},
                   {"name": "at", "type": "timestamp"}, {"name": "n", "type": "long"},
                   {"name": "bot", "type": "boolean"}]}, "clicks.yaml")
    spec = {"name": "v", "source": {"contract": "clicks"}, "entity": "user", "event_time": "at", "kind": "trailing"}
    check_view(build(FeatureView, {**spec, "aggregations": [{"column": "n", "functions": ["sum", "avg"], "windows": ["1h"]}]},
                     "test"), {"clicks": contract}, "test")
    with pytest.raises(ConfigError, match=r"sum needs a numeric column, 'bot' is boolean"):
        check_view(build(FeatureView, {**spec, "aggregations": [{"column": "bot", "functions": ["sum"], "windows": ["1h"]}]},
                         "test"), {"clicks": contract}, "test")
