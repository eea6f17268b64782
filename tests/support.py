"""Small builders for test data: Kafka-shaped rows and contract events, written out by hand."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

KAFKA_SCHEMA = (
    "key binary, value binary, topic string, partition int, offset long, timestamp timestamp, "
    "headers array<struct<key:string,value:binary>>"
)

#: The batch time every Spark-level validation test runs at.
BATCH_TIME = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)


def utc(text: str) -> datetime:
    """``'2026-11-23 11:59:00'`` -> aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def naive(text: str) -> datetime:
    """A UTC wall time as Spark returns it from ``collect()`` (naive, session time zone UTC)."""
    return datetime.fromisoformat(text)


def transaction(**changes: Any) -> dict[str, Any]:
    """A valid transactions event at 11:59 UTC, with ``changes`` applied (None deletes a key
    only when passed as ``_drop=[...]``)."""
    event = {
        "transaction_id": "tx-1",
        "account_id": "acct-1",
        "merchant_id": "merch-1",
        "amount_usd": 12.5,
        "merchant_category_code": "5411",
        "balance_usd": 100.0,
        "device_fingerprint": "abc123",
        "event_time": "2026-11-23T11:59:00Z",
    }
    for key in changes.pop("_drop", []):
        del event[key]
    event.update(changes)
    return event


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def kafka_row(value: bytes | None, offset: int, partition: int = 0, key: bytes = b"acct-1",
              topic: str = "transactions", timestamp: str = "2026-11-23 11:59:30",
              headers: list[tuple[str, bytes]] | None = None) -> tuple:
    return (key, value, topic, partition, offset, naive(timestamp), headers)


def run_stream_in_steps(spark, folder, schema: str, transform, steps) -> list:
    """Feed each step's rows to a Parquet file stream as a new file, process it as its own
    micro-batch through ``transform`` into a memory table, and return every row emitted."""
    import time as _time

    folder.mkdir()
    stream = spark.readStream.schema(schema).option("recursiveFileLookup", "true").parquet(str(folder))
    name = f"stream_{_time.time_ns()}"
    query = transform(stream).writeStream.format("memory").queryName(name).outputMode("append").start()
    try:
        for i, rows in enumerate(steps):
            spark.createDataFrame(rows, schema).coalesce(1).write.parquet(str(folder / f"step{i}"))
            query.processAllAvailable()
        return spark.table(name).collect()
    finally:
        query.stop()


def contract_conf(dest, transactions_format: str = "avro", renames: dict[str, str] | None = None,
                  drop: tuple[str, ...] = (), add: tuple[str, ...] = (), with_views: bool = True):
    """A copy of the project's conf folder at ``dest`` whose transactions contract has
    ``transactions_format``, fields renamed (old -> new) or dropped, and YAML field lines
    ``add``-ed at the end; without the feature views when ``with_views`` is false (a renamed
    field breaks the views that read it)."""
    import shutil
    from pathlib import Path

    import yaml

    from pipelines.config import PROJECT_ROOT

    shutil.copytree(PROJECT_ROOT / "conf", dest)
    path = Path(dest) / "contracts" / "transactions.yaml"
    contract = yaml.safe_load(path.read_text())
    contract["format"] = transactions_format
    fields = [f for f in contract["fields"] if f["name"] not in drop]
    for f in fields:
        f["name"] = (renames or {}).get(f["name"], f["name"])
    contract["fields"] = fields + [yaml.safe_load(line) for line in add]
    path.write_text(yaml.safe_dump(contract, sort_keys=False))
    if not with_views:
        for view in (Path(dest) / "features").glob("*.yaml"):
            view.unlink()
    return Path(dest)
