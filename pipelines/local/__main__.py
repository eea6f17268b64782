"""Start, check and stop the embedded local platform (Kafka in KRaft mode and Redis on loopback).

Usage: python -m pipelines.local up|down|status|reset [--env local] [--set local.kafka_port=19092]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys

from pipelines.config import ConfigError, load_settings, parse_overrides
from pipelines.kafka_admin import ensure_topics, platform_topics
from pipelines.local.platform import LocalPlatform, PlatformError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.local", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "reset"],
                        help="up: start and create topics (idempotent); down: stop; status: what runs "
                             "where; reset: stop and delete the broker and Redis data")
    parser.add_argument("--env", default="local", help="environment whose 'local' section to use")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = load_settings(args.env, overrides=parse_overrides(args.set))
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
        elif args.command == "down":
            platform.down()
        elif args.command == "reset":
            platform.down()
            for service in (platform.kafka, platform.redis):
                shutil.rmtree(service.root, ignore_errors=True)
        for status in platform.status():
            print(status.line())
    except PlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
