"""The contract gate against the real schema registry (Apicurio, kafkasql storage on the test
broker): register v1, refuse a renamed field (the gate and the registry itself), accept an
optional field with a default."""

from __future__ import annotations

import json
import uuid

import pytest
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry.error import SchemaRegistryError

from jobs import contracts as contracts_job
from jobs import ingest as ingest_job
from pipelines.contracts.registry import SchemaRegistry, schema_text
from pipelines.core.settings import load_settings
from tests.support import contract_conf

CHANNEL = "{name: channel, type: string, required: false}"


def run_gate(command: str, conf, topic: str, base_overrides, capsys) -> tuple[int, str]:
    argv = [command, "--conf-dir", str(conf), "--topics", topic,
            "--set", f"kafka.topics.{topic}={{contract: transactions}}",
            "--set", f"local.registry_port={base_overrides['local']['registry_port']}"]
    code = contracts_job.main(argv)
    return code, capsys.readouterr().out


@pytest.fixture
def topic(request) -> str:
    return f"gate_{uuid.uuid4().hex[:8]}"


def test_renamed_field_is_refused_and_an_optional_field_accepted(registry, base_overrides, tmp_path, topic, capsys):
    # v1: the upstream schema before the incident, with account_balance.
    v1 = contract_conf(tmp_path / "v1", renames={"balance_usd": "account_balance"}, with_views=False)
    code, out = run_gate("register", v1, topic, base_overrides, capsys)
    assert code == 0, out
    assert f"{topic}-value" in out and "registered: version 1" in out

    # v2 renames account_balance -> balance_usd: the gate refuses, naming both fields.
    renamed = contract_conf(tmp_path / "renamed")
    code, out = run_gate("check", renamed, topic, base_overrides, capsys)
    assert code == 1
    assert "INCOMPATIBLE with version 1" in out
    assert "'balance_usd' (double) is added without a default" in out
    assert "'account_balance' (double, no default in version 1) is removed" in out
    assert "the registry refuses it too" in out
    code, out = run_gate("register", renamed, topic, base_overrides, capsys)
    assert code == 1 and "registered" not in out

    # ... and so does the registry itself, to a producer that bypasses the gate.
    settings = load_settings("local", renamed, {"local": base_overrides["local"],
                                                "kafka": {"topics": {topic: {"contract": "transactions"}}}})
    client = SchemaRegistry(settings.schema_registry)
    assert client.compatibility(f"{topic}-value") == "FULL"
    with pytest.raises(SchemaRegistryError) as refused:
        client.client.register_schema(f"{topic}-value", Schema(schema_text(settings.contract_for(topic)), "AVRO"))
    assert refused.value.http_status_code == 409
    assert "account_balance" in str(refused.value) and "balance_usd" in str(refused.value)

    # v2 that adds an optional field (default null) passes and is registered as version 2.
    compatible = contract_conf(tmp_path / "compatible", renames={"balance_usd": "account_balance"},
                               add=(CHANNEL,), with_views=False)
    code, out = run_gate("check", compatible, topic, base_overrides, capsys)
    assert code == 0, out
    assert "compatible with version 1" in out and "+ channel: optional string (default null)" in out
    code, out = run_gate("register", compatible, topic, base_overrides, capsys)
    assert code == 0 and "registered: version 2" in out
    versions = client.versions(f"{topic}-value")
    assert [v.version for v in versions] == [1, 2]
    assert [f["name"] for f in json.loads(versions[1].schema)["fields"]][-1] == "channel"
    code, out = run_gate("register", compatible, topic, base_overrides, capsys)
    assert code == 0 and "unchanged, version 2" in out


def test_json_contracts_are_reported_not_checked(registry, base_overrides, tmp_path, topic, capsys):
    conf = contract_conf(tmp_path / "json", transactions_format="json")
    code, out = run_gate("check", conf, topic, base_overrides, capsys)
    assert code == 0
    assert out.strip() == f"{topic}: contract transactions is json: no registry subject, not checked"


def test_an_unreachable_registry_exits_3(base_overrides, tmp_path, topic, capsys):
    conf = contract_conf(tmp_path / "down")
    code = contracts_job.main(["check", "--conf-dir", str(conf), "--topics", topic,
                               "--set", f"kafka.topics.{topic}={{contract: transactions}}",
                               "--set", "schema_registry.url=http://127.0.0.1:9/apis/ccompat/v7"])
    assert code == 3
    assert "schema registry http://127.0.0.1:9/apis/ccompat/v7 unreachable" in capsys.readouterr().err


def test_an_ingest_of_an_unregistered_avro_contract_exits_2_naming_it(registry, spark, base_overrides, tmp_path,
                                                                      topic, capsys):
    conf = contract_conf(tmp_path / "conf", with_views=False)
    code = ingest_job.main(["--conf-dir", str(conf), "--available-now",
                            "--set", f"kafka.topics.{topic}={{contract: transactions}}",
                            "--set", f"ingest.topics=[{topic}]",
                            "--set", f"kafka.bootstrap_servers={base_overrides['kafka']['bootstrap_servers']}",
                            "--set", f"local.registry_port={base_overrides['local']['registry_port']}",
                            "--set", f"spark.jars_dir={base_overrides['spark']['jars_dir']}",
                            "--set", f"storage.root={tmp_path / 'lake'}"])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ingest: error: contract 'transactions' (format avro) is not registered under {topic}-value "
        "(0 version(s) there): run `fp-contracts register` before deploying it")
