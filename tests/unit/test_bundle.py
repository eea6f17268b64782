"""The bundle (databricks.yml and every file its include globs match): each job is valid for
Databricks' own bundle models once its variables are resolved the way the bundle CLI resolves
them, runs on a size of the one shared cluster definition, and runs an entry point that setup.py
really declares; prod deploys one shared copy, as a service principal, with permissions."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from databricks.bundles.core import Bundle, Variable
from databricks.bundles.jobs import ClusterSpec, Job, JobRunAs

from jobs import backfill, build_training_set
from pipelines.core.settings import PROJECT_ROOT, load_settings
from pipelines.features.live_stream import SPARE_TASK_SLOTS

JOB_NAMES = {"ingest", "features", "live", "score", "cdc", "reconcile", "backfill", "recompute_late", "rehydrate",
             "build_training_set", "rebuild_training_set", "model_quality", "skew", "monitor"}
ROCKSDB_PROVIDER = "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
#: The levels the top-level (bundle or target) permissions mapping accepts.
TOP_LEVEL_PERMISSION_LEVELS = {"CAN_VIEW", "CAN_MANAGE", "CAN_RUN"}
PRINCIPAL_KEYS = {"user_name", "group_name", "service_principal_name"}

#: ${var.NAME}, optionally followed by a path into a complex variable: ${var.job_cluster.batch}.
VAR_REFERENCE = re.compile(r"\$\{var\.([\w-]+)((?:\.[\w-]+|\[\d+\])*)\}")


def _merge(base: Any, overlay: Any) -> Any:
    if isinstance(base, dict) and isinstance(overlay, dict):
        return {**base, **{key: _merge(base.get(key), value) for key, value in overlay.items()}}
    return overlay


def load_bundle(root: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """databricks.yml merged with every file its include globs match (paths relative to the
    bundle root), and the file each job is defined in. Like the CLI, a resource defined twice is
    an error, and only databricks.yml may include files."""
    main = root / "databricks.yml"
    bundle = yaml.safe_load(main.read_text())
    job_files = {name: main for name in bundle.get("resources", {}).get("jobs", {})}
    for pattern in bundle.get("include", []):
        for path in sorted(root.glob(pattern)):
            part = yaml.safe_load(path.read_text()) or {}
            if "include" in part:
                raise ValueError(f"{path}: only databricks.yml may include files")
            for kind, resources in part.pop("resources", {}).items():
                known = bundle.setdefault("resources", {}).setdefault(kind, {})
                for name, spec in resources.items():
                    if name in known:
                        raise ValueError(f"{path}: resources.{kind}.{name} is defined twice")
                    known[name] = spec
                    if kind == "jobs":
                        job_files[name] = path
            bundle = _merge(bundle, part)
    return bundle, job_files


def _lookup(values: dict[str, Any], name: str, path: str) -> Any:
    value = values[name]  # an undefined variable is an error, as in the CLI
    for key, index in re.findall(r"\.([\w-]+)|\[(\d+)\]", path):
        value = value[key] if key else value[int(index)]
    return copy.deepcopy(value)


def _resolve_once(value: Any, values: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {key: _resolve_once(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve_once(item, values) for item in value]
    if not isinstance(value, str):
        return value
    if whole := VAR_REFERENCE.fullmatch(value):
        return _lookup(values, whole.group(1), whole.group(2))

    def interpolate(match: re.Match) -> str:
        found = _lookup(values, match.group(1), match.group(2))
        if isinstance(found, (dict, list)):
            raise ValueError(f"{match.group(0)} is complex and cannot be part of the string {value!r}")
        return str(found)

    return VAR_REFERENCE.sub(interpolate, value)


def resolve(value: Any, values: dict[str, Any]) -> Any:
    """``value`` with its ${var.*} references replaced the way the bundle CLI does: a string that
    is only a reference becomes the referenced value itself (a mapping for a complex variable or
    a field of one), a reference inside a longer string is interpolated, and other references
    (${bundle.target}, ${workspace.file_path}) are left alone. Repeated until nothing changes,
    because a variable's value may hold references too ({{secrets/${var.secret_scope}/...}})."""
    for _ in range(10):
        resolved = _resolve_once(value, values)
        if resolved == value:
            return resolved
        value = resolved
    raise ValueError("variable references do not settle (a cycle?)")


def variable_values(bundle: dict[str, Any], target: str | None = None) -> dict[str, Any]:
    """Each variable's default, overridden by ``target``'s values (complex ones replaced whole)."""
    values = {name: spec.get("default") for name, spec in bundle.get("variables", {}).items()}
    if target:
        values.update(bundle["targets"][target].get("variables", {}))
    return values


