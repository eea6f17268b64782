"""Read feature values from the Redis online store: one row per entity, with the event time
and age of each value; missing or expired entities print as nulls.

Usage: python jobs/online.py get --env local --view account_velocity --entity acct-000001,acct-000002 [--json]
       (console script: fp-online)
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.core.cli import add_settings_arguments, run_job, settings_from_args
from pipelines.core.errors import ConfigError
from pipelines.online.serving import get_online_features


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-online", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["get"])
    add_settings_arguments(parser)
    parser.add_argument("--view", required=True, help="a view from conf/features")
    parser.add_argument("--entity", required=True, help="comma-separated entity ids")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job("online", lambda: print_online(args))


def print_online(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.view not in settings.views:
        raise ConfigError(f"--view: {args.view!r} is not declared in conf/features ({', '.join(settings.views)})")
    entities = [e.strip() for e in args.entity.split(",") if e.strip()]
    rows = get_online_features(settings, args.view, entities)
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
        return 0
    columns = list(rows[0]) if rows else []
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
