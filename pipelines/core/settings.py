"""The platform's settings: ``conf/base.yaml`` overlaid by ``conf/<env>.yaml``, with the event
contracts of ``conf/contracts`` and the feature views of ``conf/features``, loaded into one tree
of frozen, validated dataclasses (:class:`Settings`).

``conf/base.yaml`` holds the shared defaults; ``conf/<env>.yaml`` overlays it (deep merge,
mappings merged key by key, everything else replaced); ``--set KEY.PATH=VALUE`` overlays both.
Loading fails fast with a :class:`~pipelines.core.errors.ConfigError` that names the file, the
key path and the reason: unknown keys, wrong types, bad durations and dangling references are
all rejected here, not at the first batch. Nothing here imports Spark, so a process that only
reads the online store loads its settings without it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipelines.core.config import build, deep_merge, read_yaml, secret_from_env
from pipelines.core.contract_spec import Contract, load_contracts
from pipelines.core.errors import ConfigError
from pipelines.core.view_spec import FeatureView, load_views

ENVIRONMENTS = ("local", "dev", "prod")
#: local.mode: one process of each service, or a small cluster of each.
LOCAL_MODES = ("single", "cluster")

#: The repository root: conf/ and the git-ignored .local/ folder live here.
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class SparkSettings:
    """How the session factory builds (locally) or finds (on a cluster) the SparkSession."""

    app_name: str = "feature-platform"
    #: ``local[2]`` etc. builds a local session; null means "on a cluster: use the active session".
    master: str | None = None
    shuffle_partitions: int = 8
    #: Folder of the Spark-side jars fetched by ``python -m pipelines.local.jars fetch`` (local only).
    jars_dir: str | None = None
    driver_memory: str | None = None
    ui_enabled: bool = False
    log_level: str = "WARN"
    #: Extra Spark settings, applied last.
    conf: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicSettings:
    """A Kafka topic the platform owns: created by the project's admin code, never auto-created."""

    contract: str
    partitions: int = 4
    replication_factor: int = 1
    #: The topic's ``min.insync.replicas`` (unset: the broker's default): with producers' acks=all, a
    #: write is acknowledged once this many replicas have it.
    min_insync_replicas: int | None = None
    #: Topic that receives this topic's invalid records (at least once; the Delta DLQ table is exact).
    dlq_topic: str | None = None

    @staticmethod
    def subject(topic: str) -> str:
        """The registry subject of the topic's values (TopicNameStrategy)."""
        return f"{topic}-value"


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    topics: Mapping[str, TopicSettings]
    #: Extra client properties for every client (security.protocol, sasl.mechanism, ...): no secrets.
    client: Mapping[str, str] = field(default_factory=dict)
    #: Client property -> name of the environment variable holding its secret value.
    secret_env: Mapping[str, str] = field(default_factory=dict)

    def client_properties(self) -> dict[str, str]:
        """Properties for a confluent-kafka client, secrets resolved from the environment."""
        props = {"bootstrap.servers": self.bootstrap_servers, **self.client}
        for prop, variable in self.secret_env.items():
            props[prop] = secret_from_env(variable, f"kafka.secret_env.{prop}")
        return props

    def producer_properties(self) -> dict[str, str]:
        """:meth:`client_properties` of a producer: every write acknowledged by all in-sync replicas
        (``acks=all``, which ``min.insync.replicas`` makes at least that many), idempotent."""
        return {**self.client_properties(), "acks": "all", "enable.idempotence": "true"}

    def spark_options(self) -> dict[str, str]:
        """Options for Spark's Kafka source and sink (Java client names, ``kafka.`` prefixed).

        librdkafka's ``sasl.username``/``sasl.password`` become the Java client's JAAS line.
        """
        props = self.client_properties()
        username, password = props.pop("sasl.username", None), props.pop("sasl.password", None)
        if username is not None:
            module = (
                "org.apache.kafka.common.security.plain.PlainLoginModule"
                if props.get("sasl.mechanism", "PLAIN") == "PLAIN"
                else "org.apache.kafka.common.security.scram.ScramLoginModule"
            )
            props["sasl.jaas.config"] = f'{module} required username="{username}" password="{password}";'
        return {f"kafka.{key}": value for key, value in props.items()}

    def spark_producer_options(self) -> dict[str, str]:
        """:meth:`spark_options` of Spark's Kafka sink: ``acks=all`` (as :meth:`producer_properties`)."""
        return {**self.spark_options(), "kafka.acks": "all"}

    def dlq_topic_for(self, topic: str) -> str:
        return self.topics[topic].dlq_topic or f"{topic}.dlq"


