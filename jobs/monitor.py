"""Check that the platform keeps up: each ingested topic's lag behind the broker and each feature
view's staleness, against the thresholds of conf (``monitoring``); for cron or a bundle job.

Usage: python jobs/monitor.py check --env local [--views a,b] [--topics t] [--record]
       (console script: fp-monitor). Exit code 0: every measure within its threshold; 1: a
       breach (each named on its line); 2: bad arguments or configuration. No Spark is started.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone

from pipelines.core.cli import add_settings_arguments, configure_logging, run_job, settings_from_args, topics_from_args
from pipelines.core.errors import ConfigError
from pipelines.monitor.check import lag_measures, record_measures, staleness_measures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-monitor", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check"], help="check: measure and compare to the thresholds")
    add_settings_arguments(parser)
    parser.add_argument("--topics", help="comma-separated ingested topics (default: ingest.topics)")
    parser.add_argument("--views", help="comma-separated feature views (default: every computed view not in "
                                        "monitoring.staleness_exempt)")
    parser.add_argument("--record", action="store_true", help="append the measures to ops/monitor_checks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.WARNING)

    def run() -> int:
        settings = settings_from_args(args)
        topics = topics_from_args(args.topics, settings)
        names = [v.strip() for v in (args.views or "").split(",") if v.strip()] or [
            v for v in settings.computed_views if v not in settings.monitoring.staleness_exempt]
        unknown = [n for n in names if n not in settings.computed_views]
        if unknown:
            raise ConfigError(f"--views: {', '.join(unknown)} is not a computed view ({', '.join(settings.computed_views)})")
        checked_at = datetime.now(timezone.utc)
        measures = lag_measures(settings, topics) + staleness_measures(
            settings, [settings.views[n] for n in names], checked_at)
        for measure in measures:
            print(measure.line())
        if args.record:
            record_measures(settings.storage.monitor_checks_path, measures, checked_at)
        breaches = [m for m in measures if m.breached]
        print(f"{len(breaches)} breach{'es' if len(breaches) != 1 else ''} of {len(measures)} measures")
        return 1 if breaches else 0

    return run_job("monitor", run)


if __name__ == "__main__":
    sys.exit(main())
