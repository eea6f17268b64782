"""Build a point-in-time-correct training set into a Delta table, as an MLflow run; or rebuild one
from a run (same inputs by Delta time travel, same content hash).

Usage: spark-submit jobs/build_training_set.py --env local --output fraud_v1 \\
           --spine labeled-transactions --label-cutoff 2026-11-22T00:00:00Z \\
           [--spine-from 2026-11-01 --spine-to 2026-11-21] [--views account_velocity,merchant_hourly] \\
           [--features account_velocity.count_1h,merchant_hourly.count] [--max-age account_velocity=1d] \\
           [--mode as_corrected|as_served] [--tracking-uri URI]
       spark-submit jobs/build_training_set.py --env local --spine delta --spine-path /data/spine \\
           --timestamp-column ts --output churn_v2 [--join-key account_velocity=acct]
       spark-submit jobs/build_training_set.py --env local --from-run <mlflow run id> [--output-path PATH]
       (console script: fp-build-training-set)

Exit codes: 0 built; 2 bad arguments or configuration; 3 an input cannot be read (missing table,
vacuumed version, unknown run); 1 any other failure, including the leakage guard and a rebuild
whose content hash differs (nothing is written then). The last line on stderr is the reason.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from datetime import datetime, timezone

from pipelines.core.cli import (
    add_settings_arguments,
    configure_logging,
    run_job,
    settings_from_args,
    views_from_args,
)
from pipelines.core.errors import ConfigError
from pipelines.core.session import build_session
from pipelines.core.times import parse_duration
from pipelines.core.view_spec import FILE_FORMATS
from pipelines.training.build import TrainingSetRequest, build_training_set, rebuild_from_run
from pipelines.training.join import DEFAULT_MODE, MODES, view_request
from pipelines.training.spines import SOURCES, SpineSpec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-build-training-set", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_arguments(parser)
    parser.add_argument("--output", help="training table name: <storage.root>/training/<name>")
    parser.add_argument("--output-path", help="write the training table here instead (any Delta path)")
    parser.add_argument("--spine", choices=SOURCES, help="where the examples come from (default: labeled-transactions)")
    parser.add_argument("--spine-path", help="delta / files spine: its path")
    parser.add_argument("--spine-format", choices=FILE_FORMATS, help="files spine: format (default: parquet)")
    parser.add_argument("--spine-version", type=int, help="delta spine: read this version (default: current)")
    parser.add_argument("--timestamp-column", help="the spine's timestamp column (default: event_time)")
    parser.add_argument("--label-cutoff", help="ISO time, or 'now': labels known after it are not used (required "
                                               "for labeled-transactions; 'now' is resolved once and logged)")
    parser.add_argument("--label-time-column", help="delta / files spine: when each row's label became known")
    parser.add_argument("--spine-from", help="labeled-transactions: first transaction day (YYYY-MM-DD, included)")
    parser.add_argument("--spine-to", help="labeled-transactions: day after the last one (excluded)")
    parser.add_argument("--views", help="comma-separated views from conf/features (default: every computed view; "
                        "an attributes view joins its table's history)")
    parser.add_argument("--features", help="comma-separated view.feature; a view not named here gets all its features")
    parser.add_argument("--max-age", action="append", metavar="VIEW=DURATION",
                        help="override a view's max_age, e.g. account_velocity=1d (repeatable)")
    parser.add_argument("--join-key", action="append", metavar="VIEW=COLUMN",
                        help="the spine column holding a view's entity when it is named differently (repeatable)")
    parser.add_argument("--mode", choices=MODES,
                        help=f"as_corrected: every value Delta holds now; as_served: only values computed by "
                             f"each example's time (default: {DEFAULT_MODE})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, then mlflow.tracking_uri)")
    parser.add_argument("--from-run", metavar="RUN_ID",
                        help="rebuild what this MLflow run built (beside its table, or at --output/--output-path)")
    return parser.parse_args(argv)


#: What a build is made of: a rebuild takes all of it from its run, so none may be given with it.
BUILD_FLAGS = ("spine", "spine_path", "spine_format", "spine_version", "timestamp_column", "label_cutoff",
               "label_time_column", "spine_from", "spine_to", "views", "features", "max_age", "join_key", "mode")


def check_rebuild_args(args: argparse.Namespace) -> None:
    given = [f"--{name.replace('_', '-')}" for name in BUILD_FLAGS if getattr(args, name) not in (None, "", [])]
    if given:
        raise ConfigError(f"--from-run: rebuilds exactly what the run built; do not also give {', '.join(given)}")


def _assignments(values: list[str], flag: str, views: list[str]) -> dict[str, str]:
    result = {}
    for item in values:
        view, sep, value = item.partition("=")
        if not sep or not value:
            raise ConfigError(f"{flag}: {item!r} is not VIEW=VALUE")
        if view not in views:
            raise ConfigError(f"{flag}: {view!r} is not one of the requested views ({', '.join(views)})")
        result[view] = value
    return result


def request_from_args(args: argparse.Namespace, settings) -> TrainingSetRequest:
    """The training-set request the arguments describe, checked (ConfigError names the flag)."""
    if not args.output and not args.output_path:
        raise ConfigError("--output: name the training table (or give --output-path)")
    views = views_from_args(args.views, settings, attributes=True)
    names = [v.name for v in views]
    features: dict[str, list[str]] = {}
    for item in (args.features or "").split(","):
        if item.strip():
            view, sep, feature = item.strip().partition(".")
            if not sep or view not in names:
                raise ConfigError(f"--features: {item.strip()!r} is not view.feature of a requested view ({', '.join(names)})")
            features.setdefault(view, []).append(feature)
    ages = {v: parse_duration(d, f"--max-age {v}")
            for v, d in _assignments(args.max_age or [], "--max-age", names).items()}
    keys = _assignments(args.join_key or [], "--join-key", names)
    cutoff = args.label_cutoff
    if cutoff == "now":  # pinned here: a rebuild must use this instant, not its own "now"
        cutoff = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    spine = SpineSpec(source=args.spine or "labeled-transactions", path=args.spine_path,
                      format=args.spine_format or "parquet", version=args.spine_version,
                      timestamp_column=args.timestamp_column or "event_time", label_time_column=args.label_time_column,
                      label_cutoff=cutoff, from_day=args.spine_from, to_day=args.spine_to)
    request = TrainingSetRequest(
        name=args.output or re.sub(r"[^A-Za-z0-9_-]", "_", args.output_path.rstrip("/").rsplit("/", 1)[-1]),
        spine=spine,
        views=tuple(view_request(v, features.get(v.name), ages.get(v.name), keys.get(v.name)) for v in views),
        mode=args.mode or DEFAULT_MODE, output_path=args.output_path,
    )
    request.check()
    return request


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        if args.from_run is not None:
            check_rebuild_args(args)
            if not args.from_run.strip():
                raise ConfigError("--from-run: give the MLflow run id of the build to rebuild")
            result = rebuild_from_run(build_session(settings.spark), settings, args.from_run, args.tracking_uri,
                                      args.output_path or (args.output and settings.storage.training_path(args.output)))
        else:
            request = request_from_args(args, settings)
            result = build_training_set(build_session(settings.spark), settings, request, args.tracking_uri)
        print(f"training set: {result.rows} rows -> {result.path} (version {result.version}); "
              f"MLflow run {result.run_id}; content hash {result.content_hash}")
        return 0

    return run_job("build_training_set", run)


if __name__ == "__main__":
    sys.exit(main())