BUNDLE, JOB_FILES = load_bundle(PROJECT_ROOT)
JOBS = BUNDLE["resources"]["jobs"]
VALUES = variable_values(BUNDLE)
PROD = BUNDLE["targets"]["prod"]
SETUP = (PROJECT_ROOT / "setup.py").read_text()


def console_scripts() -> set[str]:
    return set(re.findall(r'"([\w-]+)=[\w.]+:main"', SETUP))


def resolved_cluster(job: str) -> dict[str, Any]:
    (cluster,) = resolve(JOBS[job], VALUES)["job_clusters"]
    return cluster["new_cluster"]


def test_a_whole_reference_to_a_complex_variable_field_becomes_that_value():
    assert resolve({"new_cluster": "${var.c.batch}"}, {"c": {"batch": {"num_workers": 4}}}) == \
        {"new_cluster": {"num_workers": 4}}


def test_references_inside_a_variable_value_are_resolved_too():
    values = {"scope": "fp", "c": {"env": {"P": "{{secrets/${var.scope}/p}}"}}}
    assert resolve("${var.c.env}", values) == {"P": "{{secrets/fp/p}}"}


def test_references_other_than_variables_are_left_alone():
    assert resolve("/Workspace${workspace.file_path}/conf-${bundle.target}", {}) == \
        "/Workspace${workspace.file_path}/conf-${bundle.target}"


def test_include_globs_pick_up_one_file_per_job():
    assert {name: path.relative_to(PROJECT_ROOT).as_posix() for name, path in JOB_FILES.items()} == \
        {name: f"resources/{name}.yml" for name in JOB_NAMES}


def test_the_bundle_defines_every_job_the_platform_schedules():
    assert set(JOBS) == JOB_NAMES


@pytest.mark.parametrize("name", sorted(JOB_NAMES))
def test_job_is_a_valid_databricks_job_once_its_variables_are_resolved(name):
    job = Job.from_dict(resolve(JOBS[name], VALUES))
    # A cluster left as a ${var...} string would pass unchecked: it must be a real ClusterSpec.
    assert [type(cluster.new_cluster) for cluster in job.job_clusters] == [ClusterSpec]


def test_every_job_cluster_is_its_entry_of_the_shared_definition():
    assert {name: [cluster["new_cluster"] for cluster in spec["job_clusters"]] for name, spec in JOBS.items()} == {
        "ingest": ["${var.job_cluster.ingest}"],
        "features": ["${var.job_cluster.features}"],
        "live": ["${var.job_cluster.live}"],
        "score": ["${var.job_cluster.score}"],
        "cdc": ["${var.job_cluster.cdc}"],
        "reconcile": ["${var.job_cluster.reconcile}"],
        "backfill": ["${var.job_cluster.backfill}"],
        "recompute_late": ["${var.job_cluster.recompute_late}"],
        "rehydrate": ["${var.job_cluster.rehydrate}"],
        "build_training_set": ["${var.job_cluster.training}"],
        "rebuild_training_set": ["${var.job_cluster.training}"],
        "model_quality": ["${var.job_cluster.monitoring}"],
        "skew": ["${var.job_cluster.monitoring}"],
        "monitor": ["${var.job_cluster.reconcile}"],
    }


def test_the_job_clusters_differ_only_in_workers_and_secrets():
    first, *others = [{key: value for key, value in entry.items() if key not in ("num_workers", "spark_env_vars")}
                      for entry in VALUES["job_cluster"].values()]
    assert len(others) == 10 and others == [first] * 10


def test_each_job_keeps_its_worker_count():
    assert {name: resolved_cluster(name)["num_workers"] for name in JOBS} == {
        "ingest": 2, "features": 2, "live": 9, "score": 1, "cdc": 1, "reconcile": 1, "backfill": 4, "recompute_late": 1,
        "rehydrate": 1, "build_training_set": 4, "rebuild_training_set": 4, "model_quality": 1,
        "skew": 1, "monitor": 1,
    }


#: Cores of the node types the bundle uses (AWS instance specs).
NODE_CORES = {"i3.xlarge": 4}


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_the_live_cluster_has_a_task_slot_per_partition_of_the_live_topics_and_a_spare(env):
    # Real-time mode runs every task of its stage at once, one per Kafka partition, for a whole
    # batch; the metrics table's appends need a slot of their own meanwhile.
    cluster = resolved_cluster("live")
    slots = cluster["num_workers"] * NODE_CORES[cluster["node_type_id"]]
    settings = load_settings(env)
    topics = {settings.source_topic(v) for v in settings.computed_views.values() if v.online.enabled}
    assert slots >= sum(settings.kafka.topics[t].partitions for t in topics) + SPARE_TASK_SLOTS


