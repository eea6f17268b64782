"""``fp-skew``'s work: read one model's served vectors over an event-time range, build the same
events' vectors point in time from bronze (or the feature tables), compare them
(:mod:`pipelines.scoring.skew`), and record the result: the Delta table ``ops/skew/<model>``
(one row per model version and feature), the differing rows in ``ops/skew_rows/<model>``, an
MLflow run (parameters, per feature share differing, a bar plot and the summary as CSV).

The corrected side, per view a model input comes from, is what a backfill of the view would
write (:func:`pipelines.batch.backfill.range_features`, the same transforms and history rules:
a trailing view reads its longest window + delay before the rows it needs; sliding and session
windows still open at the source's latest event are left out), over the days the join can reach
(``[from - max_age, to]``; for a trailing view on the scored topic only the range itself, since
each event's own row is its vector). ``--corrected-from features`` reads the feature tables as
they stand instead: cheaper, but until the late recompute has run they lack rows for events
that came behind the watermark, and those show up as skew.

Reruns are idempotent: the rows of exactly the same range are replaced (Delta ``replaceWhere``);
overlapping ranges are kept side by side.
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from delta.tables import DeltaTable
from matplotlib.figure import Figure
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.batch.backfill import DayRange, history, load_events, lookahead, needed_columns, range_features
from pipelines.batch.sources import BronzeSnapshot, read_bronze
from pipelines.core.errors import ConfigError
from pipelines.core.settings import Settings
from pipelines.core.view_spec import FeatureView
from pipelines.scoring.features import servable_features
from pipelines.scoring.model import parse_model_uri
from pipelines.scoring.sinks import predictions_path, read_predictions, table_name
from pipelines.scoring.skew import (
    DEFAULT_TOLERANCE,
    compare_vectors,
    corrected_vectors,
    differing_rows,
    served_features,
    skew_summary,
)
from pipelines.training.build import TrackedRun, read_view_table, tracking_uri
from pipelines.training.join import ViewRequest, view_request

log = logging.getLogger(__name__)

SOURCES = ("bronze", "features")
PLOT_ARTIFACT = "skew_share_differing.png"
CSV_ARTIFACT = "skew_summary.csv"
#: The summary's columns from :func:`pipelines.scoring.skew.skew_summary`, in table order.
SUMMARY_COLUMNS = ("model_name", "model_version", "feature", "rows", "differing", "share_differing",
                   "served_null_only", "corrected_null_only", "mean_abs_diff", "max_abs_diff", "rows_without_corrected")


def default_model(settings: Settings) -> str:
    """The model ``scoring.model`` names, as its predictions table is named (a registered
    model's name; another URI as it is)."""
    uri = settings.scoring.model
    if not uri:
        raise ConfigError("--model: not given, and scoring.model is not set")
    return parse_model_uri(uri)[0] or uri


def skew_path(settings: Settings, model: str) -> str:
    return f"{settings.storage.root}/ops/skew/{table_name(model)}"


def skew_rows_path(settings: Settings, model: str) -> str:
    return f"{settings.storage.root}/ops/skew_rows/{table_name(model)}"


@dataclass(frozen=True)
class SkewResult:
    run_id: str
    #: The summary rows (as dicts, :data:`SUMMARY_COLUMNS`).
    summary: list[dict[str, Any]]
    #: Per feature, over every model version: share of compared rows that differ.
    shares: dict[str, float]
    #: Served inputs no servable feature has any more (not compared).
    skipped: list[str]
    predictions: int
    seconds: float


def range_predicate(start: datetime, end: datetime) -> str:
    """Exactly the rows of the range ``[start, end)`` (its ``replaceWhere``)."""
    return f"range_start = TIMESTAMP '{_iso(start)}' AND range_end = TIMESTAMP '{_iso(end)}'"


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


def own_view(settings: Settings, view: FeatureView) -> bool:
    """Whether a scored event's row of ``view`` is its own (a trailing view on the scored topic)."""
    return view.kind == "trailing" and settings.source_topic(view) == settings.scoring.topic


def view_days(settings: Settings, request: ViewRequest, start: datetime, end: datetime) -> DayRange:
    """The days of the view's rows the join can take for events in ``[start, end)``."""
    reach = timedelta(0) if own_view(settings, request.view) else request.max_age
    return DayRange((start - reach).date(), end.date() + timedelta(days=1))


def pin_bronze(spark: SparkSession, settings: Settings, topics: Sequence[str]) -> dict[str, int]:
    """Each topic's current bronze version, read once: the spine and every view built from one
    topic see the same rows, whatever the ingest commits meanwhile."""
    return {topic: read_bronze(spark, settings, topic, BronzeSnapshot())[1] for topic in sorted(set(topics))}


def corrected_tables(spark: SparkSession, settings: Settings, requests: Sequence[ViewRequest], start: datetime,
                     end: datetime, source: str, bronze: Mapping[str, int]) -> tuple[dict[str, DataFrame], dict[str, str]]:
    """Per view, its rows as corrected now (see the module docstring; ``bronze``: the pinned
    version of each topic), and what was read."""
    tables: dict[str, DataFrame] = {}
    read: dict[str, str] = {}
    for request in requests:
        view = request.view
        if source == "features" or not view.computed:
            # An attributes view has no events to recompute from: its history is its rows.
            tables[view.name], version = read_view_table(spark, settings, view, None)
            read[f"input.features.{view.name}"] = f"{settings.view_table_path(view)}@{version}"
            continue
        topic = settings.source_topic(view)
        days = view_days(settings, request, start, end)
        # A trailing view's rows do not depend on the source's latest event: no scan for it.
        loaded = load_events(spark, settings, topic, BronzeSnapshot(version=bronze[topic]), needed_columns(view),
                             days.begins - history(view), days.ends + lookahead(view),
                             bounds=(None, None) if view.kind == "trailing" else None)
        # computed_at is the build's own: one row per event (trailing) or window, no tie to break.
        tables[view.name] = range_features(loaded.events, view, [days], loaded.latest)
        read[f"input.bronze.{view.name}"] = f"{settings.storage.bronze_path(topic)}@{bronze[topic]} days {days}"
    return tables, read


def scored_spine(spark: SparkSession, settings: Settings, predictions: DataFrame, start: datetime, end: datetime,
                 version: int) -> DataFrame:
    """The scored events as bronze (at ``version``) holds them: one row per event id of
    ``predictions`` (one whose event bronze lacks has none)."""
    topic = settings.scoring.topic
    contract = settings.contract_for(topic)
    bronze, _ = read_bronze(spark, settings, topic, BronzeSnapshot(version=version))
    events = bronze.where((F.col("event_date") >= F.lit(start.date())) & (F.col("event_date") <= F.lit(end.date()))
                          & (F.col(contract.event_time_field) >= F.lit(start))
                          & (F.col(contract.event_time_field) < F.lit(end))).select(*[f.name for f in contract.fields])
    scored = predictions.select(F.col("event_id").alias(contract.id_field)).distinct()
    return events.join(scored, contract.id_field, "left_semi").dropDuplicates([contract.id_field])


def run_skew(spark: SparkSession, settings: Settings, model: str, start: datetime, end: datetime,
             tracking: str | None = None, source: str = "bronze", tolerance: float = DEFAULT_TOLERANCE) -> SkewResult:
    """Measure the skew of ``model``'s predictions with event time in ``[start, end)`` and
    record it (module docstring). ConfigError for a missing predictions table or bad arguments;
    SourceError (exit 3) for a missing bronze or feature table."""
    start, end = start.astimezone(timezone.utc), end.astimezone(timezone.utc)  # UTC days below
    if end <= start:
        raise ConfigError(f"--to {_iso(end)} must be after --from {_iso(start)}")
    if source not in SOURCES:
        raise ConfigError(f"--corrected-from: {source!r} is not one of {', '.join(SOURCES)}")
    started = time.monotonic()
    topic = settings.scoring.topic
    contract = settings.contract_for(topic)
    predictions, predictions_version = read_predictions(spark, settings, model, start, end)
    predictions = predictions.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        names = sorted(r["feature"] for r in served_features(predictions).collect())
        servable = servable_features(settings, topic)
        skipped = [n for n in names if n not in servable]
        if skipped:
            log.warning("skew %s: inputs no feature serves any more, not compared: %s", model, ", ".join(skipped))
        compared = [n for n in names if n in servable]
        by_view: dict[str, list[str]] = {}
        for name in compared:
            if servable[name].view is not None:
                by_view.setdefault(servable[name].view, []).append(servable[name].feature)
        requests = [view_request(settings.views[v], features) for v, features in sorted(by_view.items())]
        bronze = pin_bronze(spark, settings, [topic] + ([settings.source_topic(r.view) for r in requests]
                                                        if source == "bronze" else []))
        spine = scored_spine(spark, settings, predictions, start, end, bronze[topic])
        tables, inputs = corrected_tables(spark, settings, requests, start, end, source, bronze)
        corrected = corrected_vectors(spine, tables, requests, contract.id_field, contract.event_time_field,
                                      [n for n in compared if servable[n].view is None])
        comparison = compare_vectors(predictions, corrected, tolerance).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            summary = skew_summary(comparison)
            rows = [r.asDict() for r in summary.orderBy("model_name", "model_version", "feature").collect()]
            count = predictions.count()
            inputs = {"input.predictions": f"{predictions_path(settings, model)}@{predictions_version}",
                      "input.spine": f"{settings.storage.bronze_path(topic)}@{bronze[topic]}", **inputs}
            params = {"model": model, "range_start": _iso(start), "range_end": _iso(end), "corrected_from": source,
                      "tolerance": tolerance, "features": ",".join(compared),
                      "skipped_features": ",".join(skipped) or None, **inputs}
            run_id = record(settings, tracking, model, start, end, params, rows, count, comparison, summary)
        finally:
            comparison.unpersist()
    finally:
        predictions.unpersist()
    seconds = time.monotonic() - started
    log.info("skew %s %s .. %s: %d predictions, %d features compared in %.1fs; MLflow run %s", model, _iso(start),
             _iso(end), count, len(compared), seconds, run_id)
    return SkewResult(run_id, rows, pooled_shares(rows), skipped, count, seconds)


def record(settings: Settings, tracking: str | None, model: str, start: datetime, end: datetime,
           params: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], predictions: int, comparison: DataFrame,
           summary: DataFrame) -> str:
    """The MLflow run (``params``, per feature share differing, the plot and the CSV), then the
    range's rows of ``ops/skew/<model>`` and ``ops/skew_rows/<model>``; returns the run id. A
    failure marks the run FAILED."""
    shares = pooled_shares(rows)
    run = TrackedRun(settings, tracking_uri(settings, tracking), f"skew-{model}")
    failed = True
    try:
        run.tags({"fp.kind": "skew", "model": model})
        run.params(params)
        run.metrics({"predictions": predictions, "rows_compared": sum(r["rows"] for r in rows),
                     **{f"share_differing.{f}": s for f, s in shares.items()}})
        with tempfile.TemporaryDirectory() as scratch:
            picture, table = Path(scratch) / PLOT_ARTIFACT, Path(scratch) / CSV_ARTIFACT
            plot_shares(shares, f"{model}: share of rows differing, {_iso(start)} .. {_iso(end)}", picture)
            write_csv(rows, table)
            run.file(picture)
            run.file(table)
        stamp = [F.lit(start).cast("timestamp").alias("range_start"), F.lit(end).cast("timestamp").alias("range_end")]
        replace_range(summary.select(*stamp, *SUMMARY_COLUMNS, F.lit(params["corrected_from"]).alias("corrected_from"),
                                     F.lit(params["tolerance"]).cast("double").alias("tolerance"),
                                     F.lit(run.run_id).alias("mlflow_run_id"), F.current_timestamp().alias("computed_at")),
                      skew_path(settings, model), start, end)
        replace_range(differing_rows(comparison).select(*stamp, "*"), skew_rows_path(settings, model), start, end)
        failed = False
    finally:
        run.end(failed)
    return run.run_id


