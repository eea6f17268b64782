"""A job's Prometheus metrics: what its streaming queries report after every batch, served on
``http://<monitoring.metrics_host>:<port>/metrics`` when the job is given a port (``--metrics-port``
or ``monitoring.metrics_port``).

Metrics (prometheus_client's process registry, so the process's own metrics come with them):

* ``fp_batches_total{query}``, ``fp_input_rows_total{query}``, ``fp_batch_duration_seconds{query}``
  (the last batch) and ``fp_last_batch_timestamp_seconds{query}``: a query that stops reporting
  has stopped working;
* ``fp_kafka_lag_records{query,topic,partition}``: records on the broker after the batch's end
  offsets (Spark's ``latestOffset`` of the source when the batch ran), per partition;
* ``fp_bronze_rows_total{topic}``, ``fp_dead_letter_rows_total{topic}``: the ingest's outcome, so
  that the dead-letter rate is a ratio of two counters;
* ``fp_view_freshness_seconds{view}``: a feature batch's time minus the newest event time it wrote
  to Redis;
* ``fp_online_latency_p99_seconds{job}``: the live path's and the scorer's event -> output p99 of
  their last reporting interval.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

BATCHES = Counter("fp_batches", "Batches a streaming query ran", ["query"])
INPUT_ROWS = Counter("fp_input_rows", "Rows read by a streaming query", ["query"])
BATCH_SECONDS = Gauge("fp_batch_duration_seconds", "Duration of a query's last batch", ["query"])
LAST_BATCH = Gauge("fp_last_batch_timestamp_seconds", "When a query's last batch ran (Unix time)", ["query"])
LAG = Gauge("fp_kafka_lag_records", "Records on the broker after a query's last batch", ["query", "topic", "partition"])
BRONZE_ROWS = Counter("fp_bronze_rows", "Valid records the ingest wrote to bronze", ["topic"])
DEAD_LETTER_ROWS = Counter("fp_dead_letter_rows", "Invalid records the ingest wrote to the dead-letter table", ["topic"])
FRESHNESS = Gauge("fp_view_freshness_seconds", "A feature batch's time minus the newest event it wrote online", ["view"])
LATENCY_P99 = Gauge("fp_online_latency_p99_seconds", "Event to output p99 of the online path's last interval", ["job"])


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serve the process's metrics on ``host:port`` (a daemon thread: it ends with the job)."""
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)


def partition_offsets(offsets: Any) -> dict[tuple[str, str], int] | None:
    """A Kafka source's offsets in a query's progress, ``{"topic": {"0": 12}}`` (or its JSON
    text), as {(topic, partition): offset}; None when absent or not a Kafka offset map."""
    try:
        if isinstance(offsets, str):
            offsets = json.loads(offsets)
        return {(topic, str(p)): int(o) for topic, partitions in offsets.items() for p, o in partitions.items()}
    except (ValueError, TypeError, AttributeError):
        return None


def observe_progress(progress: Any, row: Mapping[str, Any]) -> None:
    """Update the metrics from one batch's ``StreamingQueryProgress`` and the metrics row its
    reporter made of it (fields it has: ``topic``, ``bronze_rows``, ``dead_letter_rows``,
    ``view``, ``freshness_seconds``)."""
    query = progress.name or str(progress.id)
    BATCHES.labels(query).inc()
    INPUT_ROWS.labels(query).inc(int(progress.numInputRows or 0))
    BATCH_SECONDS.labels(query).set(int(progress.batchDuration or 0) / 1000)
    if row.get("batch_timestamp") is not None:
        LAST_BATCH.labels(query).set(row["batch_timestamp"].timestamp())
    for source in progress.sources:
        ends, latest = partition_offsets(source.endOffset) or {}, partition_offsets(source.latestOffset) or {}
        for (topic, partition), offset in latest.items():
            if (topic, partition) in ends:
                LAG.labels(query, topic, partition).set(max(0, offset - ends[(topic, partition)]))
    if row.get("topic") is not None:
        BRONZE_ROWS.labels(row["topic"]).inc(int(row.get("bronze_rows") or 0))
        DEAD_LETTER_ROWS.labels(row["topic"]).inc(int(row.get("dead_letter_rows") or 0))
    if row.get("view") is not None and row.get("freshness_seconds") is not None:
        FRESHNESS.labels(row["view"]).set(float(row["freshness_seconds"]))


def observe_latency(job: str, p99_seconds: float | None) -> None:
    """The online path's (``live``, ``score``) p99 of its last reporting interval."""
    if p99_seconds is not None:
        LATENCY_P99.labels(job).set(p99_seconds)
