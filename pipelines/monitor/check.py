"""``fp-monitor check``: is the platform keeping up? Measured from what the jobs leave behind, not
from the jobs themselves, so that a job that died (or never started) shows as a breach:

* **lag** per ingested topic: the broker's latest offset of each partition minus the end offset
  of the last batch the ingest query *committed* (its checkpoint's ``offsets/<n>`` for the newest
  ``commits/<n>``); a partition the query has never read counts from its earliest offset. Over
  ``monitoring.max_lag`` (all partitions of a topic together) is a breach.
* **staleness** per computed feature view: now minus the newest event time in the view's
  feature table (from the Delta log's per-file statistics: no data file is read). Over
  ``monitoring.max_staleness`` is a breach; a view with no table yet is one too.
* **dead-letter rate** per ingested topic: its rows of the dead-letter table over all the records
  the ingest took from it (bronze rows + dead letters) validated within the last
  ``monitoring.dead_letter_window``, with each error class's count. Over
  ``monitoring.max_dead_letter_rate`` is a breach once the window holds at least
  ``monitoring.min_records_for_rate`` records; fewer are shown, not judged.
* **online p99** of ``fp-live`` (per topic, event -> Redis) and ``fp-score`` (per model, event ->
  prediction): the p99 of the latest report interval they recorded in their ops table that ended
  within ``monitoring.online_window``, against ``monitoring.max_online_p99``. A job with no such
  interval is not measured (a line says so): staleness and lag show a job that stopped.

Nothing here needs Spark: the checkpoint is read through pyarrow's file systems (local, S3, GCS,
HDFS; DBFS through its ``/dbfs`` mount), the Delta tables with delta-rs (the Delta log's statistics,
or only the files whose statistics overlap the window), the offsets with a Kafka client, so it runs
from cron or a bundle job in seconds. Each run's measures can be appended to
``ops/monitor_checks``, the history ``fp-monitor report`` plots.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from pipelines.core.kafka_admin import topic_offsets
from pipelines.core.settings import Settings
from pipelines.core.times import describe_duration
from pipelines.core.view_spec import FeatureView, event_time_column

_BATCH = re.compile(r"^\d+$")


def readable_path(uri: str) -> str:
    """``uri`` as pyarrow and delta-rs read it: DBFS (``dbfs:/x``, which neither knows) through
    its FUSE mount on a Databricks node (``/dbfs/x``); local paths and s3://, gs://, abfss://
    URIs as they are."""
    return "/dbfs/" + uri[len("dbfs:/"):].lstrip("/") if uri.startswith("dbfs:/") else uri


def format_figure(value: float | None, unit: str) -> str:
    """A measured value or threshold for a reader: ``records`` as a count (``1,032 records``),
    ``s`` in seconds (whole from 10 s up, else to the millisecond: ``0.237 s``), ``share`` as a
    percentage (``8.0%``). Infinite: ``none yet`` (nothing measured yet); None or NaN: ``none``."""
    if value is None or math.isnan(value):
        return "none"
    if math.isinf(value):
        return "none yet"
    if unit == "share":
        return f"{value:.1%}"
    if unit == "s" and abs(value) < 10:
        return f"{value:.3f}".rstrip("0").rstrip(".") + " s"
    return f"{value:,.0f} {unit}"


@dataclass(frozen=True)
class Measure:
    """One measured quantity against its threshold."""

    check: str  # "lag", "staleness", "dead_letter_rate" or "online_p99"
    subject: str  # the topic, the view, or the online job and its topic or model
    #: inf: nothing there to measure yet (a breach); NaN: nothing recent to measure (see ``judged``).
    value: float
    threshold: float
    unit: str  # "records", "s" or "share"
    detail: str = ""
    #: False: too little data for the value to be judged (a dead-letter rate of fewer records
    #: than ``monitoring.min_records_for_rate``, an online job with no recent interval): shown and
    #: recorded, never a breach.
    judged: bool = True
    #: The records the value is measured over: the topic's records in the dead-letter window, the
    #: events of the online job's interval; None for lag and staleness.
    records: int | None = None
    #: Dead-letter rate: the window's dead letters per error class; None for the other checks.
    error_classes: Mapping[str, int] | None = None

    @property
    def breached(self) -> bool:
        # NaN compares false: a value that could not be measured is no breach.
        return self.judged and self.value > self.threshold

    def line(self) -> str:
        state = "BREACH" if self.breached else "ok" if self.judged else "skip"
        text = (f"{state:<6} {self.check} {self.subject}: {format_figure(self.value, self.unit)} "
                f"(threshold {format_figure(self.threshold, self.unit)})")
        return f"{text}; {self.detail}" if self.detail else text


def committed_offsets(checkpoint: str) -> dict[str, dict[int, int]] | None:
    """The end offsets (topic -> partition -> next offset to read) of the last batch the query
    whose checkpoint is at ``checkpoint`` committed; None when it committed none."""
    fs, root = pafs.FileSystem.from_uri(readable_path(checkpoint))

    def batches(folder: str) -> set[int]:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/{folder}", allow_not_found=True))
        return {int(i.base_name) for i in infos if _BATCH.match(i.base_name)}

    committed = batches("commits") & batches("offsets")
    if not committed:
        return None
    with fs.open_input_stream(f"{root}/offsets/{max(committed)}") as stream:
        lines = stream.read().decode().splitlines()
    # v1, the batch's metadata, then one line per source: Kafka's is {topic: {partition: offset}}.
    offsets: dict[str, dict[int, int]] = {}
    for line in lines[2:]:
        source = json.loads(line) if line.strip().startswith("{") else {}
        for topic, partitions in source.items():
            if isinstance(partitions, Mapping):
                offsets.setdefault(topic, {}).update({int(p): int(o) for p, o in partitions.items()})
    return offsets


def lag_measures(settings: Settings, topics: Sequence[str]) -> list[Measure]:
    """Per topic: records the ingest query is behind the broker (see the module docstring)."""
    props = settings.kafka.client_properties()
    measures = []
    for topic in topics:
        ends = topic_offsets(props, topic)
        committed = committed_offsets(settings.storage.checkpoint_path("ingest", topic))
        read = (committed or {}).get(topic, {})
        behind = {p: latest - max(earliest, read.get(p, earliest)) for p, (earliest, latest) in ends.items()}
        worst = max(behind, key=behind.get, default=None)
        detail = "the ingest never committed a batch" if committed is None else (
            f"partition {worst}: {behind[worst]:,}" if worst is not None and behind[worst] else "")
        measures.append(Measure("lag", topic, float(sum(behind.values())), float(settings.monitoring.max_lag),
                                "records", detail))
    return measures


def newest_event_time(path: str, column: str) -> datetime | None:
    """The newest value of ``column`` in the Delta table at ``path``, from its files' statistics;
    None when the table does not exist or holds no row."""
    try:
        actions = DeltaTable(readable_path(path)).get_add_actions(flatten=True)
    except TableNotFoundError:
        return None
    name = f"max.{column}"
    if name not in actions.column_names or actions.num_rows == 0:
        return None
    values = [v for v in actions.column(name).to_pylist() if v is not None]
    if not values:
        return None
    newest = max(values)
    return newest if newest.tzinfo else newest.replace(tzinfo=timezone.utc)


def staleness_measures(settings: Settings, views: Sequence[FeatureView], now: datetime | None = None) -> list[Measure]:
    """Per view: seconds between now and the newest event time in its feature table."""
    now = now or datetime.now(timezone.utc)
    threshold = settings.monitoring.max_staleness.total_seconds()
    measures = []
    for view in views:
        column = event_time_column(view)
        newest = newest_event_time(settings.storage.feature_path(view.name), column)
        if newest is None:
            measures.append(Measure("staleness", view.name, math.inf, threshold, "s", "no feature row yet"))
            continue
        age = (now - newest).total_seconds()
        measures.append(Measure("staleness", view.name, age, threshold, "s", f"newest {column} {newest.isoformat()}"))
    return measures


def utc_literal(moment: datetime) -> str:
    """``moment`` as a SQL literal of a UTC instant (``'2026-12-05T11:45:00+00:00'``), which the
    Delta scan's engine compares with a timestamp column as that instant."""
    return f"'{moment.astimezone(timezone.utc).isoformat()}'"


