"""Change data capture: each change-event topic of ``cdc.tables`` (Debezium's, from the database's
write-ahead log) into bronze, the dead-letter table, and the table's current and history Delta
tables, exactly once.

Usage: spark-submit jobs/cdc.py --env local [--topics cdc.public.accounts] [--available-now] [--timeout 600]
       (console script: fp-cdc; the connector is registered by `python -m pipelines.local up`, or
       by your Kafka Connect deployment)
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.cdc.stream import run_cdc
from pipelines.core.cli import add_settings_arguments, configure_logging, run_job, settings_from_args
from pipelines.core.session import build_session


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-cdc", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--topics", nargs="+", help="change-event topics (default: those of cdc.tables)")
    parser.add_argument("--available-now", action="store_true", help="process what the topics hold, then stop")
    parser.add_argument("--timeout", type=float, help="stop gracefully after this many seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        return run_cdc(build_session(settings.spark), settings, args.topics, args.available_now, args.timeout)

    return run_job("cdc", run)


if __name__ == "__main__":
    sys.exit(main())
