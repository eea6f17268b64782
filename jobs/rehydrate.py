"""Rebuild the Redis online store from the Delta feature tables (latest row per entity per
view, same keys, versions and remaining TTLs). Idempotent: safe to run again.

Usage: spark-submit jobs/rehydrate.py --env local [--views account_velocity,merchant_hourly]
       (console script: fp-rehydrate)

Exit codes: 0 done; 2 bad arguments or configuration; 3 a feature table is missing (the other
views are restored first); 1 any
other failure (Redis unreachable after retries, ...). The last line on stderr is the reason.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.batch.rehydrate import rehydrate
from pipelines.core.cli import (
    add_settings_arguments,
    configure_logging,
    run_job,
    settings_from_args,
    views_from_args,
)
from pipelines.core.session import build_session


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-rehydrate", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--views", help="comma-separated views from conf/features (default: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        views = views_from_args(args.views, settings)
        rehydrate(build_session(settings.spark), settings, views)
        return 0

    return run_job("rehydrate", run)


if __name__ == "__main__":
    sys.exit(main())