def read_window(path: str, columns: Sequence[str], column: str, since: datetime, until: datetime,
                days: str | None = None) -> pa.Table | None:
    """``columns`` of the rows of the Delta table at ``path`` whose timestamp ``column`` is in
    ``[since, until]`` (both ends in; a null is in no window); None when there is no table.
    ``days``: the table's date partition column of ``column``'s UTC date, whose partitions
    outside the window are then skipped whatever the files' statistics say.

    Read by delta-rs' own engine (not a pyarrow dataset, which refuses tables with deletion
    vectors, as a Databricks runtime writes them by default): only the files whose statistics
    overlap the window are opened."""
    try:
        table = DeltaTable(readable_path(path))
    except TableNotFoundError:
        return None
    predicate = f"{column} >= {utc_literal(since)} AND {column} <= {utc_literal(until)}"
    if days:
        first, last = since.astimezone(timezone.utc).date(), until.astimezone(timezone.utc).date()
        predicate += f" AND {days} >= '{first.isoformat()}' AND {days} <= '{last.isoformat()}'"
    rows = pa.table(table.scan(columns=list(columns), predicate=predicate))
    # The engine hands strings over as string views: plain strings for pyarrow's kernels.
    return rows.cast(pa.schema([pa.field(f.name, pa.string() if f.type == pa.string_view() else f.type)
                                for f in rows.schema]))