@dataclass(frozen=True)
class StorageSettings:
    """Where tables and checkpoints live: a local path or any Hadoop URI (s3://, abfss://, dbfs:/)."""

    root: str

    def bronze_path(self, topic: str) -> str:
        return f"{self.root}/bronze/{topic}"

    @property
    def dead_letter_path(self) -> str:
        return f"{self.root}/bronze/_dead_letter"

    def cdc_path(self, topic: str, table: str) -> str:
        """A change-event topic's ``current`` or ``history`` table (:mod:`pipelines.cdc.tables`)."""
        return f"{self.root}/cdc/{topic}/{table}"

    def feature_path(self, view: str) -> str:
        return f"{self.root}/features/{view}"

    @property
    def feature_metrics_path(self) -> str:
        return f"{self.root}/ops/feature_metrics"

    @property
    def late_recompute_path(self) -> str:
        return f"{self.root}/ops/late_recompute"

    @property
    def live_metrics_path(self) -> str:
        return f"{self.root}/ops/live_metrics"

    @property
    def scoring_metrics_path(self) -> str:
        return f"{self.root}/ops/scoring_metrics"

    @property
    def feature_drift_path(self) -> str:
        """``fp-model-quality``: PSI per model version, hour and feature against the training set."""
        return f"{self.root}/ops/feature_drift"

    @property
    def model_quality_path(self) -> str:
        """``fp-model-quality``: precision, recall and AUC per model version and day, from the labels."""
        return f"{self.root}/ops/model_quality"

    @property
    def monitor_checks_path(self) -> str:
        """``fp-monitor check --record``: each run's lag and staleness measures."""
        return f"{self.root}/ops/monitor_checks"

    @property
    def stream_metrics_path(self) -> str:
        return f"{self.root}/ops/stream_metrics"

    def checkpoint_path(self, job: str, name: str) -> str:
        return f"{self.root}/_checkpoints/{job}/{name}"

    def training_path(self, name: str) -> str:
        """Where the training table ``name`` lives (one Delta table per training set)."""
        return f"{self.root}/training/{name}"


@dataclass(frozen=True)
class IngestSettings:
    """The bronze ingest stream: Kafka -> contract validation -> bronze / dead letter."""

    topics: tuple[str, ...]
    trigger_interval: timedelta = timedelta(seconds=10)
    max_offsets_per_trigger: int = 200_000
    starting_offsets: str = "earliest"
    fail_on_data_loss: bool = True
    #: How far ahead of the batch time an event may be before it is quarantined (clock skew).
    future_tolerance: timedelta = timedelta(minutes=5)
    #: How far behind the batch time an event may be before it is rejected as too old.
    max_event_age: timedelta = timedelta(days=7)
    max_value_bytes: int = 65_536
    publish_dlq_topic: bool = True
    #: Log one progress line per batch and append it to the metrics table.
    metrics_enabled: bool = True


@dataclass(frozen=True)
class FeatureSettings:
    """The feature-view streams (one query per view)."""

    #: How often each view's query looks for new bronze commits.
    trigger_interval: timedelta = timedelta(seconds=5)
    #: At most this many new bronze files per micro-batch (Delta ``maxFilesPerTrigger``): a
    #: restart after an outage catches up in bounded batches instead of one huge one.
    max_files_per_trigger: int = 1000


@dataclass(frozen=True)
class LiveSettings:
    """The live path (``fp-live``): each valid event's effect on the online views within a
    second, beside the durable path (README "The live path")."""

    #: Real-time mode batch length of the validation stage: its Kafka offsets are checkpointed
    #: at the end of each, so a restart validates at most this much again (the repeated events
    #: reach the events topic twice; the views drop them by event id).
    checkpoint_interval: timedelta = timedelta(minutes=5)
    #: The events topic of a source topic is ``{topic}{events_topic_suffix}``: its valid events,
    #: validated in the JVM, one JSON object each, partition for partition.
    events_topic_suffix: str = ".live"
    #: At most this many events per Redis batch (a backlog is applied in batches this large).
    max_batch_events: int = 5_000
    #: ``--available-now`` runs: at most this many records per validation micro-batch.
    max_offsets_per_trigger: int = 20_000
    #: For a new checkpoint of the validation stage: ``earliest`` rebuilds every window from what
    #: Kafka retains (the live values are exact only if the entity's events of its longest
    #: window are read).
    starting_offsets: str = "earliest"
    #: One progress line and one ``ops/live_metrics`` row per interval.
    report_interval: timedelta = timedelta(seconds=10)
    #: How long (event time, behind the entity's latest event) the row served for each event
    #: of a trailing view stays in Redis for ``fp-score`` to read (README "Streaming scoring").
    served_retention: timedelta = timedelta(minutes=10)

    def events_topic(self, topic: str) -> str:
        return f"{topic}{self.events_topic_suffix}"


@dataclass(frozen=True)
class ScoringSettings:
    """``fp-score``: each valid event of ``topic`` scored with its fresh features (README
    "Streaming scoring")."""

    #: The model: ``models:/<name>@<alias>`` (follows the alias), ``models:/<name>/<version>``
    #: or any MLflow model URI. Unset: ``fp-score --model`` must name one.
    model: str | None = None
    #: The source topic whose valid events are scored (read from its live events topic).
    topic: str = "transactions"
    predictions_topic: str = "predictions"
    #: The contract of what is written (conf/contracts).
    predictions_contract: str = "predictions"
    #: At most this many events scored per batch (one model call, one Kafka transaction).
    max_batch_events: int = 1000
    #: How long a batch waits, after its first event, for more (up to ``max_batch_events``):
    #: fewer, larger Kafka transactions for up to this much latency. 0: what is fetched already.
    batch_linger: timedelta = timedelta(0)
    #: How often the registry is asked where the alias points (a new version is loaded between
    #: batches, without a restart).
    model_refresh: timedelta = timedelta(seconds=30)
    #: A duplicate of an event scored less than this long ago (by arrival) gets no prediction.
    dedupe_window: timedelta = timedelta(minutes=30)
    #: The latency objective: event -> prediction p99 per report interval; a breach is logged
    #: as an error and recorded in the ops table.
    latency_slo_p99: timedelta = timedelta(seconds=2)
    #: One progress line and one ``ops/scoring_metrics`` row per interval.
    report_interval: timedelta = timedelta(seconds=10)
    #: How often the predictions table (``predictions/<model>``) takes the committed predictions
    #: (the topic is the real-time output; each micro-batch costs the scorer's JVM a Delta commit).
    table_trigger_interval: timedelta = timedelta(minutes=1)
    #: Threads a model call may use (OpenMP, BLAS): 1 by default, since the features path shares
    #: the machine's cores and a parallel predict then waits at every barrier
    #: (:func:`pipelines.scoring.model.limit_model_threads`).
    model_threads: int = 1
    #: The serving threshold: a score at or above it flags the event (``fp-model-quality``'s
    #: precision and recall are at it). Strictly between 0 and 1.
    threshold: float = 0.5


