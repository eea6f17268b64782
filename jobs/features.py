"""Compute the configured feature views from the bronze tables into their Delta feature tables
and the Redis online store, exactly once (one streaming query per view).

Usage: spark-submit jobs/features.py --env local [--views account_velocity,merchant_hourly] [--available-now]
       (console script: fp-features)
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.core.cli import (
    add_metrics_argument,
    add_settings_arguments,
    configure_logging,
    run_job,
    serve_job_metrics,
    settings_from_args,
    views_from_args,
)
from pipelines.core.session import build_session
from pipelines.features.stream import run_features


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-features", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    add_metrics_argument(parser)
    parser.add_argument("--views", help="comma-separated views from conf/features (default: all)")
    parser.add_argument("--available-now", action="store_true",
                        help="process what is in bronze now, then stop")
    parser.add_argument("--timeout", type=float, help="stop gracefully after this many seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        serve_job_metrics(args, settings)
        views = views_from_args(args.views, settings)
        spark = build_session(settings.spark)
        return run_features(spark, settings, views, args.available_now, args.timeout)

    return run_job("features", run)


if __name__ == "__main__":
    sys.exit(main())
