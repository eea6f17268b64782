"""Check that the platform keeps up: each ingested topic's lag behind the broker and dead-letter
rate, each feature view's staleness and the online jobs' latency p99, against the thresholds of
conf (``monitoring``); for cron or a bundle job. Or report the recorded checks as an HTML page.

Usage: python jobs/monitor.py check --env local [--views a,b] [--topics t] [--record]
       python jobs/monitor.py report --env local --output report.html [--since 24h]
       (console script: fp-monitor). Exit code 0: every measure within its threshold (check), the
       page written (report, also when no check is recorded); 1: a breach (each named on its
       line); 2: bad arguments or configuration. No Spark is started.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from pipelines.core.cli import add_settings_arguments, configure_logging, run_job, settings_from_args, topics_from_args
from pipelines.core.errors import ConfigError
from pipelines.core.settings import Settings
from pipelines.core.times import parse_duration
from pipelines.monitor.check import (
    dead_letter_measures,
    lag_measures,
    online_p99_measures,
    record_measures,
    staleness_measures,
)
from pipelines.monitor.report import read_history, render_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-monitor", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check", "report"],
                        help="check: measure and compare to the thresholds; report: plot the recorded checks")
    add_settings_arguments(parser)
    parser.add_argument("--topics", help="check: comma-separated ingested topics (default: ingest.topics)")
    parser.add_argument("--views", help="check: comma-separated feature views (default: every computed view not in "
                                        "monitoring.staleness_exempt)")
    parser.add_argument("--record", action="store_true", help="check: append the measures to ops/monitor_checks")
    parser.add_argument("--output", help="report: the HTML file to write (required)")
    parser.add_argument("--since", help="report: the checks recorded this long ago or later (default 24h)")
    return parser.parse_args(argv)


def check(args: argparse.Namespace, settings: Settings) -> int:
    """Measure, print a line per measure and a summary, record when asked; 1 on any breach."""
    topics = topics_from_args(args.topics, settings)
    names = [v.strip() for v in (args.views or "").split(",") if v.strip()] or [
        v for v in settings.computed_views if v not in settings.monitoring.staleness_exempt]
    unknown = [n for n in names if n not in settings.computed_views]
    if unknown:
        raise ConfigError(f"--views: {', '.join(unknown)} is not a computed view ({', '.join(settings.computed_views)})")
    checked_at = datetime.now(timezone.utc)
    measures = (lag_measures(settings, topics)
                + staleness_measures(settings, [settings.views[n] for n in names], checked_at)
                + dead_letter_measures(settings, topics, checked_at)
                + online_p99_measures(settings, checked_at))
    for measure in measures:
        print(measure.line())
    if args.record:
        record_measures(settings.storage.monitor_checks_path, measures, checked_at)
    breaches = [m for m in measures if m.breached]
    print(f"{len(breaches)} breach{'es' if len(breaches) != 1 else ''} of {len(measures)} measures")
    return 1 if breaches else 0


def report(args: argparse.Namespace, settings: Settings) -> int:
    """Write the report page of the checks recorded in the last ``--since``; 0 (an empty history too)."""
    if not args.output:
        raise ConfigError("--output: required by report (the HTML file to write)")
    window = parse_duration(args.since or "24h", "--since")
    if window.total_seconds() <= 0:
        raise ConfigError(f"--since: {args.since!r} must be positive")
    now = datetime.now(timezone.utc)
    rows = read_history(settings.storage.monitor_checks_path, now - window, now)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_report(rows, now - window, now), encoding="utf-8")
    checks = len({r["checked_at"] for r in rows})
    print(f"{output}: {checks} recorded check{'s' if checks != 1 else ''} since {(now - window).isoformat()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.WARNING)

    def run() -> int:
        # Each command's own options are refused with the other: a typo'd run fails, not half-runs.
        misplaced = ([f"--{k}" for k in ("output", "since") if getattr(args, k)] if args.command == "check" else
                     [f"--{k}" for k in ("topics", "views", "record") if getattr(args, k)])
        if misplaced:
            raise ConfigError(f"{misplaced[0]}: not an option of {args.command}")
        settings = settings_from_args(args)
        return check(args, settings) if args.command == "check" else report(args, settings)

    return run_job("monitor", run)


if __name__ == "__main__":
    sys.exit(main())
