"""databricks.yml: every job is valid for Databricks' own bundle models and runs an entry point
that setup.py really declares."""

from __future__ import annotations

import re

import yaml
from databricks.bundles.jobs import Job

from pipelines.config import PROJECT_ROOT, load_settings

BUNDLE = yaml.safe_load((PROJECT_ROOT / "databricks.yml").read_text())
SETUP = (PROJECT_ROOT / "setup.py").read_text()


def console_scripts() -> set[str]:
    return set(re.findall(r'"([\w-]+)=[\w.]+:main"', SETUP))


def test_every_job_is_a_valid_databricks_job():
    jobs = BUNDLE["resources"]["jobs"]
    assert set(jobs) == {"ingest", "features", "reconcile", "backfill", "recompute_late", "rehydrate",
                         "build_training_set", "rebuild_training_set"}
    for name, spec in jobs.items():
        assert Job.from_dict(spec).tasks, name


def test_wheel_tasks_name_declared_entry_points_of_this_package():
    package = re.search(r'name="([\w-]+)"', SETUP).group(1).replace("-", "_")
    for spec in BUNDLE["resources"]["jobs"].values():
        for task in spec["tasks"]:
            wheel = task["python_wheel_task"]
            assert wheel["package_name"] == package
            assert wheel["entry_point"] in console_scripts()
            assert wheel["parameters"][:2] == ["--env", "${var.env}"]


def test_targets_pick_their_environment():
    assert {name: target["variables"]["env"] for name, target in BUNDLE["targets"].items()} == {"dev": "dev", "prod": "prod"}
    assert all((PROJECT_ROOT / "conf" / f"{target['variables']['env']}.yaml").exists() for target in BUNDLE["targets"].values())


def test_secrets_come_from_the_secret_scope_not_the_bundle():
    text = (PROJECT_ROOT / "databricks.yml").read_text()
    for value in re.findall(r"(?:PASSWORD|SECRET)\w*:\s*(.+)", text):
        assert value.strip().strip('"').startswith("{{secrets/"), value


def test_job_parameters_reach_the_batch_jobs_arguments():
    from jobs import backfill

    jobs = BUNDLE["resources"]["jobs"]
    for name in ("backfill", "rehydrate", "build_training_set", "rebuild_training_set"):
        declared = {p["name"] for p in jobs[name]["parameters"]}
        used = set(re.findall(r"\{\{job\.parameters\.(\w+)\}\}", str(jobs[name]["tasks"])))
        assert used == declared, name
    # The backfill's task arguments, with its parameters' defaults, parse as the job expects.
    defaults = {p["name"]: p["default"] for p in jobs["backfill"]["parameters"]}
    defaults.update({"from": "2026-11-01", "to": "2026-11-02"})
    argv = [re.sub(r"\{\{job\.parameters\.(\w+)\}\}", lambda m: defaults[m.group(1)], a)
            for a in jobs["backfill"]["tasks"][0]["python_wheel_task"]["parameters"]]
    argv = [a.replace("${var.env}", "prod") for a in argv]
    args = backfill.parse_args(argv)
    assert (args.start, args.end, args.source, args.views) == ("2026-11-01", "2026-11-02", "bronze", "")
    assert backfill.source_from_args(args).version is None


def test_the_training_set_job_parameters_make_a_valid_request():
    from jobs import build_training_set

    job = BUNDLE["resources"]["jobs"]["build_training_set"]
    defaults = {p["name"]: p["default"] for p in job["parameters"]}
    argv = [re.sub(r"\{\{job\.parameters\.(\w+)\}\}", lambda m: defaults[m.group(1)], a)
            for a in job["tasks"][0]["python_wheel_task"]["parameters"]]
    args = build_training_set.parse_args([a.replace("${var.env}", "prod") for a in argv][4:])
    request = build_training_set.request_from_args(args, load_settings("prod", PROJECT_ROOT / "conf"))
    assert (request.name, request.mode, request.spine.source) == ("fraud", "as_corrected", "labeled-transactions")
    assert request.spine.cutoff is not None and not args.from_run  # "now" pinned to an instant; no rebuild
    rebuild = BUNDLE["resources"]["jobs"]["rebuild_training_set"]["tasks"][0]["python_wheel_task"]["parameters"]
    args = build_training_set.parse_args([re.sub(r"\{\{job\.parameters\.\w+\}\}", "", a) for a in rebuild][4:])
    build_training_set.check_rebuild_args(args)  # the rebuild job passes no build flag
    assert [v.name for v in request.views] == list(load_settings("prod", PROJECT_ROOT / "conf").views)
