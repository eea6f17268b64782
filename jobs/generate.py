"""Produce realistic transactions and fraud labels to Kafka, with late, out-of-order, duplicate
and bad records injected at configurable rates; prints (and optionally writes) what it sent.
Topics whose contract has ``format: avro`` get Confluent-framed Avro (the contract's schema must
be registered: ``fp-contracts register``), the others JSON.

Usage: python jobs/generate.py --env local --count 10000 [--seed 7] [--summary-file sent.json]
       (console script: fp-generate)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from datetime import datetime
from pathlib import Path

from pipelines.core.cli import add_settings_arguments, configure_logging, run_job, settings_from_args
from pipelines.core.errors import ConfigError
from pipelines.core.times import parse_duration
from pipelines.local.appdb import APP_ROLE
from pipelines.local.generator import (
    ALL_ERROR_CLASSES,
    AccountsTableWriter,
    AvroEncoder,
    GeneratorSpec,
    generate,
    produce,
)
from pipelines.local.platform import LocalPlatform


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fp-generate", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--count", type=int, default=10_000, help="transactions to generate")
    parser.add_argument("--duration", help="with --rate: send for this long (e.g. 10m) instead of --count")
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7, help="same seed and --end: same records")
    parser.add_argument("--end", type=datetime.fromisoformat,
                        help="event time of the last transaction, ISO-8601 with offset (default: now)")
    parser.add_argument("--span", default="2d", help="event time the transactions cover (default: 2d)")
    parser.add_argument("--rate", type=float, default=0.0, help="records/s to send (default: unthrottled)")
    parser.add_argument("--late-rate", type=float, default=0.02)
    parser.add_argument("--out-of-order-rate", type=float, default=0.05)
    parser.add_argument("--duplicate-rate", type=float, default=0.01)
    parser.add_argument("--bad-rate", type=float, default=0.02, help="split evenly over --bad-classes")
    parser.add_argument("--bad-classes", default=",".join(ALL_ERROR_CLASSES),
                        help="comma-separated error classes to inject (default: every class the "
                             "topic's format can have)")
    parser.add_argument("--label-rate", type=float, default=0.2)
    parser.add_argument("--account-change-rate", type=float, default=0.0,
                        help="per transaction: a change of its account in the local platform's accounts table "
                             "follows (inserts before first use, updates, deletes; default 0: no table writes)")
    parser.add_argument("--transactions-topic", default="transactions", help="topic for transactions")
    parser.add_argument("--labels-topic", default="labels", help="topic for labels")
    parser.add_argument("--summary-file", type=Path, help="write the summary as JSON here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(logging.INFO)
    return run_job("generate", lambda: generate_and_send(args))


def generate_and_send(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        count = args.count
        if args.duration is not None:
            if args.rate <= 0:
                raise ValueError("--duration needs --rate (records per second)")
            count = int(args.rate * parse_duration(args.duration, "--duration").total_seconds())
        if args.end is not None and args.end.tzinfo is None:
            raise ValueError("--end: give a UTC offset, e.g. 2026-11-23T10:00:00+00:00")
        topic_names = {"transactions": args.transactions_topic, "labels": args.labels_topic}
        # Each logical topic's contract: its physical topic's if declared, else its own.
        contracts = {logical: settings.contract_for(physical if physical in settings.kafka.topics else logical)
                     for logical, physical in topic_names.items()}
        avro = {t: c for t, c in contracts.items() if c.format == "avro"}
        spec = GeneratorSpec(
            count=count, accounts=args.accounts, merchants=args.merchants, seed=args.seed,
            end=args.end, span=parse_duration(args.span, "--span"), rate=args.rate,
            late_rate=args.late_rate, out_of_order_rate=args.out_of_order_rate,
            duplicate_rate=args.duplicate_rate, bad_rate=args.bad_rate,
            bad_classes=tuple(c for c in args.bad_classes.split(",") if c),
            label_rate=args.label_rate, account_change_rate=args.account_change_rate,
            avro_topics=frozenset(t for t, contract in contracts.items() if contract.format == "avro"),
            max_event_age=settings.ingest.max_event_age,
            future_tolerance=settings.ingest.future_tolerance,
            max_value_bytes=settings.ingest.max_value_bytes,
        )
    except ValueError as exc:  # GeneratorSpec checks its rates and classes
        raise ConfigError(str(exc)) from exc
    encoder = AvroEncoder(settings.schema_registry, avro, topic_names) if avro else None
    if spec.account_change_rate and settings.local is None:
        raise ConfigError(f"--account-change-rate: writes the local platform's accounts table, and environment "
                          f"{settings.env!r} has no local section")
    database = (LocalPlatform(settings.local).postgres.connect(settings.cdc.database.dbname, APP_ROLE)
                if spec.account_change_rate else contextlib.nullcontext())
    with database as connection:
        summary = produce(generate(spec), settings.kafka.producer_properties(), rate=args.rate,
                          topic_names=topic_names, encoder=encoder,
                          accounts_table=AccountsTableWriter(connection) if spec.account_change_rate else None)
    print(summary.table())
    if args.summary_file:
        args.summary_file.parent.mkdir(parents=True, exist_ok=True)
        args.summary_file.write_text(json.dumps(summary.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
