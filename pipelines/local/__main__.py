"""Start, check and stop the embedded local platform (Kafka in KRaft mode, Redis, the schema
registry, and PostgreSQL with a Kafka Connect worker running Debezium, on loopback).

Usage: python -m pipelines.local up|down|status|reset [--env local] [--set local.kafka_port=19092]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys

from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args
from pipelines.core.errors import ConfigError
from pipelines.core.kafka_admin import ensure_topics, platform_topics
from pipelines.local.platform import LocalPlatform, PlatformError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.local", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "reset", "snapshot"],
                        help="up: start and create topics (idempotent); down: stop; status: what runs "
                             "where; reset: stop and delete the broker's (and so the registry's and "
                             "the connector's offsets), Redis's and PostgreSQL's data; snapshot: ask the "
                             "connector to read the --tables again (a blocking ad-hoc snapshot)")
    parser.add_argument("--tables", nargs="+", help="snapshot: schema.table of cdc.tables (default: all of them)")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.local is None:
        print(f"error: environment {args.env!r} has no 'local' section: nothing to run here", file=sys.stderr)
        return 2
    platform = LocalPlatform(settings.local)
    try:
        if args.command == "up":
            platform.up()
            created = ensure_topics(settings.kafka.client_properties(), platform_topics(settings.kafka))
            print(f"topics created: {', '.join(created) or 'none (all exist)'}")
            if platform.with_cdc:
                platform.start_cdc(settings.cdc)
        elif args.command == "down":
            platform.down()
        elif args.command == "snapshot":
            print(f"signal {platform.request_snapshot(settings.cdc, args.tables or settings.cdc.tables)} sent")
        elif args.command == "reset":
            platform.down()
            # The broker's data (and so the connector's offsets) and PostgreSQL's (and so its
            # replication slot) go together: one without the other is a gap or a replay.
            for service in platform.all_services:
                shutil.rmtree(service.root, ignore_errors=True)
        for status in platform.status():
            print(status.line())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