def rows_between(path: str, column: str, since: datetime, until: datetime) -> int:
    """Rows of the Delta table at ``path`` whose timestamp ``column`` is in ``[since, until]``
    (see :func:`read_window`); 0 when the table does not exist."""
    rows = read_window(path, [column], column, since, until)
    return 0 if rows is None else rows.num_rows


def dead_letters_by_class(path: str, since: datetime, until: datetime) -> dict[str, dict[str, int]]:
    """The dead-letter table at ``path`` (:func:`pipelines.ingest.bronze.dead_letter_rows`'
    rows): per source topic (``kafka_topic``) and ``error_class``, the rows that failed
    (``failed_at``, the batch time) in ``[since, until]``. Empty when the table does not exist."""
    rows = read_window(path, ["kafka_topic", "error_class"], "failed_at", since, until, days="failed_date")
    if rows is None:
        return {}
    counts: dict[str, dict[str, int]] = {}
    for group in rows.group_by(["kafka_topic", "error_class"]).aggregate([([], "count_all")]).to_pylist():
        counts.setdefault(group["kafka_topic"], {})[group["error_class"]] = group["count_all"]
    return counts


def dead_letter_measures(settings: Settings, topics: Sequence[str], now: datetime | None = None) -> list[Measure]:
    """Per topic: the share of the records the ingest took from it in the last
    ``monitoring.dead_letter_window`` (validated in ``[now - window, now]``: bronze rows by
    ``ingested_at``, dead letters by ``failed_at``; duplicates the ingest dropped are in neither)
    that went to the dead-letter table, with each error class's count. Judged only when the
    window holds at least ``monitoring.min_records_for_rate`` records; a window with none has no
    rate (NaN)."""
    now = now or datetime.now(timezone.utc)
    monitoring = settings.monitoring
    since = now - monitoring.dead_letter_window
    window = describe_duration(monitoring.dead_letter_window)
    by_topic = dead_letters_by_class(settings.storage.dead_letter_path, since, now)
    measures = []
    for topic in topics:
        classes = dict(sorted(by_topic.get(topic, {}).items(), key=lambda item: (-item[1], item[0])))
        dead = sum(classes.values())
        records = dead + rows_between(settings.storage.bronze_path(topic), "ingested_at", since, now)
        detail = f"{dead:,} of {records:,} records in the last {window}"
        if classes:
            detail += ": " + ", ".join(f"{error_class} {count:,}" for error_class, count in classes.items())
        judged = records >= monitoring.min_records_for_rate
        if not judged:
            detail += f"; fewer than {monitoring.min_records_for_rate:,} records: not judged"
        measures.append(Measure("dead_letter_rate", topic, dead / records if records else math.nan,
                                monitoring.max_dead_letter_rate, "share", detail, judged, records, classes))
    return measures


@dataclass(frozen=True)
class OnlineJob:
    """Where an online job records its report intervals and which of their columns say what."""

    job: str  # "live" or "score", as monitoring.max_online_p99's defaults and Prometheus name them
    label: str  # the job's name in the measure's subject
    path: str
    key: str  # the column naming what one row's interval is of (a topic's query, a model)
    p99: str  # the interval's event -> output p99, seconds (null: no event in the interval)
    events: str


def online_jobs(settings: Settings) -> list[OnlineJob]:
    """fp-live's ``ops/live_metrics`` (one row per topic and interval) and fp-score's
    ``ops/scoring_metrics`` (one row per model deployment and interval)."""
    storage = settings.storage
    return [OnlineJob("live", "fp-live", storage.live_metrics_path, "query_name", "event_to_redis_p99", "events"),
            OnlineJob("score", "fp-score", storage.scoring_metrics_path, "model_name", "p99_s", "scored")]


