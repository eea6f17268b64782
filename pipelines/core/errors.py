"""The platform's exceptions: one family, each member carrying the exit code a job reports for it.

Every job turns a :class:`PipelineError` into its ``exit_code`` and a one-line reason
(:func:`pipelines.core.cli.run_job`); anything else (a streaming query's failure among them) is
a bug or an outage and exits 1 with its traceback logged. The codes, as the README's job table
documents them:

==== ==========================================================================================
0    success
1    a failure of the work itself: the leakage guard, a rebuild that differs, Redis down after
     every retry, the local platform not starting, any unexpected error
2    bad arguments or configuration (:class:`ConfigError`, :class:`BadSourceArguments`)
3    an input that is missing, unreadable or short (:class:`SourceError`), a registry that
     cannot be reached
4    Kafka offsets deleted by retention (:class:`OffsetsOutOfRetention`)
==== ==========================================================================================

Stage-specific errors live beside the code that raises them and derive from
:class:`PipelineError` (e.g. :class:`pipelines.training.join.LeakageError`).
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the platform raises on purpose; ``exit_code`` is what a job exits with."""

    exit_code = 1


class ConfigError(PipelineError, ValueError):
    """Invalid configuration or arguments; the message names the source, the key path (or flag)
    and the reason."""

    exit_code = 2


class SourceError(PipelineError):
    """An input cannot be read as asked (no table, a vacuumed version, a missing column, an
    unreachable broker); the message is the one-line reason."""

    exit_code = 3


class BadSourceArguments(SourceError):
    """The arguments describing a source are wrong (a bad day, offsets past the end)."""

    exit_code = 2


class OffsetsOutOfRetention(SourceError):
    """Kafka offsets a replay asks for were deleted by retention."""

    exit_code = 4


class MissingJarsError(PipelineError):
    """The JVM jars a session or the local platform needs were never fetched (or Maven failed)."""
