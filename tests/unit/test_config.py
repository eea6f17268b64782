"""The config loader: every environment loads; bad config fails fast, naming key and reason."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from pipelines.core.config import parse_overrides
from pipelines.core.errors import ConfigError
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.core.times import parse_duration
from tests.support import contract_conf

CONF = PROJECT_ROOT / "conf"


@pytest.mark.parametrize("env", ["local", "dev", "prod"])
def test_every_environment_loads_with_every_contract(env):
    settings = load_settings(env, CONF)
    assert settings.env == env
    assert set(settings.contracts) == {"transactions", "labels", "predictions", "accounts"}
    assert settings.contract_for("cdc.public.accounts").is_changes
    assert settings.contract_for("transactions").id_field == "transaction_id"


def test_local_paths_resolve_against_the_project_root():
    settings = load_settings("local", CONF)
    assert settings.storage.root == str(PROJECT_ROOT / ".local" / "lake")
    assert settings.spark.jars_dir == str(PROJECT_ROOT / ".local" / "jars" / "spark")
    assert settings.storage.bronze_path("transactions") == str(PROJECT_ROOT / ".local" / "lake" / "bronze" / "transactions")


def test_cluster_environments_reuse_the_active_session_and_keep_uris():
    settings = load_settings("prod", CONF)
    assert settings.spark.master is None and settings.spark.jars_dir is None
    assert settings.storage.root == "dbfs:/feature-platform/prod"
    assert settings.kafka.topics["transactions"].partitions == 24


@pytest.mark.parametrize(
    "text, expected",
    [("30s", timedelta(seconds=30)), ("15m", timedelta(minutes=15)), ("1h", timedelta(hours=1)),
     ("7d", timedelta(days=7)), ("250ms", timedelta(milliseconds=250))],
)
def test_durations(text, expected):
    assert parse_duration(text) == expected


def test_bad_duration_names_the_key():
    with pytest.raises(ConfigError, match=r"ingest\.max_event_age: '7 days' is not a duration"):
        load_settings("local", CONF, {"ingest": {"max_event_age": "7 days"}})


def test_unknown_key_is_rejected_with_its_path():
    with pytest.raises(ConfigError, match=r"ingest\.trigger_intervall: unknown key"):
        load_settings("local", CONF, {"ingest": {"trigger_intervall": "5s"}})


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match=r"ingest\.max_offsets_per_trigger: 'many' is not an integer"):
        load_settings("local", CONF, {"ingest": {"max_offsets_per_trigger": "many"}})


def test_ingest_topic_must_be_declared():
    with pytest.raises(ConfigError, match=r"ingest\.topics: 'payments' is not declared under kafka\.topics"):
        load_settings("local", CONF, {"ingest": {"topics": ["payments"]}})


def test_topic_contract_must_exist():
    with pytest.raises(ConfigError, match=r"kafka\.topics\.transactions\.contract: no contract 'payment'"):
        load_settings("local", CONF, {"kafka": {"topics": {"transactions": {"contract": "payment"}}}})


def test_unknown_environment_is_rejected():
    with pytest.raises(ConfigError, match="'staging' is not one of local, dev, prod"):
        load_settings("staging", CONF)


def test_contract_errors_name_the_file_and_field(tmp_path: Path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    path = conf / "contracts" / "transactions.yaml"
    path.write_text(path.read_text().replace("type: double, non_negative", "type: decimal, non_negative", 1))
    with pytest.raises(ConfigError, match=r"transactions\.yaml: fields\[3\]\.type: 'decimal' is not one of"):
        load_settings("local", conf)


def test_secret_is_read_from_the_environment_never_from_yaml(monkeypatch):
    settings = load_settings("dev", CONF)
    monkeypatch.delenv("KAFKA_SASL_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="kafka.secret_env.sasl.password: environment variable KAFKA_SASL_PASSWORD is not set"):
        settings.kafka.client_properties()
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "s3cret")
    assert settings.kafka.client_properties()["sasl.password"] == "s3cret"
    assert settings.kafka.spark_options()["kafka.sasl.jaas.config"] == (
        'org.apache.kafka.common.security.plain.PlainLoginModule required '
        'username="feature-platform-dev" password="s3cret";'
    )
    assert "s3cret" not in "".join(p.read_text() for p in CONF.rglob("*.yaml"))


def test_overrides_parse_values_as_yaml():
    assert parse_overrides(["ingest.max_offsets_per_trigger=5000", "ingest.topics=[a, b]", "spark.ui_enabled=true"]) == {
        "ingest": {"max_offsets_per_trigger": 5000, "topics": ["a", "b"]},
        "spark": {"ui_enabled": True},
    }


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        parse_overrides(["ingest.max_offsets_per_trigger"])


@pytest.mark.parametrize(
    "features, message",
    [({"trigger_interval": "0s"}, r"features\.trigger_interval: must be positive"),
     ({"max_files_per_trigger": 0}, r"features\.max_files_per_trigger: must be positive"),
     ({"source": "kafka"}, r"features\.source: unknown key")],
)
def test_bad_feature_settings_name_the_key(features, message):
    with pytest.raises(ConfigError, match=message):
        load_settings("local", CONF, {"features": features})


@pytest.mark.parametrize(
    "live, message",
    [({"max_batch_events": 0}, r"live\.max_batch_events: must be positive"),
     ({"checkpoint_interval": "500ms"}, r"live\.checkpoint_interval: must be at least 1s"),
     ({"starting_offsets": "newest"}, r"live\.starting_offsets: 'newest' is not"),
     ({"events_topic_suffix": ""}, r"live\.events_topic_suffix: must be a non-empty"),
     ({"events_topic_suffix": ".dlq"}, r"live\.events_topic_suffix: the events topic of 'transactions'"),
     ({"trigger_interval": "0s"}, r"live\.trigger_interval: unknown key")],
)
def test_bad_live_settings_name_the_key(live, message):
    with pytest.raises(ConfigError, match=message):
        load_settings("local", CONF, {"live": live})


def test_registry_credentials_come_from_the_environment(monkeypatch):
    settings = load_settings("dev", CONF)
    assert settings.schema_registry.url == "https://schema-registry-dev.internal/apis/ccompat/v7"
    monkeypatch.delenv("SCHEMA_REGISTRY_BASIC_AUTH", raising=False)
    with pytest.raises(ConfigError, match="schema_registry.basic_auth_env: environment variable "
                                          "SCHEMA_REGISTRY_BASIC_AUTH is not set"):
        settings.schema_registry.client_config()
    monkeypatch.setenv("SCHEMA_REGISTRY_BASIC_AUTH", "key:secret")
    assert settings.schema_registry.client_config()["basic.auth.user.info"] == "key:secret"


def test_the_local_registry_url_follows_its_port():
    settings = load_settings("local", CONF, {"local": {"registry_port": 18081}})
    assert settings.schema_registry.url == "http://127.0.0.1:18081/apis/ccompat/v7"


def test_an_unknown_compatibility_level_is_named():
    with pytest.raises(ConfigError, match="schema_registry.subject_compatibility.transactions-value: 'FULLY' "
                                          "is not one of BACKWARD"):
        load_settings("local", CONF, {"schema_registry": {"subject_compatibility": {"transactions-value": "FULLY"}}})


def test_an_avro_topic_needs_a_registry_url(tmp_path):
    conf = contract_conf(tmp_path / "conf")
    with pytest.raises(ConfigError, match="schema_registry.url: not set, and topic 'transactions' carries Avro"):
        load_settings("local", conf, {"local": {"registry_enabled": False}})


def test_a_contract_format_is_json_or_avro(tmp_path):
    with pytest.raises(ConfigError, match="transactions.yaml: format: 'protobuf' is not one of json, avro"):
        load_settings("local", contract_conf(tmp_path / "conf", transactions_format="protobuf"))


def test_cluster_mode_points_kafka_redis_and_spark_at_the_local_cluster():
    settings = load_settings("local", CONF, {"local": {"mode": "cluster"}})
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9192,127.0.0.1:9194,127.0.0.1:9196"
    assert {(t.replication_factor, t.min_insync_replicas) for t in settings.kafka.topics.values()} == {(3, 2)}
    assert settings.redis.cluster_nodes == tuple(f"127.0.0.1:{p}" for p in range(7001, 7007))
    assert settings.redis.replica_acks == 1
    assert settings.spark.master == "spark://127.0.0.1:7077"
    assert (settings.spark.conf["spark.cores.max"], settings.spark.conf["spark.executor.cores"]) == ("2", "1")


def test_cluster_mode_without_spark_workers_keeps_spark_master():
    settings = load_settings("local", CONF, {"local": {"mode": "cluster", "spark_workers": 0}})
    assert settings.spark.master == "local[2]" and "spark.cores.max" not in settings.spark.conf
    assert settings.redis.clustered


def test_single_mode_leaves_the_configured_endpoints_alone():
    settings = load_settings("local", CONF)
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092" and not settings.redis.clustered
    assert settings.kafka.topics["transactions"].min_insync_replicas is None


@pytest.mark.parametrize(("local", "message"), [
    ({"mode": "clustered"}, "local.mode: 'clustered' is not one of single, cluster"),
    ({"mode": "cluster", "cluster_kafka_ports": [9192, 9194]}, r"3 ports each \(one node each\), got 2 and 3"),
    ({"mode": "cluster", "cluster_redis_ports": [7001, 7002, 7003]}, "local.cluster_redis_ports: 3 ports"),
    # A Redis node's bus port (7001 + 10000) is the Spark master's port.
    ({"mode": "cluster", "spark_master_port": 17001}, "17001 is given twice"),
])
def test_a_bad_cluster_shape_fails_naming_the_key(local, message):
    with pytest.raises(ConfigError, match=message):
        load_settings("local", CONF, {"local": local})


def test_a_redis_namespace_with_braces_is_refused_as_it_would_break_the_hash_tags():
    with pytest.raises(ConfigError, match=r"redis.namespace: 'a\{b\}' must not hold braces"):
        load_settings("local", CONF, {"redis": {"namespace": "a{b}"}})
