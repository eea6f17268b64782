"""Find the events that reached bronze after the stream's watermark had passed them (since the
previous run), recompute the days of feature rows they change, and restate Redis.

Usage: spark-submit jobs/recompute_late.py --env local [--views account_velocity,merchant_hourly]
       (console script: fp-recompute-late; schedule it, e.g. hourly)

Progress per view goes to ``<storage.root>/ops/late_recompute``, so each run starts where the
previous one ended. Exit codes: 0 done (also when nothing was late); 2 bad arguments or
configuration; 3 a source problem (a bronze table missing, a session longer than
--session-history: the views concerned keep their cursor and are retried by the next run, the
others go on); 1 any other failure. The last line on stderr is the reason.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.batch.late import recompute_late
from pipelines.core.cli import (
    add_settings_arguments,
    configure_logging,
    run_job,
    settings_from_args,
    views_from_args,
)
from pipelines.core.session import build_session
from pipelines.core.times import parse_duration


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-recompute-late", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--views", help="comma-separated views from conf/features (default: all)")
    parser.add_argument("--session-history", default="1d",
                        help="history a session view reads before a recomputed day (default 1d)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        views = views_from_args(args.views, settings)
        session_history = parse_duration(args.session_history, "--session-history")
        recompute_late(build_session(settings.spark), settings, views, session_history)
        return 0

    return run_job("recompute-late", run)


if __name__ == "__main__":
    sys.exit(main())
