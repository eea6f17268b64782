"""Reconcile the ingest: records in Kafka = bronze rows + dead-letter rows + duplicates dropped,
per topic, and (with --expect) each count against what the generator sent.

Usage: spark-submit jobs/reconcile.py --env local [--expect .local/runs/sent.json]
       (console script: fp-reconcile). Exit code 0: reconciled; 1: a mismatch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipelines.core.cli import add_settings_arguments, configure_logging, run_job, settings_from_args, topics_from_args
from pipelines.core.errors import ConfigError
from pipelines.core.session import build_session
from pipelines.ingest.reconcile import SentSummary, format_report, reconcile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-reconcile", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--topics", help="comma-separated topics (default: ingest.topics)")
    parser.add_argument("--expect", type=Path, help="generator summary JSON (fp-generate --summary-file)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.WARNING)

    def run() -> int:
        settings = settings_from_args(args)
        topics = topics_from_args(args.topics, settings)
        try:
            sent = SentSummary.read(args.expect) if args.expect else None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--expect: {exc}") from exc
        spark = build_session(settings.spark)
        results = reconcile(spark, settings, topics, sent)
        print(format_report(results))
        return 0 if all(r.ok for r in results) else 1

    return run_job("reconcile", run)


if __name__ == "__main__":
    sys.exit(main())
