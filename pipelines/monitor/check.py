"""``fp-monitor check``: is the platform keeping up? Measured from what the jobs leave behind, not
from the jobs themselves, so that a job that died (or never started) shows as a breach:

* **lag** per ingested topic: the broker's latest offset of each partition minus the end offset
  of the last batch the ingest query *committed* (its checkpoint's ``offsets/<n>`` for the newest
  ``commits/<n>``); a partition the query has never read counts from its earliest offset. Over
  ``monitoring.max_lag`` (all partitions of a topic together) is a breach.
* **staleness** per computed feature view: now minus the newest event time in the view's
  feature table (from the Delta log's per-file statistics: no data file is read). Over
  ``monitoring.max_staleness`` is a breach; a view with no table yet is one too.

Nothing here needs Spark: the checkpoint is read through pyarrow's file systems (local, S3, GCS,
HDFS; DBFS through its ``/dbfs`` mount), the Delta log with delta-rs, the offsets with a Kafka
client, so it runs from cron or a bundle job in seconds. Each run's measures can be appended to ``ops/monitor_checks``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from pipelines.core.kafka_admin import topic_offsets
from pipelines.core.settings import Settings
from pipelines.core.view_spec import FeatureView, event_time_column

_BATCH = re.compile(r"^\d+$")


def readable_path(uri: str) -> str:
    """``uri`` as pyarrow and delta-rs read it: DBFS (``dbfs:/x``, which neither knows) through
    its FUSE mount on a Databricks node (``/dbfs/x``); local paths and s3://, gs://, abfss://
    URIs as they are."""
    return "/dbfs/" + uri[len("dbfs:/"):].lstrip("/") if uri.startswith("dbfs:/") else uri


@dataclass(frozen=True)
class Measure:
    """One measured quantity against its threshold."""

    check: str  # "lag" or "staleness"
    subject: str  # the topic or the view
    value: float
    threshold: float
    unit: str
    detail: str = ""

    @property
    def breached(self) -> bool:
        return self.value > self.threshold

    def line(self) -> str:
        state = "BREACH" if self.breached else "ok"
        value = "none yet" if math.isinf(self.value) else f"{self.value:,.0f} {self.unit}"
        text = f"{state:<6} {self.check} {self.subject}: {value} (threshold {self.threshold:,.0f} {self.unit})"
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


CHECKS_SCHEMA = pa.schema([
    ("checked_at", pa.timestamp("us", tz="UTC")), ("check", pa.string()), ("subject", pa.string()),
    ("value", pa.float64()), ("threshold", pa.float64()), ("breached", pa.bool_()), ("detail", pa.string()),
])


def record_measures(path: str, measures: Sequence[Measure], checked_at: datetime) -> None:
    """Append one run's measures to the Delta table at ``path`` (``ops/monitor_checks``): the
    history ``fp-monitor report`` plots. An infinite value (nothing measured yet) is stored null."""
    rows = pa.Table.from_pylist([
        {"checked_at": checked_at, "check": m.check, "subject": m.subject,
         "value": None if math.isinf(m.value) else m.value, "threshold": m.threshold,
         "breached": m.breached, "detail": m.detail}
        for m in measures], schema=CHECKS_SCHEMA)
    write_deltalake(readable_path(path), rows, mode="append")
