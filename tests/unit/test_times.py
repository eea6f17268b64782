"""The time primitives: exact durations in both directions, one UTC rule for datetimes, one for
text, and Spark reading the interval text back exactly."""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone

import pytest

from pipelines.core.errors import BadSourceArguments, ConfigError
from pipelines.core.times import (
    describe_duration,
    epoch_micros,
    format_duration,
    from_epoch_micros,
    micros,
    parse_day,
    parse_duration,
    parse_instant,
    spark_interval,
    utc_assuming_local,
)


@pytest.mark.parametrize("text, expected", [
    ("30s", timedelta(seconds=30)), ("15m", timedelta(minutes=15)), ("1h", timedelta(hours=1)),
    ("7d", timedelta(days=7)), ("250ms", timedelta(milliseconds=250)),
])
def test_durations_parse_in_every_unit(text, expected):
    assert parse_duration(text, "k") == expected


@pytest.mark.parametrize("value", ["1.5s", "5", "1 hour", "", "-1s", "10us", 30, True, None])
def test_anything_else_is_not_a_duration_and_names_the_key(value):
    with pytest.raises(ConfigError, match=r"^features\.x: .* is not a duration"):
        parse_duration(value, "features.x")


@pytest.mark.parametrize("delta, text", [
    (timedelta(minutes=90), "90m"), (timedelta(days=1), "1d"), (timedelta(milliseconds=1500), "1500ms"),
    (timedelta(0), "0d"),
])
def test_format_duration_is_the_shortest_exact_spelling_that_parses_back(delta, text):
    assert format_duration(delta) == text
    assert parse_duration(text, "k") == delta


def test_a_duration_finer_than_a_millisecond_has_no_spelling_rather_than_a_rounded_one():
    with pytest.raises(ValueError, match="finer than a millisecond"):
        format_duration(timedelta(milliseconds=1, microseconds=1))


@pytest.mark.parametrize("delta, text", [
    (timedelta(days=22, hours=12), "22d 12h"), (timedelta(minutes=5, seconds=1), "5m 1s"),
    (timedelta(seconds=1, milliseconds=500), "1.5s"), (timedelta(microseconds=7), "0.000007s"),
    (timedelta(0), "0s"), (-timedelta(minutes=2), "-2m"),
])
def test_describe_duration_keeps_fractions_of_a_second(delta, text):
    assert describe_duration(delta) == text


@pytest.mark.parametrize("delta, text", [
    (timedelta(minutes=7, seconds=2, milliseconds=703), "7m 2s"), (timedelta(milliseconds=400), "0s"),
    (timedelta(days=22, hours=12, microseconds=1), "22d 12h"), (-timedelta(seconds=1, milliseconds=500), "-1s"),
])
def test_at_a_resolution_of_a_second_the_fraction_is_cut_off(delta, text):
    assert describe_duration(delta, timedelta(seconds=1)) == text


def test_micros_is_exact_where_float_seconds_are_not():
    delta = timedelta(days=106_751, microseconds=999_999)  # ~292 years: beyond a double's 53 bits in µs
    assert micros(delta) == 106_751 * 86_400_000_000 + 999_999
    assert int(delta.total_seconds() * 1_000_000) != micros(delta)


def test_epoch_micros_round_trips_an_aware_time():
    moment = datetime(2026, 11, 23, 10, 0, 0, 123_456, tzinfo=timezone.utc)
    assert epoch_micros(moment) == 1_795_428_000_123_456
    assert from_epoch_micros(epoch_micros(moment)) == moment


def test_a_naive_datetime_is_local_time_as_pyspark_hands_it_out(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert utc_assuming_local(datetime(2026, 11, 23, 9, 0)) == datetime(2026, 11, 23, 0, 0, tzinfo=timezone.utc)
        aware = datetime(2026, 11, 23, 9, 0, tzinfo=timezone(timedelta(hours=2)))
        assert utc_assuming_local(aware) == datetime(2026, 11, 23, 7, 0, tzinfo=timezone.utc)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_an_instant_typed_without_offset_is_utc_whatever_the_hosts_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_instant("2026-11-20T09:00:00", "--cutoff") == datetime(2026, 11, 20, 9, tzinfo=timezone.utc)
        assert parse_instant("2026-11-20T09:00:00+01:00", "--cutoff") == datetime(2026, 11, 20, 8, tzinfo=timezone.utc)
        assert parse_instant("2026-11-20T09:00:00Z", "--cutoff").tzinfo == timezone.utc
    finally:
        monkeypatch.undo()
        time.tzset()
    with pytest.raises(ConfigError, match=r"--cutoff: 'yesterday' is not an ISO-8601 time"):
        parse_instant("yesterday", "--cutoff")


def test_a_day_is_a_utc_midnight():
    assert parse_day("2026-11-20", "--from") == date(2026, 11, 20)
    assert parse_day("2026-11-20T01:00:00+01:00", "--from") == date(2026, 11, 20)
    with pytest.raises(BadSourceArguments, match=r"--to '2026-11-20T06:00:00': not a UTC day boundary"):
        parse_day("2026-11-20T06:00:00", "--to")
    assert BadSourceArguments.exit_code == 2


@pytest.mark.parametrize("delta", [timedelta(milliseconds=1500), timedelta(microseconds=1),
                                   timedelta(days=7, minutes=6), timedelta(hours=1, microseconds=333)])
def test_spark_reads_the_interval_text_back_exactly(spark, delta):
    (row,) = spark.sql(f"SELECT INTERVAL {spark_interval(delta)} AS d").collect()
    assert row.d == delta
