"""``fp-monitor check`` against what real jobs left behind: exit 0 while the ingest is caught up
and the views fresh, 1 naming each breach once records wait unread on the broker or a view's
newest event is older than its threshold, the dead-letter rate of what the ingest took, and its
measures recorded for the report. ``fp-monitor report`` of a recorded history, opened in a real
headless browser (Debian's chromium). A streaming job's Prometheus endpoint, scraped while it
runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from matplotlib.image import imread

from pipelines.core.settings import PROJECT_ROOT
from pipelines.features.stream import run_features
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from pipelines.local.services import ensure_debian_package, port_open
from pipelines.monitor.check import Measure, record_measures
from tests.pages import PageOutline
from tests.support import BLOCK_SPARK, free_ports, start_job, topic_names, wait_for


def monitor(conf_dir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "monitor.py"), "check", "--env", "local",
                           "--conf-dir", str(conf_dir), "--views", "merchant_hourly", *extra],
                          capture_output=True, text=True, timeout=120)


def test_fp_monitor_check_exits_non_zero_naming_lag_and_staleness_over_their_thresholds_and_zero_otherwise(
        spark, isolated, tmp_path):
    # Events up to now: the hourly view's newest window ends within the hour.
    # A dead-letter rate of up to 50% is fine here: the generator's 5% bad records stay under it.
    settings = isolated(monitoring={"max_lag": 20, "max_staleness": "2h", "max_dead_letter_rate": 0.5})
    tx, lb = settings.ingest.topics
    spec = GeneratorSpec(count=400, seed=5, span=timedelta(hours=3), end=datetime.now(timezone.utc), bad_rate=0.05,
                         label_rate=0.0)
    sent = produce(generate(spec), settings.kafka.producer_properties(), topic_names=topic_names(settings))
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")

    # Nothing ingested yet: every record of the topic is lag, and the view has no row.
    before = monitor(conf_dir)
    assert before.returncode == 1, before.stdout + before.stderr
    assert f"BREACH lag {tx}: {sent.sent(tx)} records" in before.stdout and "the ingest never committed a batch" in before.stdout
    assert "BREACH staleness merchant_hourly: none yet" in before.stdout

    run_ingest(spark, settings, available_now=True)
    run_features(spark, settings, [settings.views["merchant_hourly"]], available_now=True)
    fine = monitor(conf_dir, "--record")
    assert fine.returncode == 0, fine.stdout + fine.stderr
    assert f"ok     lag {tx}: 0 records" in fine.stdout and f"ok     lag {lb}: 0 records" in fine.stdout
    assert "ok     staleness merchant_hourly:" in fine.stdout
    # Every record was ingested just now, within the 15-minute window: the generator's bad records
    # over all it sent that the ingest kept (duplicates dropped are in neither table).
    dead, bronze = sent.expected_dead_letters(tx), sent.expected_bronze(tx)
    (rate_line,) = [line for line in fine.stdout.splitlines() if f"dead_letter_rate {tx}:" in line]
    total = sum(dead.values())
    assert rate_line.startswith(f"ok     dead_letter_rate {tx}: {total / (total + bronze):.1%} (threshold 50.0%); "
                                f"{total:,} of {total + bronze:,} records in the last 15m: "), rate_line
    assert total > 0 and all(f"{error_class} {count:,}" in rate_line for error_class, count in dead.items())
    # No labels were sent, and no online job has run: shown, not judged.
    assert f"skip   dead_letter_rate {lb}: none (threshold 50.0%); 0 of 0 records in the last 15m" in fine.stdout
    assert f"skip   online_p99 fp-live {tx}: none (threshold 1 s); no interval ended in the last 5m" in fine.stdout
    assert "skip   online_p99 fp-score: none (threshold 2 s); no interval ended in the last 5m" in fine.stdout

    # 30 records more than the ingest has read (threshold 20): a breach naming the topic.
    more = produce(generate(GeneratorSpec(count=30, seed=6, span=timedelta(minutes=5), bad_rate=0.0,
                                          duplicate_rate=0.0, label_rate=0.0)),
                   settings.kafka.producer_properties(), topic_names={"transactions": tx})
    assert more.sent(tx) == 30
    lagging = monitor(conf_dir, "--record")
    assert lagging.returncode == 1
    assert f"BREACH lag {tx}: 30 records (threshold 20 records)" in lagging.stdout
    assert f"ok     lag {lb}: 0 records" in lagging.stdout
    # 2 lags, 1 staleness, 2 dead-letter rates, 2 live topics and the scorer.
    assert "1 breach of 8 measures" in lagging.stdout

    # A threshold the view's newest window is older than: a staleness breach naming the view.
    stale = monitor(conf_dir, "--set", "monitoring.max_staleness=1s", "--set", "monitoring.max_lag=1000")
    assert stale.returncode == 1
    assert "BREACH staleness merchant_hourly:" in stale.stdout and stale.stdout.count("BREACH") == 1

    # Both recorded runs are in ops/monitor_checks, the breach flagged.
    rows = DeltaTable(settings.storage.monitor_checks_path).to_pyarrow_table().to_pylist()
    assert len(rows) == 16
    assert {(r["check"], r["subject"], r["breached"]) for r in rows if r["value"] == 30.0} == {("lag", tx, True)}


def chromium(*arguments: str, profile: Path) -> str:
    """Headless chromium (Debian's package, installed when missing) run with ``arguments``; its
    standard output."""
    binary = ensure_debian_package("chromium", ["chromium", "/usr/bin/chromium"])
    result = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             f"--user-data-dir={profile}", *arguments], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def report(lake: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    """``fp-monitor report`` on the lake at ``lake``, in a process where importing Spark fails."""
    argv = ["fp-monitor", "report", "--env", "local", "--set", f"storage.root={lake}", "--output", str(output), *extra]
    code = BLOCK_SPARK + f"""
import runpy
sys.argv = {argv!r}
runpy.run_path({str(PROJECT_ROOT / "jobs" / "monitor.py")!r}, run_name="__main__")
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)


