"""``fp-monitor check`` against what real jobs left behind: exit 0 while the ingest is caught up
and the views fresh, 1 naming each breach once records wait unread on the broker or a view's
newest event is older than its threshold, and its measures recorded for the report. A streaming
job's Prometheus endpoint, scraped while it runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone

from deltalake import DeltaTable

from pipelines.core.settings import PROJECT_ROOT
from pipelines.features.stream import run_features
from pipelines.ingest.stream import run_ingest
from pipelines.local.generator import GeneratorSpec, generate, produce
from pipelines.local.services import port_open
from tests.support import free_ports, start_job, topic_names, wait_for


def monitor(conf_dir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "monitor.py"), "check", "--env", "local",
                           "--conf-dir", str(conf_dir), "--views", "merchant_hourly", *extra],
                          capture_output=True, text=True, timeout=120)


def test_fp_monitor_check_exits_non_zero_naming_lag_and_staleness_over_their_thresholds_and_zero_otherwise(
        spark, isolated, tmp_path):
    # Events up to now: the hourly view's newest window ends within the hour.
    settings = isolated(monitoring={"max_lag": 20, "max_staleness": "2h"})
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

    # 30 records more than the ingest has read (threshold 20): a breach naming the topic.
    more = produce(generate(GeneratorSpec(count=30, seed=6, span=timedelta(minutes=5), bad_rate=0.0,
                                          duplicate_rate=0.0, label_rate=0.0)),
                   settings.kafka.producer_properties(), topic_names={"transactions": tx})
    assert more.sent(tx) == 30
    lagging = monitor(conf_dir, "--record")
    assert lagging.returncode == 1
    assert f"BREACH lag {tx}: 30 records (threshold 20 records)" in lagging.stdout
    assert f"ok     lag {lb}: 0 records" in lagging.stdout
    assert "1 breach of 3 measures" in lagging.stdout

    # A threshold the view's newest window is older than: a staleness breach naming the view.
    stale = monitor(conf_dir, "--set", "monitoring.max_staleness=1s", "--set", "monitoring.max_lag=1000")
    assert stale.returncode == 1
    assert "BREACH staleness merchant_hourly:" in stale.stdout and stale.stdout.count("BREACH") == 1

    # Both recorded runs are in ops/monitor_checks, the breach flagged.
    rows = DeltaTable(settings.storage.monitor_checks_path).to_pyarrow_table().to_pylist()
    assert len(rows) == 6
    assert {(r["check"], r["subject"], r["breached"]) for r in rows if r["value"] == 30.0} == {("lag", tx, True)}


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