def pooled_shares(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per feature, over every model version of the summary: differing / compared rows
    (features with no compared row left out)."""
    totals: dict[str, list[int]] = {}
    for row in rows:
        total = totals.setdefault(row["feature"], [0, 0])
        total[0] += row["differing"]
        total[1] += row["rows"]
    return {feature: differing / compared for feature, (differing, compared) in sorted(totals.items()) if compared}


def replace_range(rows: DataFrame, path: str, start: datetime, end: datetime) -> None:
    """Write ``rows`` over exactly the range's rows of the Delta table at ``path`` (created on
    first use), in one commit."""
    writer = rows.write.format("delta").mode("overwrite")
    if DeltaTable.isDeltaTable(rows.sparkSession, path):
        writer = writer.option("replaceWhere", range_predicate(start, end))
    writer.save(path)


def plot_shares(shares: Mapping[str, float], title: str, path: Path) -> None:
    """A horizontal bar per feature: its share of rows differing."""
    # A bare Figure, not pyplot: no backend is chosen (as the training build's plots).
    names = list(shares)
    figure = Figure(figsize=(8, 1.2 + 0.35 * max(len(names), 1)))
    ax = figure.subplots()
    ax.barh(names, [shares[n] for n in names], color="#c44e52")
    ax.invert_yaxis()
    ax.set_xlim(0, max(0.05, *shares.values()) * 1.1 if shares else 1)
    ax.set_xlabel("share of rows whose served value differs from the corrected one")
    for i, name in enumerate(names):
        ax.annotate(f"{shares[name]:.2%}", (shares[name], i), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(SUMMARY_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in SUMMARY_COLUMNS})


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary as a plain text table (the job prints it)."""
    header = ("version", "feature", "rows", "differing", "share", "served null", "corrected null", "mean |diff|",
              "max |diff|", "no corrected")

    def number(value: Any) -> str:
        return "-" if value is None else f"{value:.6g}"

    lines = [[str(r["model_version"] or "-"), r["feature"], str(r["rows"]), str(r["differing"]),
              "-" if r["share_differing"] is None else f"{r['share_differing']:.2%}", str(r["served_null_only"]),
              str(r["corrected_null_only"]), number(r["mean_abs_diff"]), number(r["max_abs_diff"]),
              str(r["rows_without_corrected"])] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    text = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for line in lines:
        text.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(text)