#: ``ops/monitor_checks`` as recorded before the dead-letter rate and the online p99 (no
#: ``records``, no ``error_classes``): the report reads a table that older checks began.
OLD_CHECKS_SCHEMA = pa.schema([
    ("checked_at", pa.timestamp("us", tz="UTC")), ("check", pa.string()), ("subject", pa.string()),
    ("value", pa.float64()), ("threshold", pa.float64()), ("breached", pa.bool_()), ("detail", pa.string()),
])


def test_fp_monitor_report_plots_the_recorded_history_on_a_page_a_real_browser_renders_without_a_script(tmp_path):
    lake = tmp_path / "lake"
    checks = lake / "ops" / "monitor_checks"
    now = datetime.now(timezone.utc)
    first, second, third = now - timedelta(minutes=30), now - timedelta(minutes=20), now - timedelta(minutes=10)
    write_deltalake(str(checks), pa.Table.from_pylist([
        {"checked_at": first, "check": "lag", "subject": "transactions", "value": 5.0, "threshold": 100.0,
         "breached": False, "detail": ""},
        {"checked_at": first, "check": "staleness", "subject": "merchant_hourly", "value": None, "threshold": 900.0,
         "breached": True, "detail": "no feature row yet"},
    ], schema=OLD_CHECKS_SCHEMA))
    for checked_at, lag, rate, classes, p99 in ((second, 40.0, 0.01, {"bad_json": 2}, 0.3),
                                               (third, 180.0, 0.08, {"missing_field": 9, "bad_json": 3}, 1.4)):
        record_measures(str(checks), [
            Measure("lag", "transactions", lag, 100.0, "records"),
            Measure("lag", "labels", 0.0, 100.0, "records"),
            Measure("staleness", "merchant_hourly", 600.0, 900.0, "s"),
            Measure("dead_letter_rate", "transactions", rate, 0.05, "share", f"{sum(classes.values())} of 150 records",
                    records=150, error_classes=classes),
            Measure("online_p99", "fp-live transactions", p99, 1.0, "s", records=900),
        ], checked_at)
    # Older than --since 1h: not on the page.
    record_measures(str(checks), [Measure("lag", "payments", 7.0, 100.0, "records")], now - timedelta(hours=3))

    page = tmp_path / "out" / "report.html"
    written = report(lake, page, "--since", "1h")
    assert written.returncode == 0, written.stdout + written.stderr
    assert written.stdout.startswith(f"{page}: 3 recorded checks since ")
    rendered = PageOutline(chromium("--dump-dom", page.as_uri(), profile=tmp_path / "chromium"))

    assert rendered.scripts == 0 and rendered.images == 0
    assert rendered.texts["title"] == ["fp-monitor report"]
    assert [p["texts"]["plot-title"] for p in rendered.plots] == [
        ["Lag per topic"], ["Staleness per view"], ["Dead-letter rate per topic"], ["Online latency p99 per job"]]
    assert [p["texts"]["y-label"] for p in rendered.plots] == [
        ["records behind the broker"], ["seconds since the newest event"],
        ["dead letters, % of the window's records"], ["p99 of the latest interval (s)"]]
    assert [p["texts"]["x-label"] for p in rendered.plots] == [["time of the check (UTC)"]] * 4
    assert [p["texts"]["legend-entry"] for p in rendered.plots] == [
        ["labels", "transactions", "threshold 100 records"], ["merchant_hourly", "threshold 900 s"],
        ["transactions", "threshold 5.0%"], ["fp-live transactions", "threshold 1 s"]]
    assert rendered.rows == [
        ["check", "subject", "value", "threshold", "detail"],
        ["lag", "transactions", "180 records", "100 records"],
        ["dead_letter_rate", "transactions", "8.0%", "5.0%", "12 of 150 records"],
        ["online_p99", "fp-live transactions", "1.4 s", "1 s"],
    ]
    # And painted: each plot's legend swatch of its first series is 12 x 12 pixels of its colour.
    shot = tmp_path / "report.png"
    chromium("--window-size=1000,2000", "--hide-scrollbars", f"--screenshot={shot}", page.as_uri(),
             profile=tmp_path / "chromium")
    pixels = (imread(shot)[:, :, :3] * 255).round().astype(int)
    first_series = ((pixels[:, :, 0] == 0x00) & (pixels[:, :, 1] == 0x72) & (pixels[:, :, 2] == 0xB2)).sum()
    assert first_series >= 4 * 12 * 12, first_series


