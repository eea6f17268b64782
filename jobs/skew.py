"""Train/serve skew of one model: the feature vectors fp-score served for events of an event-time
range, against the point-in-time build of the same events (as corrected), per feature: the share
of rows that differ and by how much, to ops/skew/<model> (the differing rows to
ops/skew_rows/<model>), an MLflow run (bar plot, CSV) and stdout.

Usage: spark-submit jobs/skew.py --env local [--model fraud] [--from 2026-12-02T00:00:00Z --to 2026-12-03T00:00:00Z]
       (console script: fp-skew; --from/--to are UTC unless given an offset, default the last day;
       rerunning a range replaces its rows)
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timedelta, timezone

from pipelines.core.cli import add_settings_arguments, configure_logging, run_job, settings_from_args
from pipelines.core.session import build_session
from pipelines.core.times import parse_instant
from pipelines.scoring.skew import DEFAULT_TOLERANCE
from pipelines.scoring.skew_report import SOURCES, default_model, format_summary, run_skew


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-skew", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--model", help="registered model name, as its predictions table is named "
                                        "(default: the model scoring.model names)")
    parser.add_argument("--from", dest="start", help="first event time (ISO-8601, UTC unless an offset is given; "
                                                     "default: --to minus one day)")
    parser.add_argument("--to", dest="end", help="end of the range, excluded (default: now)")
    parser.add_argument("--corrected-from", choices=SOURCES, default="bronze",
                        help="build the corrected vectors from bronze (default: exact) or the feature tables as they stand")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"relative tolerance of numeric comparisons (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, then mlflow.tracking_uri)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        model = args.model or default_model(settings)
        end = parse_instant(args.end, "--to") if args.end else datetime.now(timezone.utc)
        start = parse_instant(args.start, "--from") if args.start else end - timedelta(days=1)
        spark = build_session(settings.spark)
        result = run_skew(spark, settings, model, start, end, args.tracking_uri, args.corrected_from, args.tolerance)
        print(f"skew of {model}, event time {start.isoformat()} .. {end.isoformat()}: {result.predictions} predictions "
              f"(MLflow run {result.run_id})")
        print(format_summary(result.summary) if result.summary else "no predictions in the range")
        if result.skipped:
            print(f"not compared (no feature serves them any more): {', '.join(result.skipped)}")
        return 0

    return run_job("skew", run)


if __name__ == "__main__":
    sys.exit(main())