def test_the_shared_cluster_is_a_valid_cluster_spec_for_every_job():
    entries = Bundle(target="dev", variables=resolve(VALUES, VALUES)).resolve_variable(
        Variable(path="var.job_cluster", type=dict[str, ClusterSpec]))
    assert {name: type(entry) for name, entry in entries.items()} == {
        name: ClusterSpec for name in
        ("ingest", "features", "live", "score", "cdc", "reconcile", "backfill", "recompute_late", "rehydrate", "training",
         "monitoring")}


@pytest.mark.parametrize("name", sorted(JOB_NAMES))
def test_every_job_runs_with_the_rocksdb_state_store(name):
    assert resolved_cluster(name)["spark_conf"]["spark.sql.streaming.stateStore.providerClass"] == ROCKSDB_PROVIDER


def test_each_job_cluster_gets_only_the_secrets_its_job_reads():
    kafka, registry, redis = "KAFKA_SASL_PASSWORD", "SCHEMA_REGISTRY_BASIC_AUTH", "REDIS_PASSWORD"
    assert {name: sorted(resolved_cluster(name)["spark_env_vars"]) for name in JOBS} == {
        "ingest": sorted([kafka, registry]),  # the topics and their DLQ topics; Avro schema ids
        "features": sorted([kafka, redis]),
        "live": sorted([kafka, redis]),
        "score": sorted([kafka, redis]),
        "cdc": sorted([kafka, redis]),  # the change topics; the tables' current rows in Redis
        "reconcile": [kafka],
        "backfill": sorted([kafka, registry, redis]),  # Kafka replays of Avro topics, Redis restated
        "recompute_late": [redis],
        "rehydrate": [redis],
        "build_training_set": [],
        "rebuild_training_set": [],
        "model_quality": [],  # Delta tables and the MLflow registry of the workspace
        "skew": [],  # bronze, the predictions table and the MLflow registry
        "monitor": [kafka],  # the topics' offsets; checkpoints and the Delta log
    }


def test_cluster_secrets_are_read_from_the_bundle_secret_scope():
    assert resolved_cluster("backfill")["spark_env_vars"] == {
        "KAFKA_SASL_PASSWORD": "{{secrets/feature-platform/kafka-sasl-password}}",
        "SCHEMA_REGISTRY_BASIC_AUTH": "{{secrets/feature-platform/schema-registry-basic-auth}}",
        "REDIS_PASSWORD": "{{secrets/feature-platform/redis-password}}",
    }


def test_every_secret_a_cluster_gets_is_a_secret_scope_reference():
    values = [value for name in JOBS for value in resolved_cluster(name)["spark_env_vars"].values()]
    assert len(values) == 17
    assert [value for value in values if not re.fullmatch(r"\{\{secrets/feature-platform/[\w-]+\}\}", value)] == []


def test_job_names_name_their_target():
    assert {name: spec["name"] for name, spec in JOBS.items()} == {
        "ingest": "feature-platform-ingest-${bundle.target}",
        "features": "feature-platform-features-${bundle.target}",
        "live": "feature-platform-live-${bundle.target}",
        "score": "feature-platform-score-${bundle.target}",
        "cdc": "feature-platform-cdc-${bundle.target}",
        "reconcile": "feature-platform-reconcile-${bundle.target}",
        "backfill": "feature-platform-backfill-${bundle.target}",
        "recompute_late": "feature-platform-recompute-late-${bundle.target}",
        "rehydrate": "feature-platform-rehydrate-${bundle.target}",
        "build_training_set": "feature-platform-training-set-${bundle.target}",
        "rebuild_training_set": "feature-platform-training-set-rebuild-${bundle.target}",
        "model_quality": "feature-platform-model-quality-${bundle.target}",
        "skew": "feature-platform-skew-${bundle.target}",
        "monitor": "feature-platform-monitor-${bundle.target}",
    }


def test_wheel_tasks_run_entry_points_this_package_declares():
    package = re.search(r'name="([\w-]+)"', SETUP).group(1).replace("-", "_")
    tasks = [task["python_wheel_task"] for spec in JOBS.values() for task in spec["tasks"]]
    assert [(task["package_name"], task["entry_point"] in console_scripts()) for task in tasks] == \
        [(package, True)] * len(JOB_NAMES)


def test_wheel_tasks_pass_the_bundle_environment_and_its_synced_conf_first():
    # ${workspace.file_path} starts with /Workspace already (the CLI adds it to the root path).
    assert {name: [task["python_wheel_task"]["parameters"][:4] for task in spec["tasks"]]
            for name, spec in JOBS.items()} == \
        {name: [["--env", "${var.env}", "--conf-dir", "${workspace.file_path}/conf"]] for name in JOB_NAMES}