@dataclass(frozen=True)
class RedisSettings:
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    #: Environment variable holding the password, if the server needs one.
    password_env: str | None = None
    #: First part of every online key: ``{namespace}:{view}:{{entity}}`` (the entity is the key's
    #: hash tag: an entity's keys share a Redis Cluster slot).
    namespace: str = "features"
    #: Redis Cluster: ``host:port`` of some of its nodes (the client discovers the others); unset:
    #: one server at ``host``/``port``.
    cluster_nodes: tuple[str, ...] = ()
    #: Replicas that must hold a batch's online writes before the batch counts as done (Redis
    #: ``WAIT``, per master): a master that fails over after acknowledging a write does not lose
    #: it. 0: no wait (a single server, or availability over durability).
    replica_acks: int = 0
    #: How long a batch waits for those replicas; a batch short of them fails and is retried.
    replica_ack_timeout: timedelta = timedelta(seconds=5)

    @property
    def clustered(self) -> bool:
        return bool(self.cluster_nodes)


@dataclass(frozen=True)
class MlflowSettings:
    """Where training-set builds are tracked. The tracking URI used is ``--tracking-uri``, else the
    ``MLFLOW_TRACKING_URI`` environment variable, else ``tracking_uri`` here, else MLflow's own
    default."""

    tracking_uri: str | None = None
    experiment: str = "feature-platform-training-sets"
    #: Where a newly created experiment keeps its artifacts (unset: the tracking server's default).
    artifact_location: str | None = None


#: Compatibility levels of the Confluent schema-registry API.
COMPATIBILITY_LEVELS = (
    "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE", "NONE",
)


@dataclass(frozen=True)
class SchemaRegistrySettings:
    """A schema registry speaking the Confluent API: the local Apicurio (``/apis/ccompat/v7``),
    Confluent Cloud, or any other. Needed by topics whose contract has ``format: avro``."""

    url: str | None = None
    #: Environment variable holding ``user:password`` for HTTP basic auth (a Confluent Cloud
    #: API key and secret); unset: no authentication.
    basic_auth_env: str | None = None
    #: Compatibility level set on every subject the platform registers (``<topic>-value``).
    compatibility: str = "FULL"
    #: Subject -> compatibility level, for subjects that differ from ``compatibility``.
    subject_compatibility: Mapping[str, str] = field(default_factory=dict)
    #: Timeout of one request to the registry.
    timeout: timedelta = timedelta(seconds=10)

    def compatibility_for(self, subject: str) -> str:
        return self.subject_compatibility.get(subject, self.compatibility)

    def client_config(self) -> dict[str, Any]:
        """Configuration for confluent-kafka's ``SchemaRegistryClient``, the secret read from the
        environment. Raises ConfigError when no URL is configured."""
        if not self.url:
            raise ConfigError("schema_registry.url: not set (needed by topics whose contract is Avro)")
        config: dict[str, Any] = {"url": self.url, "timeout": max(1, round(self.timeout.total_seconds()))}
        if self.basic_auth_env:
            config["basic.auth.user.info"] = secret_from_env(self.basic_auth_env, "schema_registry.basic_auth_env")
        return config


@dataclass(frozen=True)
class CdcDatabaseSettings:
    """The PostgreSQL database whose changes are captured."""

    host: str = "127.0.0.1"
    #: Unset with the local platform: its server's (``local.postgres_port``).
    port: int | None = None
    dbname: str = "app"
    #: The connector's login: ``REPLICATION`` and ``SELECT`` on the captured tables.
    user: str = "cdc"
    #: Environment variable holding that login's password (never in the conf).
    password_env: str = "CDC_DB_PASSWORD"


