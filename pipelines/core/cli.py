"""What every job's command line shares: --env/--conf-dir/--set and logging set-up."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pipelines.core.config import parse_overrides
from pipelines.core.errors import ConfigError, PipelineError
from pipelines.core.prometheus import serve_metrics
from pipelines.core.settings import ENVIRONMENTS, Settings, load_settings
from pipelines.core.view_spec import FeatureView


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", default="local", choices=ENVIRONMENTS, help="environment (default: local)")
    parser.add_argument("--conf-dir", help="configuration folder (default: the project's conf/)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. ingest.max_offsets_per_trigger=5000 (repeatable)")


def add_metrics_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics on this port (default: monitoring.metrics_port; none if unset)")


def serve_job_metrics(args: argparse.Namespace, settings: Settings) -> None:
    """The job's Prometheus endpoint, on ``--metrics-port`` or ``monitoring.metrics_port`` (none
    if neither is set)."""
    port = args.metrics_port if args.metrics_port is not None else settings.monitoring.metrics_port
    if port is not None:
        if not 0 < port < 65536:
            raise ConfigError(f"--metrics-port: {port} is not a port")
        serve_metrics(port, settings.monitoring.metrics_host)


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


def views_from_args(text: str | None, settings: Settings, attributes: bool = False) -> list[FeatureView]:
    """``--views a,b`` -> the feature views, each declared in conf/features; default: every
    computed view. An attributes view is refused (fp-cdc keeps it, no feature job computes it)
    unless ``attributes`` (a job that reads views, such as a training-set build, may name one)."""
    computed = settings.computed_views
    names = [v.strip() for v in (text or "").split(",") if v.strip()] or list(computed)
    unknown = [n for n in names if n not in settings.views]
    if unknown:
        raise ConfigError(f"--views: {', '.join(unknown)} not declared in conf/features ({', '.join(computed)})")
    kept = [] if attributes else [n for n in names if n not in computed]
    if kept:
        raise ConfigError(f"--views: {', '.join(kept)}: attributes views are kept by fp-cdc, not computed "
                          f"({', '.join(computed)})")
    return [settings.views[n] for n in names]


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    # One line per schema-registry request otherwise.
    logging.getLogger("httpx2").setLevel(logging.WARNING)


def run_job(name: str, body: Callable[[], int]) -> int:
    """Run a job's ``body`` and turn its failure into an exit code and a one-line reason on
    stderr (the last line, for schedulers that show only that): a
    :class:`~pipelines.core.errors.PipelineError`'s own ``exit_code`` (2 bad arguments or
    configuration, 3 a source, ...), 1 anything else (with the traceback logged before the
    reason)."""
    try:
        return body()
    except PipelineError as exc:
        code, reason = exc.exit_code, str(exc)
    except Exception as exc:  # noqa: BLE001 - a scheduled job reports every failure as one line
        logging.getLogger(name).exception("%s failed", name)
        code, reason = 1, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    print(f"{name}: error: {reason}", file=sys.stderr)
    return code
