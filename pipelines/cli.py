"""What every job's command line shares: --env/--conf-dir/--set and logging set-up."""

from __future__ import annotations

import argparse
import logging

from pipelines.config import ENVIRONMENTS, ConfigError, Settings, load_settings, parse_overrides


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", default="local", choices=ENVIRONMENTS, help="environment (default: local)")
    parser.add_argument("--conf-dir", help="configuration folder (default: the project's conf/)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. ingest.max_offsets_per_trigger=5000 (repeatable)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The validated settings the arguments ask for; raises ConfigError naming key and reason."""
    return load_settings(args.env, args.conf_dir, parse_overrides(args.set))


def topics_from_args(text: str | None, settings: Settings) -> list[str]:
    """``--topics a,b`` -> the topics, each declared under kafka.topics; default ingest.topics."""
    topics = [t.strip() for t in (text or "").split(",") if t.strip()] or list(settings.ingest.topics)
    unknown = [t for t in topics if t not in settings.kafka.topics]
    if unknown:
        raise ConfigError(f"--topics: {', '.join(unknown)} not declared under kafka.topics")
    return topics


def views_from_args(text: str | None, settings: Settings) -> list:
    """``--views a,b`` -> the feature views, each declared in conf/features; default: all."""
    names = [v.strip() for v in (text or "").split(",") if v.strip()] or list(settings.views)
    unknown = [n for n in names if n not in settings.views]
    if unknown:
        raise ConfigError(f"--views: {', '.join(unknown)} not declared in conf/features ({', '.join(settings.views)})")
    return [settings.views[n] for n in names]


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
