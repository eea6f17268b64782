"""The live path: each valid event's effect on the online views in Redis within a second, beside
the durable path (fp-ingest + fp-features), which restates every value it computes.

Usage: spark-submit jobs/live.py --env local [--views account_velocity] [--available-now] [--timeout 600]
       (console script: fp-live)
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
from pipelines.features.live_stream import live_views, realtime_session_settings, run_live, source_partitions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-live", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    add_metrics_argument(parser)
    parser.add_argument("--views", help="comma-separated views from conf/features (default: all served online)")
    parser.add_argument("--available-now", action="store_true",
                        help="validate and apply what Kafka holds now, then stop (micro-batches, not real-time mode)")
    parser.add_argument("--timeout", type=float, help="stop gracefully after this many seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        serve_job_metrics(args, settings)
        views = views_from_args(args.views, settings)
        overrides = {}
        if not args.available_now:  # real-time mode: a task slot per partition of the live topics, and a spare
            partitions = source_partitions(settings, list(live_views(settings, views)))
            overrides = realtime_session_settings(settings.spark.master, sum(partitions.values()))
        spark = build_session(settings.spark, overrides)
        return run_live(spark, settings, views, args.timeout, args.available_now)

    return run_job("live", run)


if __name__ == "__main__":
    sys.exit(main())
