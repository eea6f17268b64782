"""Change-data-capture configuration: contracts of format debezium and the cdc section, checked
when the settings load."""

from __future__ import annotations

import json

import pytest

from pipelines.core.contract_spec import parse_contract
from pipelines.core.errors import ConfigError
from pipelines.core.kafka_connect import debezium_postgres_config, snapshot_signal
from pipelines.core.settings import PROJECT_ROOT, load_settings

CONF = PROJECT_ROOT / "conf"
TABLE = {"name": "t", "version": 1, "format": "debezium", "key_field": "id",
         "fields": [{"name": "id", "type": "string"}, {"name": "v", "type": "double"}]}


def test_a_change_contract_has_a_key_and_no_event_id_or_time():
    contract = parse_contract(TABLE, "t.yaml")
    assert contract.is_changes and contract.id_field is None and contract.event_time_field is None
    with pytest.raises(ConfigError, match=r"t.yaml: id_field: not for format debezium \(a change is identified"):
        parse_contract({**TABLE, "id_field": "id"}, "t.yaml")
    with pytest.raises(ConfigError, match="t.yaml: key_field: 'account' is not a declared field"):
        parse_contract({**TABLE, "key_field": "account"}, "t.yaml")


def test_an_event_contract_still_needs_its_id_and_event_time():
    with pytest.raises(ConfigError, match="e.yaml: event_time_field: required for format json"):
        parse_contract({**TABLE, "format": "json", "id_field": "id"}, "e.yaml")


def test_a_change_topic_cannot_be_ingested_as_events():
    with pytest.raises(ConfigError, match=r"ingest.topics: 'cdc.public.accounts' carries change events .* fp-cdc"):
        load_settings("local", CONF, {"ingest": {"topics": ["transactions", "cdc.public.accounts"]}})


def test_each_captured_table_needs_its_change_topic_declared():
    with pytest.raises(ConfigError, match=r"cdc.tables: 'public.cards': its change topic 'cdc.public.cards' must be"):
        load_settings("local", CONF, {"cdc": {"tables": ["public.accounts", "public.cards"]}})
    with pytest.raises(ConfigError, match=r"cdc.tables: 'accounts' is not schema.table"):
        load_settings("local", CONF, {"cdc": {"tables": ["accounts"]}})


def test_the_signalling_table_is_a_table_of_its_own_and_a_snapshot_names_captured_tables():
    with pytest.raises(ConfigError, match=r"cdc.signal_table: 'public.accounts' must be a schema.table of its own"):
        load_settings("local", CONF, {"cdc": {"signal_table": "public.accounts"}})
    cdc = load_settings("local", CONF).cdc
    signal_id, kind, data = snapshot_signal(cdc, ["public.accounts"])
    assert kind == "execute-snapshot" and signal_id.startswith("snapshot-")
    assert json.loads(data) == {"data-collections": ["public.accounts"], "type": "blocking"}
    assert debezium_postgres_config(cdc)["signal.data.collection"] == "public.cdc_signal"
    with pytest.raises(ConfigError, match=r"snapshot: public.cards: not among cdc.tables"):
        snapshot_signal(cdc, ["public.cards"])
