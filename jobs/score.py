"""Streaming scoring: each valid event of ``scoring.topic`` scored with its fresh features (its
own trailing rows from the live path), one prediction per event id to the predictions topic,
exactly once (Kafka transactions), and from it to the Delta table ``predictions/<model>``.

Usage: spark-submit jobs/score.py --env local [--model models:/fraud@champion] [--until-end] [--timeout 600]
       (console script: fp-score; fp-live must run for the topic: it validates and applies the events)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from pipelines.core.cli import (
    add_metrics_argument,
    add_settings_arguments,
    configure_logging,
    run_job,
    serve_job_metrics,
    settings_from_args,
)
from pipelines.core.session import build_session
from pipelines.online.store import redis_client
from pipelines.scoring.stream import run_scoring
from pipelines.training.build import tracking_uri


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-score", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    add_metrics_argument(parser)
    parser.add_argument("--model", help="model URI (default scoring.model), e.g. models:/fraud@champion or runs:/<id>/model")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, then mlflow.tracking_uri)")
    parser.add_argument("--until-end", action="store_true", help="score up to the events topic's end at start, then stop")
    parser.add_argument("--timeout", type=float, help="stop gracefully after this many seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        serve_job_metrics(args, settings)
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda _signum, _frame: stop.set())
        spark = build_session(settings.spark)
        return run_scoring(settings, redis_client(settings.redis), tracking_uri(settings, args.tracking_uri),
                           args.model, args.timeout, args.until_end, stop, spark=spark)

    return run_job("score", run)


if __name__ == "__main__":
    sys.exit(main())