@dataclass(frozen=True)
class CdcSettings:
    """Change data capture: Debezium's PostgreSQL connector in Kafka Connect, one change event
    per committed row change to ``<topic_prefix>.<schema>.<table>`` (README "Change data capture")."""

    #: Kafka Connect's REST API. Unset with the local platform: its worker (``local.connect_port``).
    connect_url: str | None = None
    #: The connector's name in Connect (its offsets are kept under it).
    connector: str = "app-cdc"
    database: CdcDatabaseSettings = field(default_factory=CdcDatabaseSettings)
    topic_prefix: str = "cdc"
    #: ``schema.table`` of each captured table.
    tables: tuple[str, ...] = ("public.accounts",)
    #: The replication slot the connector reads (one per connector; dropped with it).
    slot: str = "fp_cdc"
    #: The publication of ``tables`` and ``signal_table`` (created by the database's owner, not
    #: the connector).
    publication: str = "fp_cdc"
    #: Debezium's signalling table (``id``, ``type``, ``data``): a row in it asks the connector
    #: for an ad-hoc snapshot of some tables (:func:`pipelines.core.kafka_connect.snapshot_signal`).
    signal_table: str = "public.cdc_signal"
    #: How often the connector polls its queue of decoded changes: commit -> Kafka latency.
    poll_interval: timedelta = timedelta(milliseconds=50)
    #: A heartbeat record this often: the slot's position moves on while the tables are quiet.
    heartbeat_interval: timedelta = timedelta(seconds=10)
    #: fp-cdc's tables query (bronze, current, history): its micro-batch interval (0s: the next
    #: batch as soon as one ends); each batch costs two MERGEs whatever its size (BENCHMARKS.md).
    trigger_interval: timedelta = timedelta(seconds=1)
    #: fp-cdc's online query (Redis only): its micro-batch interval.
    online_trigger_interval: timedelta = timedelta(milliseconds=250)

    def topic_for(self, table: str) -> str:
        """The change-event topic of ``schema.table``."""
        return f"{self.topic_prefix}.{table}"


#: fp-live's p99 objective when ``monitoring.max_online_p99`` is unset: an event's effect online
#: within a second (README "The live path").
LIVE_P99_OBJECTIVE = timedelta(seconds=1)


@dataclass(frozen=True)
class MonitoringSettings:
    """``fp-monitor check``'s thresholds: a breach of any makes it exit non-zero, naming it."""

    #: Records a streaming ingest query may be behind the broker's latest offsets, per topic (all
    #: partitions together): its last committed batch's end offsets against the partitions' ends.
    max_lag: int = 100_000
    #: How old the newest event of a feature view's table may be (now minus its event time).
    max_staleness: timedelta = timedelta(minutes=15)
    #: Views whose staleness is not checked (a view of events that come rarely).
    staleness_exempt: tuple[str, ...] = ()
    #: The recent window the dead-letter rate is measured over: records the ingest validated (its
    #: batch time, bronze ``ingested_at`` / dead-letter ``failed_at``) at most this long ago.
    dead_letter_window: timedelta = timedelta(minutes=15)
    #: A topic's dead letters over all the records the ingest took from it in the window may be at
    #: most this share (0 <= rate < 1; 0: any dead letter is a breach).
    max_dead_letter_rate: float = 0.05
    #: A window with fewer records of a topic than this is not judged (one bad record of three is
    #: no alert); the rate is still printed and recorded.
    min_records_for_rate: int = 100
    #: The online path's latency objective: the p99 of the latest report interval of ``fp-live``
    #: (event -> Redis, per topic) and of ``fp-score`` (event -> prediction, per model). Unset:
    #: 1s for fp-live (its design goal) and ``scoring.latency_slo_p99`` for fp-score.
    max_online_p99: timedelta | None = None
    #: How recent that latest interval must be (its end): the jobs append their intervals to
    #: their ops tables about once a minute. Older: the job is not measured (not a breach;
    #: staleness and lag show a job that stopped).
    online_window: timedelta = timedelta(minutes=5)
    #: The streaming jobs' Prometheus endpoint (``/metrics``), unless ``--metrics-port`` names one;
    #: unset: none. One port per process: give each job its own with ``--metrics-port``.
    metrics_port: int | None = None
    #: The interface it listens on (``0.0.0.0`` for a Prometheus on another host).
    metrics_host: str = "127.0.0.1"

    def online_p99_threshold(self, job: str, scoring: ScoringSettings) -> timedelta:
        """The p99 objective of ``job`` (``live`` or ``score``): ``max_online_p99`` when set, else
        fp-live's 1s or fp-score's own ``scoring.latency_slo_p99``."""
        if self.max_online_p99 is not None:
            return self.max_online_p99
        return scoring.latency_slo_p99 if job == "score" else LIVE_P99_OBJECTIVE


