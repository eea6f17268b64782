"""Recompute a served model's drift and quality into ops/feature_drift and ops/model_quality.

Drift: PSI per model version, hour and feature against its training set (the reference profile
logged with its run). Quality: precision/recall at scoring.threshold and AUC per version and day,
from the labels known now. A rerun replaces its range.

Usage: spark-submit jobs/model_quality.py --env local [--model fraud] [--from 2026-11-21T00:00Z] [--to 2026-11-23T00:00Z]
           [--tracking-uri URI]
       (console script: fp-model-quality; run it hourly: a rerun replaces its range, labels arrive late)

Exit codes: 0 done; 2 bad arguments or configuration (no predictions table for the model, a model
version without its reference profile); 1 any other failure. The last line on stderr is the reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timedelta, timezone

import mlflow

from pipelines.core.cli import add_settings_arguments, configure_logging, run_job, settings_from_args
from pipelines.core.errors import ConfigError
from pipelines.core.session import build_session
from pipelines.core.settings import Settings
from pipelines.core.times import parse_instant
from pipelines.scoring.model import parse_model_uri
from pipelines.scoring.monitoring import LARGE_PSI, MonitoringRange, refresh_monitoring
from pipelines.training.build import tracking_uri

log = logging.getLogger("model_quality")

DEFAULT_SPAN = timedelta(days=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-model-quality", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--model", help="registered model name (default: the one scoring.model names)")
    parser.add_argument("--from", dest="start",
                        help="first event time (ISO-8601, UTC unless it has an offset; down to its hour); "
                             "default: --to minus 2 days")
    parser.add_argument("--to", dest="end", help="end of the range, exclusive (up to the next hour); default: now")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, then mlflow.tracking_uri)")
    return parser.parse_args(argv)


def model_name(settings: Settings, given: str | None) -> str:
    """``--model``, else the registered model ``scoring.model`` names."""
    if given:
        return given
    name = parse_model_uri(settings.scoring.model)[0] if settings.scoring.model else None
    if name is None:
        raise ConfigError(f"--model: not given, and scoring.model ({settings.scoring.model}) names no registered model")
    return name


def hours_from_args(args: argparse.Namespace) -> MonitoringRange:
    end = parse_instant(args.end, "--to") if args.end else datetime.now(timezone.utc)
    start = parse_instant(args.start, "--from") if args.start else end - DEFAULT_SPAN
    return MonitoringRange.covering(start, end)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        model, hours = model_name(settings, args.model), hours_from_args(args)
        spark = build_session(settings.spark)
        client = mlflow.MlflowClient(tracking_uri(settings, args.tracking_uri))
        outcome = refresh_monitoring(spark, settings, client, model, hours)
        print(f"model quality {model} versions {', '.join(outcome.versions) or '-'}: drift {hours}: "
              f"{outcome.drift_rows} rows -> {settings.storage.feature_drift_path}; quality {hours.first_day}.."
              f"{hours.end_day - timedelta(days=1)}: {outcome.quality_rows} rows -> {settings.storage.model_quality_path}")
        for version, hour, feature, psi in outcome.large[:10]:
            log.warning("model %s version %s: %s PSI %.2f at %s (> %.2f: a large shift)", model, version, feature, psi,
                        f"{hour:%Y-%m-%dT%H:%MZ}", LARGE_PSI)
        return 0

    return run_job("model_quality", run)


if __name__ == "__main__":
    sys.exit(main())
