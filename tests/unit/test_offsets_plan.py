"""Backfill ranges and Kafka replay plans: pure resolution, no broker."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from pipelines.batch.backfill import DayRange, days_predicate
from pipelines.batch.sources import KafkaReplay, PartitionRange, resolve_offsets
from pipelines.core.errors import BadSourceArguments, OffsetsOutOfRetention

WATERMARKS = {0: (0, 100), 1: (40, 90)}  # partition 1 lost offsets 0..39 to retention


def test_day_range_accepts_dates_and_utc_midnights_and_is_end_exclusive():
    days = DayRange.parse("2026-11-20", "2026-11-22T01:00:00+01:00")
    assert (days.start, days.end) == (date(2026, 11, 20), date(2026, 11, 22))
    assert days.days() == [date(2026, 11, 20), date(2026, 11, 21)]
    assert days_predicate([days]) == "(event_date >= '2026-11-20' AND event_date < '2026-11-22')"


@pytest.mark.parametrize("start, end, message", [
    ("2026-11-20T06:00:00", "2026-11-21", "not a UTC day boundary"),
    ("2026-11-21", "2026-11-21", "must be after --from"),
    ("yesterday", "2026-11-21", "not a date"),
])
def test_day_range_rejects_partial_days_and_empty_ranges(start, end, message):
    with pytest.raises(BadSourceArguments, match=message):
        DayRange.parse(start, end)


def test_earliest_to_latest_reads_what_each_partition_holds():
    assert resolve_offsets("t", KafkaReplay(), WATERMARKS) == [PartitionRange(0, 0, 100), PartitionRange(1, 40, 90)]


def test_json_offsets_default_unnamed_partitions_to_earliest_and_latest():
    replay = KafkaReplay('{"t": {"0": 10}}', '{"t": {"0": 20, "1": -1}}')
    assert resolve_offsets("t", replay, WATERMARKS) == [PartitionRange(0, 10, 20), PartitionRange(1, 40, 90)]


def test_a_start_below_the_earliest_offset_fails_naming_partition_and_offsets():
    with pytest.raises(OffsetsOutOfRetention, match=r"t partition 1: offsets 5\.\.39 are no longer in the topic.*--allow-gap"):
        resolve_offsets("t", KafkaReplay('{"t": {"1": 5}}'), WATERMARKS)


def test_allow_gap_starts_at_the_earliest_offset_and_records_the_gap():
    ranges = resolve_offsets("t", KafkaReplay('{"t": {"1": 5}}', allow_gap=True), WATERMARKS)
    assert ranges[1] == PartitionRange(1, 40, 90, gap=(5, 40))


def test_a_timestamp_start_resolving_to_a_truncated_head_is_a_possible_gap():
    moment = datetime(2026, 11, 20, tzinfo=timezone.utc)
    with pytest.raises(OffsetsOutOfRetention, match="partition 1: the requested start time resolves to the earliest"):
        resolve_offsets("t", KafkaReplay(moment), WATERMARKS, starts_by_time={0: 30, 1: 40})
    # Partition 0 still has its head: a timestamp resolving to offset 0 there is no gap.
    ranges = resolve_offsets("t", KafkaReplay(moment), {0: (0, 100)}, starts_by_time={0: 0})
    assert ranges == [PartitionRange(0, 0, 100)]


@pytest.mark.parametrize("replay, message", [
    (KafkaReplay(ending='{"t": {"0": 500}}'), "offset 500 is past the end of the topic"),
    (KafkaReplay('{"t": {"0": 50}}', '{"t": {"0": 20}}'), "ending offset 20 is before starting offset 50"),
    (KafkaReplay('{"t": {"7": 0}}'), "t has no partition 7"),
    (KafkaReplay("latest"), "'latest' makes an empty replay"),
    (KafkaReplay('{"t": [1, 2]}'), "expected"),
])
def test_impossible_offsets_fail_with_the_reason(replay, message):
    with pytest.raises(BadSourceArguments, match=message):
        resolve_offsets("t", replay, WATERMARKS)


def test_json_bounds_may_give_a_timestamp_per_partition():
    replay = KafkaReplay('{"t": {"0": "2026-11-20T00:00:00Z", "1": 50}}')
    ranges = resolve_offsets("t", replay, WATERMARKS, starts_by_time={0: 30})
    assert ranges == [PartitionRange(0, 30, 100), PartitionRange(1, 50, 90)]


def test_a_json_timestamp_without_offset_is_refused():
    with pytest.raises(BadSourceArguments, match="partition '0'.*not an offset or an ISO timestamp"):
        resolve_offsets("t", KafkaReplay('{"t": {"0": "2026-11-20T00:00:00"}}'), WATERMARKS)