@dataclass(frozen=True)
class LocalPlatformSettings:
    """The embedded local platform: a real Kafka broker (KRaft), Redis and the Apicurio schema
    registry on loopback."""

    root: str = ".local"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_heap: str = "1g"
    redis_port: int = 6380
    #: Start the schema registry with the others (it needs a Java 21+ JDK).
    registry_enabled: bool = True
    registry_port: int = 8081
    #: The registry's management interface (health, metrics).
    registry_management_port: int = 9000
    registry_heap: str = "512m"
    #: JDK (21+) to run the registry with; unset: the newest JDK 21+ found on the machine.
    registry_java_home: str | None = None
    #: Start PostgreSQL and a Kafka Connect worker with Debezium's connector (``cdc``) too.
    cdc_enabled: bool = True
    postgres_port: int = 5433
    #: PostgreSQL's folder (data, socket); unset: ``<root>/postgres``. When the platform runs as
    #: root, PostgreSQL runs as the ``postgres`` user, which must be able to reach it.
    postgres_dir: str | None = None
    connect_port: int = 8083
    connect_heap: str = "512m"
    #: ``single``: one process of each service. ``cluster``: three Kafka nodes (topics with
    #: replication factor 3 and min.insync.replicas 2), a Redis Cluster (3 masters, a replica
    #: each) and Spark standalone (a master and ``spark_workers`` workers); the settings'
    #: ``kafka.bootstrap_servers``, ``redis`` and ``spark.master`` then name them.
    mode: str = "single"
    #: cluster mode: each Kafka node's client port and its controller port.
    cluster_kafka_ports: tuple[int, ...] = (9192, 9194, 9196)
    cluster_kafka_controller_ports: tuple[int, ...] = (9193, 9195, 9197)
    cluster_kafka_heap: str = "512m"
    #: cluster mode: the Redis Cluster's nodes (3 masters and a replica each); each also takes its
    #: port + 10000 (the cluster bus).
    cluster_redis_ports: tuple[int, ...] = (7001, 7002, 7003, 7004, 7005, 7006)
    #: cluster mode: how long a Redis master may be unreachable before its replica takes over.
    cluster_redis_node_timeout: timedelta = timedelta(seconds=2)
    #: cluster mode: Spark standalone's master and workers (spark.master names it); with
    #: ``spark_workers: 0`` none is started and the jobs run Spark as ``spark.master`` says.
    spark_master_port: int = 7077
    spark_master_ui_port: int = 8090
    spark_workers: int = 2
    #: Each worker's web UI port is this plus its index.
    spark_worker_ui_port: int = 8091
    #: Cores and memory a worker offers; each application takes one core on every worker (an
    #: executor of ``spark_executor_memory``), so this many applications run at once.
    spark_worker_cores: int = 3
    spark_worker_memory: str = "4g"
    spark_executor_memory: str = "1g"

    @property
    def clustered(self) -> bool:
        return self.mode == "cluster"

    @property
    def spark_master_url(self) -> str:
        return f"spark://127.0.0.1:{self.spark_master_port}"


