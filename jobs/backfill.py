"""Recompute feature views over whole UTC days from Kafka (replayed offsets), bronze (optionally
time-travelled) or files, and replace exactly those days of their feature tables.

Usage: spark-submit jobs/backfill.py --env local --from 2026-11-01 --to 2026-11-08 [--views account_velocity]
           [--source bronze [--bronze-version N | --bronze-timestamp TS]]
           [--source kafka [--starting-offsets earliest|JSON|TIMESTAMP] [--ending-offsets latest|JSON|TIMESTAMP]
            [--allow-gap]]
           [--source files --path PATH --format parquet|csv|json [--map field=column ...]]
           [--restate-online]
       (console script: fp-backfill)

Exit codes: 0 done; 2 bad arguments or configuration; 3 source missing or unreadable; 4 Kafka
offsets no longer in the topic (retention; --allow-gap proceeds with the gap logged); 1 any
other failure. The last line on stderr is the one-line reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime

from pipelines.batch.backfill import DayRange, backfill
from pipelines.batch.sources import BronzeSnapshot, FileSource, KafkaReplay
from pipelines.core.cli import (
    add_settings_arguments,
    configure_logging,
    run_job,
    settings_from_args,
    views_from_args,
)
from pipelines.core.errors import BadSourceArguments
from pipelines.core.session import build_session
from pipelines.core.times import parse_duration, parse_instant


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-backfill", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--from", dest="start", required=True, help="first UTC day (YYYY-MM-DD), inclusive")
    parser.add_argument("--to", dest="end", required=True, help="last UTC day, exclusive")
    parser.add_argument("--views", help="comma-separated views from conf/features (default: all)")
    parser.add_argument("--source", choices=("bronze", "kafka", "files"), default="bronze")
    parser.add_argument("--bronze-version", type=int, help="bronze: read this Delta version")
    parser.add_argument("--bronze-timestamp",
                        help="bronze: read the table as of this time (ISO-8601, UTC unless it has an offset; the "
                             "latest version committed at or before it)")
    parser.add_argument("--starting-offsets", default="earliest",
                        help='kafka: earliest (default), {"topic": {"0": 42, "1": "2026-11-20T00:00Z"}} '
                             '(offsets, -2 earliest, or per-partition timestamps) or one ISO timestamp')
    parser.add_argument("--ending-offsets", default="latest",
                        help='kafka: latest (default), {"topic": {"0": 99}} (-1 latest) or an ISO timestamp; exclusive')
    parser.add_argument("--allow-gap", action="store_true",
                        help="kafka: replay from the earliest offset still there when the requested ones were "
                             "deleted by retention, logging the gap, instead of failing")
    parser.add_argument("--path", help="files: the folder or file")
    parser.add_argument("--format", default="parquet", help="files: parquet (default), csv or json")
    parser.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                        help="files: contract field FIELD is the file's COLUMN (repeatable)")
    parser.add_argument("--restate-online", action="store_true",
                        help="also write each entity's latest recomputed row to Redis (higher version)")
    parser.add_argument("--session-history", default="1d",
                        help="history a session view reads before --from (default 1d)")
    return parser.parse_args(argv)


def _bound(text: str) -> str | datetime:
    """An offsets bound: earliest/latest/JSON as given, anything else an ISO timestamp."""
    if text in ("earliest", "latest") or text.lstrip().startswith("{"):
        return text
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadSourceArguments(f"offsets {text!r}: not earliest, latest, JSON or an ISO timestamp") from exc
    if moment.tzinfo is None:
        raise BadSourceArguments(f"offsets {text!r}: a timestamp needs its UTC offset (e.g. 2026-11-20T00:00Z)")
    return moment


def source_from_args(args: argparse.Namespace) -> KafkaReplay | BronzeSnapshot | FileSource:
    if args.source == "kafka":
        return KafkaReplay(_bound(args.starting_offsets), _bound(args.ending_offsets), args.allow_gap)
    if args.source == "files":
        if not args.path:
            raise BadSourceArguments("--source files needs --path")
        mapping = {}
        for item in args.map:
            field, sep, column = item.partition("=")
            if not sep or not field.strip() or not column.strip():
                raise BadSourceArguments(f"--map {item!r}: expected FIELD=COLUMN")
            mapping[field.strip()] = column.strip()
        return FileSource(args.path, args.format, mapping)
    if args.bronze_version is not None and args.bronze_timestamp:
        raise BadSourceArguments("--bronze-version and --bronze-timestamp exclude each other")
    timestamp = parse_instant(args.bronze_timestamp, "--bronze-timestamp") if args.bronze_timestamp else None
    return BronzeSnapshot(args.bronze_version, timestamp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)

    def run() -> int:
        settings = settings_from_args(args)
        views = views_from_args(args.views, settings)
        days = DayRange.parse(args.start, args.end)
        source = source_from_args(args)
        session_history = parse_duration(args.session_history, "--session-history")
        spark = build_session(settings.spark)
        backfill(spark, settings, views, [days], source, args.restate_online, session_history)
        return 0

    return run_job("backfill", run)


if __name__ == "__main__":
    sys.exit(main())
