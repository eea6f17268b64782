"""Progress of the live path: per interval, events/s and the latencies that matter online.

Per event: event time -> Redis write and Kafka append (of the source record) -> Redis write,
and of that the validation stage's share: Kafka append of the source record -> its valid event
in the events topic (that record's timestamp, set by the validation's producer). The rest is the
consumer's: its wait for a batch and the Redis scripts.
Per closed window of a sliding or session view: the watermark passing its end -> Redis write.
Every ``interval`` one progress line is logged and one row queued for ``ops/live_metrics`` (the
queue is drained by a writer off the data path, so a Delta commit never delays an event).
"""

from __future__ import annotations

import bisect
import logging
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipelines.core.prometheus import observe_latency

log = logging.getLogger(__name__)


def percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile of an ascending list (None when empty)."""
    if not ordered:
        return None
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


@dataclass
class LiveMetrics:
    """Latencies and counts of one topic's live views, reported every ``interval`` seconds."""

    query_name: str
    interval: float
    rows: queue.Queue = field(default_factory=queue.Queue)
    started: float = field(default_factory=time.time)
    batches: int = 0
    added: int = 0
    written: int = 0
    closed: int = 0
    late: int = 0
    event_lags: list[float] = field(default_factory=list)
    append_lags: list[float] = field(default_factory=list)
    close_lags: list[float] = field(default_factory=list)
    validation_lags: list[float] = field(default_factory=list)

    def record(self, event_lags: list[float], append_lags: list[float], added: int, written: int,
               closed: int = 0, late: int = 0, close_lags: Sequence[float] = (),
               validation_lags: Sequence[float] = ()) -> None:
        self.batches += 1
        self.added += added
        self.written += written
        self.closed += closed
        self.late += late
        self.event_lags += event_lags
        self.append_lags += append_lags
        self.close_lags += close_lags
        self.validation_lags += validation_lags
        self.flush_if_due()

    def flush_if_due(self) -> None:
        if time.time() - self.started >= self.interval:
            self.flush()

    def flush(self) -> dict[str, Any] | None:
        """Log the interval's line, queue its row, start the next interval."""
        now = time.time()
        if not self.batches:
            self.started = now
            return None
        seconds = max(now - self.started, 1e-6)
        event_lags, append_lags, close_lags = sorted(self.event_lags), sorted(self.append_lags), sorted(self.close_lags)
        validation_lags = sorted(self.validation_lags)
        row = {
            "query_name": self.query_name,
            "interval_start": datetime.fromtimestamp(self.started, timezone.utc),
            "interval_end": datetime.fromtimestamp(now, timezone.utc),
            "batches": self.batches, "events": len(event_lags),
            "events_per_second": round(len(event_lags) / seconds, 1),
            **{f"event_to_redis_p{q}": percentile(event_lags, q / 100) for q in (50, 95, 99)},
            **{f"append_to_redis_p{q}": percentile(append_lags, q / 100) for q in (50, 95, 99)},
            **{f"append_to_validated_p{q}": percentile(validation_lags, q / 100) for q in (50, 95, 99)},
            "events_added": self.added, "features_written": self.written,
            "windows_closed": self.closed, "events_late": self.late,
            **{f"watermark_to_redis_p{q}": percentile(close_lags, q / 100) for q in (50, 95, 99)},
            "recorded_at": datetime.now(timezone.utc),
        }
        log.info(format_live_progress(row))
        observe_latency("live", row["event_to_redis_p99"])
        self.rows.put(row)
        self.started, self.batches, self.added, self.written, self.closed, self.late = now, 0, 0, 0, 0, 0
        self.event_lags, self.append_lags, self.close_lags, self.validation_lags = [], [], [], []
        return row


def format_live_progress(row: dict[str, Any]) -> str:
    def s(key: str) -> str:
        value = row[key]
        return "-" if value is None else f"{value:.2f}s"

    return (f"{row['query_name']}: {row['events']:,} events in {row['batches']} batches "
            f"({row['events_per_second']:,.0f}/s), event->redis p50 {s('event_to_redis_p50')} "
            f"p95 {s('event_to_redis_p95')} p99 {s('event_to_redis_p99')}, append->redis p50 "
            f"{s('append_to_redis_p50')} p99 {s('append_to_redis_p99')} (validation p50 "
            f"{s('append_to_validated_p50')} p99 {s('append_to_validated_p99')}), {row['events_added']:,} new events, "
            f"{row['features_written']:,} feature hashes written"
            + (f", {row['windows_closed']:,} windows closed, watermark->redis p50 {s('watermark_to_redis_p50')} "
               f"p99 {s('watermark_to_redis_p99')}, {row['events_late']:,} late events dropped"
               if row.get("windows_closed") or row.get("events_late") else ""))


def close_lags(event_micros: Sequence[int], append_micros: Sequence[int], closed: Sequence[tuple[int, int]],
               done: int) -> list[float]:
    """Seconds from the moment each closed window's end was passed by the watermark (the Kafka
    append of the batch's first event at or after ``end + lateness``) to ``done``; windows
    whose watermark moved in an earlier batch are left out."""
    if not closed:
        return []
    ordered = sorted(zip(event_micros, append_micros))
    times = [t for t, _ in ordered]
    earliest_from = [0] * len(ordered)  # the earliest append among events at index i and later
    best = None
    for i in range(len(ordered) - 1, -1, -1):
        best = ordered[i][1] if best is None else min(best, ordered[i][1])
        earliest_from[i] = best
    lags = []
    for end, lateness in closed:
        i = bisect.bisect_left(times, end + lateness)
        if i < len(times):
            lags.append((done - earliest_from[i]) / 1e6)
    return lags
