"""Stream the configured Kafka topics into the bronze Delta tables, exactly once: valid records
to bronze, invalid ones to the dead-letter table (and <topic>.dlq), duplicates dropped.

Usage: spark-submit jobs/ingest.py --env local [--topics transactions,labels] [--available-now]
       (console script: fp-ingest)
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
    topics_from_args,
)
from pipelines.core.session import build_session
from pipelines.ingest.stream import run_ingest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-ingest", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    add_metrics_argument(parser)
    parser.add_argument("--topics", help="comma-separated subset of ingest.topics (default: all)")
    parser.add_argument("--available-now", action="store_true",
                        help="process what is in the topics now, then stop (backfill/cron style)")
    parser.add_argument("--timeout", type=float, help="stop gracefully after this many seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        serve_job_metrics(args, settings)
        topics = topics_from_args(args.topics, settings)
        spark = build_session(settings.spark)
        return run_ingest(spark, settings, topics, available_now=args.available_now, timeout=args.timeout)

    return run_job("ingest", run)


if __name__ == "__main__":
    sys.exit(main())