def test_fp_monitor_report_of_a_lake_without_recorded_checks_is_a_page_saying_so(tmp_path):
    page = tmp_path / "report.html"
    written = report(tmp_path / "lake", page)
    assert written.returncode == 0, written.stdout + written.stderr
    rendered = PageOutline(chromium("--dump-dom", page.as_uri(), profile=tmp_path / "chromium"))
    assert rendered.plots == [] and rendered.rows == []
    assert "There are no recorded checks in this window." in rendered.texts["p"]


def scrape(port: int) -> dict[str, float]:
    """The samples of a /metrics page: 'name{labels}' -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_the_streaming_ingest_serves_its_lag_and_dead_letters_as_prometheus_metrics(isolated, tmp_path):
    settings = isolated(ingest={"max_offsets_per_trigger": 100, "trigger_interval": "1s"})
    tx = settings.ingest.topics[0]
    sent = produce(generate(GeneratorSpec(count=300, seed=8, span=timedelta(hours=1), bad_rate=0.05, label_rate=0.0)),
                   settings.kafka.producer_properties(), topic_names=topic_names(settings))
    conf_dir = isolated.conf_dir(settings, tmp_path / "conf")
    (port,) = free_ports(1)
    job = start_job("ingest", conf_dir, tmp_path / "ingest.log", "--metrics-port", str(port))
    query = f'query="ingest_{tx}"'
    try:
        wait_for(lambda: port_open(port) and scrape(port).get(f'fp_bronze_rows_total{{topic="{tx}"}}', 0)
                 == sent.expected_bronze(tx), 240, "every valid record counted on /metrics", job)
        samples = scrape(port)
        assert samples[f'fp_dead_letter_rows_total{{topic="{tx}"}}'] == sum(sent.expected_dead_letters(tx).values())
        # Batches of 100: the first ones had records waiting behind them; the last none.
        assert samples[f"fp_batches_total{{{query}}}"] >= 3
        lags = {k: v for k, v in samples.items() if k.startswith("fp_kafka_lag_records{") and query in k}
        assert len(lags) == 2 and set(lags.values()) == {0.0}, lags
        assert samples[f"fp_last_batch_timestamp_seconds{{{query}}}"] > time.time() - 120
        assert samples[f"fp_input_rows_total{{{query}}}"] == sent.sent(tx)
    finally:
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 0