@dataclass(frozen=True)
class Settings:
    """Everything a job needs, for one environment."""

    env: str
    spark: SparkSettings
    kafka: KafkaSettings
    storage: StorageSettings
    ingest: IngestSettings
    features: FeatureSettings = field(default_factory=FeatureSettings)
    live: LiveSettings = field(default_factory=LiveSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    schema_registry: SchemaRegistrySettings = field(default_factory=SchemaRegistrySettings)
    cdc: CdcSettings = field(default_factory=CdcSettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    local: LocalPlatformSettings | None = None
    #: Contract name -> contract, loaded from ``conf/contracts/``.
    contracts: Mapping[str, Contract] = field(default_factory=dict, metadata={"yaml": False})
    #: View name -> feature view, loaded from ``conf/features/``.
    views: Mapping[str, FeatureView] = field(default_factory=dict, metadata={"yaml": False})

    def contract_for(self, topic: str) -> Contract:
        """The contract that governs ``topic``."""
        return self.contracts[self.kafka.topics[topic].contract]

    def source_topic(self, view: FeatureView) -> str:
        """The ingested topic whose contract is ``view``'s source, or for an attributes view the
        change topic of its table (exactly one: checked when the settings load)."""
        (topic,) = _topics_of(self, view.source.contract) if view.computed else _change_topics_of(self, view.source.contract)
        return topic

    @property
    def computed_views(self) -> dict[str, FeatureView]:
        """The views the feature jobs compute (every kind but attributes, which fp-cdc keeps)."""
        return {name: view for name, view in self.views.items() if view.computed}

    def view_table_path(self, view: FeatureView) -> str:
        """Where a view's rows are: its feature table, or for an attributes view its table's
        history (:mod:`pipelines.cdc.tables`)."""
        if view.computed:
            return self.storage.feature_path(view.name)
        return self.storage.cdc_path(self.source_topic(view), "history")


def default_conf_dir() -> Path:
    return Path(os.environ.get("PIPELINES_CONF_DIR", PROJECT_ROOT / "conf"))


def load_settings(
    env: str,
    conf_dir: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings for ``env`` (local, dev or prod) from ``conf_dir`` with optional ``overrides``.

    Relative local paths (``storage.root``, ``local.root``, ``spark.jars_dir``) resolve against
    the project root, so jobs behave the same from any working directory.
    """
    if env not in ENVIRONMENTS:
        raise ConfigError(f"--env: {env!r} is not one of {', '.join(ENVIRONMENTS)}")
    conf_dir = Path(conf_dir) if conf_dir else default_conf_dir()
    env_file = conf_dir / f"{env}.yaml"
    if not env_file.exists():
        raise ConfigError(f"{env_file}: no configuration for environment {env!r}")
    merged = deep_merge(read_yaml(conf_dir / "base.yaml"), read_yaml(env_file))
    merged = deep_merge(merged, overrides or {})
    merged["env"] = env
    settings = build(Settings, merged, f"{env_file}:")
    settings = _resolve_local_paths(settings, conf_dir.resolve().parent)
    contracts = load_contracts(conf_dir / "contracts")
    views = load_views(conf_dir / "features", contracts)
    settings = dataclasses.replace(settings, contracts=contracts, views=views)
    _check_references(settings, env_file)
    return settings


def _resolve_local_paths(settings: Settings, root: Path) -> Settings:
    def resolve(path: str | None) -> str | None:
        if path is None or "://" in path or re.match(r"^[a-z]+:/", path):
            return path
        return str((root / path).resolve()) if not os.path.isabs(path) else path

    spark = dataclasses.replace(settings.spark, jars_dir=resolve(settings.spark.jars_dir))
    storage = dataclasses.replace(settings.storage, root=resolve(settings.storage.root))
    local = settings.local and dataclasses.replace(settings.local, root=resolve(settings.local.root),
                                                   postgres_dir=resolve(settings.local.postgres_dir))
    tracking_uri = settings.mlflow.tracking_uri
    if tracking_uri and tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        # sqlite:///relative/path.db: relative to the project root, like the other local paths.
        tracking_uri = f"sqlite:///{resolve(tracking_uri[len('sqlite:///'):])}"
    mlflow = dataclasses.replace(settings.mlflow, tracking_uri=tracking_uri,
                                 artifact_location=resolve(settings.mlflow.artifact_location))
    registry = settings.schema_registry
    if registry.url is None and local is not None and local.registry_enabled:
        # The embedded platform's registry, unless the environment names another one.
        registry = dataclasses.replace(registry, url=local_registry_url(local.registry_port))
    cdc = settings.cdc
    if local is not None and local.cdc_enabled:
        # The embedded platform's database and Connect worker, unless the environment names others.
        if cdc.database.port is None:
            cdc = dataclasses.replace(cdc, database=dataclasses.replace(cdc.database, port=local.postgres_port))
        if cdc.connect_url is None:
            cdc = dataclasses.replace(cdc, connect_url=local_connect_url(local.connect_port))
    settings = dataclasses.replace(settings, spark=spark, storage=storage, local=local, mlflow=mlflow,
                                   schema_registry=registry, cdc=cdc)
    return _pointed_at_local_cluster(settings) if local is not None and local.clustered else settings


#: cluster mode: what every topic gets (of three nodes: one may be down and writes go on).
CLUSTER_REPLICATION_FACTOR = 3
CLUSTER_MIN_INSYNC_REPLICAS = 2


def _pointed_at_local_cluster(settings: Settings) -> Settings:
    """``local.mode: cluster``: the clients name the local cluster's processes (its three Kafka
    nodes, its Redis Cluster with one replica's acknowledgement per batch, its Spark master),
    and every topic is replicated on the three nodes."""
    local = settings.local
    assert local is not None
    topics = {name: dataclasses.replace(topic, replication_factor=CLUSTER_REPLICATION_FACTOR,
                                        min_insync_replicas=CLUSTER_MIN_INSYNC_REPLICAS)
              for name, topic in settings.kafka.topics.items()}
    kafka = dataclasses.replace(settings.kafka, topics=topics,
                                bootstrap_servers=",".join(f"127.0.0.1:{p}" for p in local.cluster_kafka_ports))
    redis = dataclasses.replace(settings.redis, cluster_nodes=tuple(f"127.0.0.1:{p}" for p in local.cluster_redis_ports),
                                replica_acks=max(settings.redis.replica_acks, 1))
    # One executor of one core on each worker per application (the standalone master's default
    # gives the first application every core, and the next waits for it to end); the driver on
    # loopback, as the executors are.
    spark = settings.spark
    if local.spark_workers:
        conf = {"spark.executor.cores": "1", "spark.cores.max": str(local.spark_workers),
                "spark.executor.memory": local.spark_executor_memory,
                "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1", **settings.spark.conf}
        spark = dataclasses.replace(settings.spark, master=local.spark_master_url, conf=conf)
    return dataclasses.replace(settings, kafka=kafka, redis=redis, spark=spark)


def local_connect_url(port: int) -> str:
    """The REST API of the local Kafka Connect worker on ``port``."""
    return f"http://127.0.0.1:{port}"


def local_registry_url(port: int) -> str:
    """The Confluent-compatible API of the local Apicurio registry on ``port``."""
    return f"http://127.0.0.1:{port}/apis/ccompat/v7"


def _topics_of(settings: Settings, contract: str) -> list[str]:
    """The ingested topics whose values follow ``contract``."""
    return [t for t in settings.ingest.topics if t in settings.kafka.topics and settings.kafka.topics[t].contract == contract]


#: A PostgreSQL ``schema.table`` name, unquoted.
_SCHEMA_TABLE = re.compile(r"[A-Za-z_][\w$]*\.[A-Za-z_][\w$]*")


def _change_topics_of(settings: Settings, contract: str) -> list[str]:
    """The change topics of ``cdc.tables`` whose values follow ``contract``."""
    topics = [settings.cdc.topic_for(table) for table in settings.cdc.tables]
    return [t for t in topics if t in settings.kafka.topics and settings.kafka.topics[t].contract == contract]


def _check_local(local: LocalPlatformSettings, source: Path) -> None:
    if local.mode not in LOCAL_MODES:
        raise ConfigError(f"{source}: local.mode: {local.mode!r} is not one of {', '.join(LOCAL_MODES)}")
    if not local.clustered:
        return
    kafka, controllers, nodes = local.cluster_kafka_ports, local.cluster_kafka_controller_ports, local.cluster_redis_ports
    if len(kafka) != CLUSTER_REPLICATION_FACTOR or len(controllers) != len(kafka):
        raise ConfigError(f"{source}: local.cluster_kafka_ports and local.cluster_kafka_controller_ports: "
                          f"{CLUSTER_REPLICATION_FACTOR} ports each (one node each), got {len(kafka)} and {len(controllers)}")
    if len(nodes) < 6 or len(nodes) % 2:
        raise ConfigError(f"{source}: local.cluster_redis_ports: {len(nodes)} ports; a Redis Cluster here has "
                          "3 or more masters and a replica each (an even number, at least 6)")
    ports = [*kafka, *controllers, *nodes, *(p + 10000 for p in nodes), local.spark_master_port, local.spark_master_ui_port,
             *(local.spark_worker_ui_port + i for i in range(local.spark_workers))]
    taken = sorted({p for p in ports if ports.count(p) > 1})
    if taken:
        raise ConfigError(f"{source}: local: cluster mode's ports must differ (a Redis node's takes its port + 10000 "
                          f"too): {', '.join(map(str, taken))} is given twice")
    if local.spark_workers < 0 or local.spark_worker_cores < 1:
        raise ConfigError(f"{source}: local.spark_workers: must not be negative (0: Spark as spark.master says, "
                          "no standalone cluster); local.spark_worker_cores: at least 1")
    if local.cluster_redis_node_timeout < timedelta(milliseconds=100):
        raise ConfigError(f"{source}: local.cluster_redis_node_timeout: must be at least 100ms")


def _check_monitoring(monitoring: MonitoringSettings, views: Mapping[str, FeatureView], source: Path) -> None:
    """fp-monitor's thresholds: each bad one a ConfigError naming its key."""
    if monitoring.max_lag < 0:
        raise ConfigError(f"{source}: monitoring.max_lag: must not be negative")
    for key in ("max_staleness", "dead_letter_window", "online_window"):
        if getattr(monitoring, key) <= timedelta(0):
            raise ConfigError(f"{source}: monitoring.{key}: must be positive")
    if not 0 <= monitoring.max_dead_letter_rate < 1:
        raise ConfigError(f"{source}: monitoring.max_dead_letter_rate: {monitoring.max_dead_letter_rate} is not a share "
                          "in [0, 1) (dead letters over the topic's records in monitoring.dead_letter_window)")
    if monitoring.min_records_for_rate < 1:
        raise ConfigError(f"{source}: monitoring.min_records_for_rate: must be at least 1")
    if monitoring.max_online_p99 is not None and monitoring.max_online_p99 <= timedelta(0):
        raise ConfigError(f"{source}: monitoring.max_online_p99: must be positive (unset: 1s for fp-live, "
                          "scoring.latency_slo_p99 for fp-score)")
    unknown = [v for v in monitoring.staleness_exempt if v not in views]
    if unknown:
        raise ConfigError(f"{source}: monitoring.staleness_exempt: {', '.join(unknown)} not declared in conf/features")


def _check_references(settings: Settings, source: Path) -> None:
    if settings.local is not None:
        _check_local(settings.local, source)
    _check_monitoring(settings.monitoring, settings.views, source)
    if "{" in settings.redis.namespace or "}" in settings.redis.namespace:
        raise ConfigError(f"{source}: redis.namespace: {settings.redis.namespace!r} must not hold braces "
                          "(an online key's braces mark its Redis Cluster hash tag)")
    if settings.redis.replica_acks < 0:
        raise ConfigError(f"{source}: redis.replica_acks: must not be negative")
    for node in settings.redis.cluster_nodes:
        if not re.fullmatch(r"[^\s:]+:\d{1,5}", node):
            raise ConfigError(f"{source}: redis.cluster_nodes: {node!r} is not host:port")
    if settings.redis.clustered and settings.redis.db != 0:
        raise ConfigError(f"{source}: redis.db: {settings.redis.db}: a Redis Cluster has only database 0")
    for topic in settings.ingest.topics:
        if topic not in settings.kafka.topics:
            raise ConfigError(
                f"{source}: ingest.topics: {topic!r} is not declared under kafka.topics "
                f"({', '.join(settings.kafka.topics)})"
            )
    for section, offsets in (("ingest", settings.ingest.starting_offsets), ("live", settings.live.starting_offsets)):
        if offsets not in ("earliest", "latest"):
            raise ConfigError(f"{source}: {section}.starting_offsets: {offsets!r} is not 'earliest' or 'latest'")
    if settings.ingest.max_offsets_per_trigger <= 0 or settings.ingest.max_value_bytes <= 0:
        raise ConfigError(
            f"{source}: ingest.max_offsets_per_trigger and ingest.max_value_bytes must be positive"
        )
    live = settings.live
    for key in ("max_batch_events", "max_offsets_per_trigger"):
        if getattr(live, key) <= 0:
            raise ConfigError(f"{source}: live.{key}: must be positive")
    if live.served_retention <= timedelta(0):
        raise ConfigError(f"{source}: live.served_retention: must be positive")
    if live.checkpoint_interval < timedelta(seconds=1):
        raise ConfigError(f"{source}: live.checkpoint_interval: must be at least 1s (real-time mode batches)")
    if not live.events_topic_suffix or live.events_topic_suffix.strip() != live.events_topic_suffix:
        raise ConfigError(f"{source}: live.events_topic_suffix: must be a non-empty name suffix")
    taken = {*settings.kafka.topics, *(settings.kafka.dlq_topic_for(t) for t in settings.kafka.topics)}
    clashing = [t for t in settings.kafka.topics if live.events_topic(t) in taken]
    if clashing:
        raise ConfigError(f"{source}: live.events_topic_suffix: the events topic of {clashing[0]!r} "
                          f"({live.events_topic(clashing[0])!r}) is a declared topic or dead-letter topic")
    scoring = settings.scoring
    if scoring.topic not in settings.kafka.topics:
        raise ConfigError(f"{source}: scoring.topic: {scoring.topic!r} is not declared under kafka.topics")
    if scoring.predictions_contract not in settings.contracts:
        raise ConfigError(f"{source}: scoring.predictions_contract: no contract {scoring.predictions_contract!r} in conf/contracts")
    if scoring.predictions_topic in taken:
        raise ConfigError(f"{source}: scoring.predictions_topic: {scoring.predictions_topic!r} is a declared topic or dead-letter topic")
    if scoring.max_batch_events <= 0:
        raise ConfigError(f"{source}: scoring.max_batch_events: must be positive")
    for key in ("model_refresh", "dedupe_window", "latency_slo_p99", "report_interval", "table_trigger_interval"):
        if getattr(scoring, key) <= timedelta(0):
            raise ConfigError(f"{source}: scoring.{key}: must be positive")
    if scoring.batch_linger < timedelta(0):
        raise ConfigError(f"{source}: scoring.batch_linger: must not be negative")
    if scoring.model_threads < 1:
        raise ConfigError(f"{source}: scoring.model_threads: {scoring.model_threads} must be at least 1")
    if not 0 < scoring.threshold < 1:
        raise ConfigError(f"{source}: scoring.threshold: {scoring.threshold} is not strictly between 0 and 1")
    if settings.features.trigger_interval <= timedelta(0):
        raise ConfigError(f"{source}: features.trigger_interval: must be positive")
    if settings.features.max_files_per_trigger <= 0:
        raise ConfigError(f"{source}: features.max_files_per_trigger: must be positive")
    registry = settings.schema_registry
    for key, level in [("compatibility", registry.compatibility),
                       *((f"subject_compatibility.{s}", v) for s, v in registry.subject_compatibility.items())]:
        if level not in COMPATIBILITY_LEVELS:
            raise ConfigError(
                f"{source}: schema_registry.{key}: {level!r} is not one of {', '.join(COMPATIBILITY_LEVELS)}"
            )
    for name, topic in settings.kafka.topics.items():
        if topic.contract not in settings.contracts:
            raise ConfigError(
                f"{source}: kafka.topics.{name}.contract: no contract {topic.contract!r} in "
                f"conf/contracts ({', '.join(sorted(settings.contracts)) or 'none'})"
            )
        if topic.partitions <= 0:
            raise ConfigError(f"{source}: kafka.topics.{name}.partitions: must be positive")
        if settings.contracts[topic.contract].format == "avro" and not registry.url:
            raise ConfigError(
                f"{source}: schema_registry.url: not set, and topic {name!r} carries Avro "
                f"(contract {topic.contract!r} has format: avro)"
            )
    for section, topics in (("ingest.topics", settings.ingest.topics), ("scoring.topic", [scoring.topic])):
        for topic in topics:
            if settings.contract_for(topic).is_changes:
                raise ConfigError(f"{source}: {section}: {topic!r} carries change events (contract "
                                  f"{settings.kafka.topics[topic].contract!r} has format: debezium): fp-cdc ingests it")
    cdc = settings.cdc
    for table in cdc.tables:
        if not _SCHEMA_TABLE.fullmatch(table):
            raise ConfigError(f"{source}: cdc.tables: {table!r} is not schema.table")
        topic = cdc.topic_for(table)
        if topic not in settings.kafka.topics or not settings.contract_for(topic).is_changes:
            raise ConfigError(f"{source}: cdc.tables: {table!r}: its change topic {topic!r} must be declared under "
                              "kafka.topics with a contract of format: debezium")
    if not _SCHEMA_TABLE.fullmatch(cdc.signal_table) or cdc.signal_table in cdc.tables:
        raise ConfigError(f"{source}: cdc.signal_table: {cdc.signal_table!r} must be a schema.table of its own")
    for key in ("poll_interval", "heartbeat_interval"):
        if getattr(cdc, key) <= timedelta(0):
            raise ConfigError(f"{source}: cdc.{key}: must be positive")
    for key in ("trigger_interval", "online_trigger_interval"):
        if getattr(cdc, key) < timedelta(0):
            raise ConfigError(f"{source}: cdc.{key}: must not be negative")
    for name, view in settings.views.items():
        if not view.computed:
            if len(_change_topics_of(settings, view.source.contract)) != 1:
                raise ConfigError(f"{source}: view {name!r} reads the changes of contract {view.source.contract!r}: "
                                  "exactly one table of cdc.tables must have it (its topic under kafka.topics)")
            continue
        topics = _topics_of(settings, view.source.contract)
        if len(topics) != 1:
            # A view no job could compute fails here, not inside the first job that meets it.
            raise ConfigError(
                f"{source}: view {name!r} reads contract {view.source.contract!r}, which "
                + (f"{len(topics)} ingested topics carry ({', '.join(topics)}): a view reads one topic"
                   if topics else f"no topic of ingest.topics carries ({', '.join(settings.ingest.topics)})")
            )