def test_wheel_libraries_are_the_wheel_the_bundle_builds():
    # The CLI reads a local library path relative to the file the job is defined in.
    built = (PROJECT_ROOT / BUNDLE["artifacts"]["default"]["path"] / "dist" / "*.whl").resolve()
    assert {name: [(JOB_FILES[name].parent / library["whl"]).resolve()
                   for task in spec["tasks"] for library in task["libraries"]]
            for name, spec in JOBS.items()} == {name: [built] for name in JOB_NAMES}


def test_targets_pick_their_environment():
    assert {name: target["variables"]["env"] for name, target in BUNDLE["targets"].items()} == \
        {"dev": "dev", "prod": "prod"}


def test_every_target_environment_has_a_conf_file():
    assert {name: (PROJECT_ROOT / "conf" / f"{target['variables']['env']}.yaml").is_file()
            for name, target in BUNDLE["targets"].items()} == {"dev": True, "prod": True}


def test_prod_deploys_one_shared_copy_outside_user_homes():
    root = PROD["workspace"]["root_path"]
    assert root.startswith("/Workspace/Shared/") and "${bundle.target}" in root


def test_prod_grants_manage_run_and_view():
    assert sorted(permission["level"] for permission in PROD["permissions"]) == ["CAN_MANAGE", "CAN_RUN", "CAN_VIEW"]


def test_prod_permissions_use_only_levels_the_top_level_mapping_accepts():
    assert [p["level"] for p in PROD["permissions"] if p["level"] not in TOP_LEVEL_PERMISSION_LEVELS] == []


def test_each_prod_permission_names_exactly_one_principal():
    assert [sorted(PRINCIPAL_KEYS & set(permission)) for permission in PROD["permissions"]] == \
        [["service_principal_name"], ["group_name"], ["group_name"]]


def test_prod_runs_as_the_service_principal_variable():
    assert PROD["run_as"] == {"service_principal_name": "${var.prod_service_principal}"}
    JobRunAs.from_dict(resolve(PROD["run_as"], variable_values(BUNDLE, "prod")))  # Databricks' model accepts it


def test_prod_unpauses_the_scheduled_jobs():
    assert {name: spec["schedule"]["pause_status"] for name, spec in PROD["resources"]["jobs"].items()} == \
        {"reconcile": "UNPAUSED", "recompute_late": "UNPAUSED", "model_quality": "UNPAUSED", "skew": "UNPAUSED",
         "monitor": "UNPAUSED"}


def test_job_parameters_reach_the_batch_jobs_arguments():
    for name in ("backfill", "rehydrate", "build_training_set", "rebuild_training_set"):
        declared = {p["name"] for p in JOBS[name]["parameters"]}
        used = set(re.findall(r"\{\{job\.parameters\.(\w+)\}\}", str(JOBS[name]["tasks"])))
        assert used == declared, name
    # The backfill's task arguments, with its parameters' defaults, parse as the job expects.
    defaults = {p["name"]: p["default"] for p in JOBS["backfill"]["parameters"]}
    defaults.update({"from": "2026-11-01", "to": "2026-11-02"})
    argv = [re.sub(r"\{\{job\.parameters\.(\w+)\}\}", lambda m: defaults[m.group(1)], a)
            for a in JOBS["backfill"]["tasks"][0]["python_wheel_task"]["parameters"]]
    argv = [a.replace("${var.env}", "prod") for a in argv]
    args = backfill.parse_args(argv)
    assert (args.start, args.end, args.source, args.views) == ("2026-11-01", "2026-11-02", "bronze", "")
    assert backfill.source_from_args(args).version is None


def test_the_training_set_job_parameters_make_a_valid_request():
    job = JOBS["build_training_set"]
    defaults = {p["name"]: p["default"] for p in job["parameters"]}
    argv = [re.sub(r"\{\{job\.parameters\.(\w+)\}\}", lambda m: defaults[m.group(1)], a)
            for a in job["tasks"][0]["python_wheel_task"]["parameters"]]
    args = build_training_set.parse_args([a.replace("${var.env}", "prod") for a in argv][4:])
    request = build_training_set.request_from_args(args, load_settings("prod", PROJECT_ROOT / "conf"))
    assert (request.name, request.mode, request.spine.source) == ("fraud", "as_corrected", "labeled-transactions")
    assert request.spine.cutoff is not None and not args.from_run  # "now" pinned to an instant; no rebuild
    rebuild = JOBS["rebuild_training_set"]["tasks"][0]["python_wheel_task"]["parameters"]
    args = build_training_set.parse_args([re.sub(r"\{\{job\.parameters\.\w+\}\}", "", a) for a in rebuild][4:])
    build_training_set.check_rebuild_args(args)  # the rebuild job passes no build flag
    assert [v.name for v in request.views] == list(load_settings("prod", PROJECT_ROOT / "conf").computed_views)
