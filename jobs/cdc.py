"""Change data capture: each change-event topic of ``cdc.tables`` (Debezium's, from the database's
write-ahead log) into bronze, the dead-letter table, and the table's current and history Delta
tables, exactly once.

Usage: spark-submit jobs/cdc.py --env local [--topics cdc.public.accounts] [--available-now] [--timeout 600]
       spark-submit jobs/cdc.py --env local --rebuild-from history|bronze [--topics ...]  (fp-cdc stopped)
       (console script: fp-cdc; the connector is registered by `python -m pipelines.local up`, or
       by your Kafka Connect deployment)
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.cdc.stream import REBUILD_SOURCES, change_topics, rebuild_tables, run_cdc
from pipelines.core.cli import (
    add_metrics_argument,
    add_settings_arguments,
    configure_logging,
    run_job,
    serve_job_metrics,
    settings_from_args,
)
from pipelines.core.session import build_session


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-cdc", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    add_metrics_argument(parser)
    parser.add_argument("--topics", nargs="+", help="change-event topics (default: those of cdc.tables)")
    parser.add_argument("--available-now", action="store_true", help="process what the topics hold, then stop")
    parser.add_argument("--timeout", type=float, help="stop gracefully after this many seconds")
    parser.add_argument("--rebuild-from", choices=REBUILD_SOURCES,
                        help="rewrite the current table from the history, or the current and history tables "
                             "from bronze, then stop (run it while fp-cdc is stopped)")
    args = parser.parse_args(argv)
    if args.rebuild_from and (args.available_now or args.timeout is not None):
        parser.error("--rebuild-from runs once and stops: it takes neither --available-now nor --timeout")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        serve_job_metrics(args, settings)
        if args.rebuild_from:
            spark = build_session(settings.spark)
            for topic in change_topics(settings, args.topics):
                rebuild_tables(spark, settings, topic, args.rebuild_from)
            return 0
        return run_cdc(build_session(settings.spark), settings, args.topics, args.available_now, args.timeout)

    return run_job("cdc", run)


if __name__ == "__main__":
    sys.exit(main())
