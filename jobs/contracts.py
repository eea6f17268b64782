"""The contract gate: check every Avro contract against the latest registered version of its
subject (``<topic>-value``) and explain what breaks compatibility; ``register`` registers what
passes. Run ``check`` in CI before a producer change ships.

Usage: python jobs/contracts.py check|register --env local [--topics transactions]
       (console script: fp-contracts)
Exit codes: 0 compatible (and registered), 1 incompatible or refused, 2 bad arguments or
configuration, 3 registry unreachable.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.contracts.registry import (
    RegistryUnavailable,
    SchemaRegistry,
    avro_topics,
    check_subject,
    register_subject,
)
from pipelines.core.cli import add_settings_arguments, configure_logging, settings_from_args, topics_from_args
from pipelines.core.errors import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-contracts", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check", "register"],
                        help="check: compare and explain, change nothing; register: set each subject's "
                             "compatibility level from conf, check, register what passes")
    add_settings_arguments(parser)
    parser.add_argument("--topics", help="comma-separated topics (default: every topic under kafka.topics)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.WARNING)
    try:
        settings = settings_from_args(args)
        topics = topics_from_args(args.topics, settings) if args.topics else list(settings.kafka.topics)
        registry = SchemaRegistry(settings.schema_registry) if avro_topics(settings, topics) else None
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    action = register_subject if args.command == "register" else check_subject
    failed = False
    try:
        for topic in topics:
            contract = settings.contract_for(topic)
            if contract.format != "avro":
                print(f"{topic}: contract {contract.name} is {contract.format}: no registry subject, not checked")
                continue
            result = action(registry, settings, topic)
            print(result.report())
            failed |= not result.compatible
    except RegistryUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