def latest_intervals(job: OnlineJob, since: datetime, until: datetime) -> dict[str, dict[str, Any]]:
    """Per value of ``job.key``: its row of the job's table with the latest ``interval_end`` in
    ``[since, until]`` (``interval_end``, the p99, the events). Empty when the table does not
    exist or no interval ended in the window."""
    rows = read_window(job.path, [job.key, "interval_end", job.p99, job.events], "interval_end", since, until)
    latest: dict[str, dict[str, Any]] = {}
    for row in [] if rows is None else rows.to_pylist():
        if row[job.key] not in latest or row["interval_end"] > latest[row[job.key]]["interval_end"]:
            latest[row[job.key]] = row
    return latest


def live_topics(settings: Settings) -> list[str]:
    """The topics fp-live serves by default: those of the computed views served online."""
    return sorted({settings.source_topic(v) for v in settings.computed_views.values() if v.online.enabled})


def online_p99_measures(settings: Settings, now: datetime | None = None) -> list[Measure]:
    """Per fp-live topic and fp-score model: the p99 of the latest report interval that ended in
    the last ``monitoring.online_window``, against the job's objective
    (:meth:`~pipelines.core.settings.MonitoringSettings.online_p99_threshold`). Not judged (a
    ``skip`` line, never a breach): a live topic or the scorer with no such interval (the job is
    not running, or its rows are not appended yet; staleness and lag show a job that stopped),
    and an interval without an event (its p99 is null)."""
    now = now or datetime.now(timezone.utc)
    monitoring = settings.monitoring
    since = now - monitoring.online_window
    window = describe_duration(monitoring.online_window)
    measures = []
    for job in online_jobs(settings):
        threshold = monitoring.online_p99_threshold(job.job, settings.scoring).total_seconds()
        latest = latest_intervals(job, since, now)
        # fp-live names each topic's interval rows live_<topic>: the subject says the topic.
        named = {key.removeprefix("live_") if job.job == "live" else key: row for key, row in latest.items()}
        expected = live_topics(settings) if job.job == "live" else []
        for name in sorted(set(named) | set(expected)):
            subject = f"{job.label} {name}"
            row = named.get(name)
            if row is None:
                measures.append(Measure("online_p99", subject, math.nan, threshold, "s",
                                        f"no interval ended in the last {window}: not measured", judged=False))
                continue
            ended = f"interval ended {row['interval_end'].astimezone(timezone.utc).isoformat()}"
            events = row[job.events]
            if row[job.p99] is None:
                measures.append(Measure("online_p99", subject, math.nan, threshold, "s",
                                        f"{ended} without an event: not measured", judged=False, records=events))
                continue
            measures.append(Measure("online_p99", subject, float(row[job.p99]), threshold, "s",
                                    f"{ended}, {events:,} events", records=events))
        if not named and not expected:
            measures.append(Measure("online_p99", job.label, math.nan, threshold, "s",
                                    f"no interval ended in the last {window}: not measured", judged=False))
    return measures


CHECKS_SCHEMA = pa.schema([
    ("checked_at", pa.timestamp("us", tz="UTC")), ("check", pa.string()), ("subject", pa.string()),
    ("value", pa.float64()), ("threshold", pa.float64()), ("breached", pa.bool_()), ("detail", pa.string()),
    # Added with the dead-letter rate and the online p99 (older tables take them on the first
    # append that has them; their older rows read null).
    ("records", pa.int64()), ("error_classes", pa.map_(pa.string(), pa.int64())),
])


def record_measures(path: str, measures: Sequence[Measure], checked_at: datetime) -> None:
    """Append one run's measures to the Delta table at ``path`` (``ops/monitor_checks``): the
    history ``fp-monitor report`` plots. A value that is infinite (nothing measured yet) or NaN
    (nothing recent to measure) is stored null; ``records`` and ``error_classes`` are null where
    the check has none."""
    rows = pa.Table.from_pylist([
        {"checked_at": checked_at, "check": m.check, "subject": m.subject,
         "value": None if math.isinf(m.value) or math.isnan(m.value) else m.value, "threshold": m.threshold,
         "breached": m.breached, "detail": m.detail, "records": m.records,
         "error_classes": None if m.error_classes is None else list(m.error_classes.items())}
        for m in measures], schema=CHECKS_SCHEMA)
    # merge: a table recorded before the records and error_classes columns takes them on.
    write_deltalake(readable_path(path), rows, mode="append", schema_mode="merge")
