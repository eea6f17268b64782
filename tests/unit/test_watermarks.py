"""Every view kind turns its ``allowed_lateness`` into the same, exact watermark, down to the
millisecond: a sub-second lateness is neither truncated nor rounded by any of them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pipelines.core.config import build
from pipelines.core.contract_spec import load_contracts
from pipelines.core.settings import PROJECT_ROOT
from pipelines.core.view_spec import FeatureView, check_view
from pipelines.features.trailing_state import trailing_features_stream
from pipelines.features.transforms import view_features

CONTRACTS = load_contracts(PROJECT_ROOT / "conf" / "contracts")
SCHEMA = "account_id string, event_time timestamp, amount_usd double"
LATENESS = "2500ms"
KINDS = {
    "trailing": {"aggregations": [{"column": "*", "functions": ["count"], "windows": ["1h"]}]},
    "sliding": {"window": "10m", "aggregations": [{"column": "amount_usd", "functions": ["sum"]}]},
    "session": {"gap": "5m", "aggregations": [{"column": "amount_usd", "functions": ["sum"]}]},
}


def view(kind: str) -> FeatureView:
    spec = {"name": f"lateness_{kind}", "source": {"contract": "transactions"}, "entity": "account_id",
            "event_time": "event_time", "kind": kind, "allowed_lateness": LATENESS, **KINDS[kind]}
    built = build(FeatureView, spec, "test")
    check_view(built, CONTRACTS, "test")
    return built


def watermark_after(spark, folder, transform, steps) -> datetime:
    """The watermark a stream reports once it has processed ``steps`` (each its own batch)."""
    folder.mkdir()
    stream = spark.readStream.schema(SCHEMA).option("recursiveFileLookup", "true").parquet(str(folder))
    query = transform(stream).writeStream.format("noop").outputMode("append").start()
    try:
        for i, rows in enumerate(steps):
            spark.createDataFrame(rows, SCHEMA).coalesce(1).write.parquet(str(folder / f"step{i}"))
            query.processAllAvailable()
        text = query.lastProgress["eventTime"]["watermark"]
    finally:
        query.stop()
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_sub_second_lateness_gives_every_view_kind_the_exact_watermark(spark, tmp_path, kind):
    latest = datetime(2026, 11, 23, 10, 0, 0, tzinfo=timezone.utc)
    steps = [[("a", latest - timedelta(seconds=30), 1.0), ("b", latest, 2.0)],
             [("a", latest - timedelta(seconds=1), 3.0)]]  # a second batch: it runs under the new watermark
    subject = view(kind)
    transform = (lambda s: trailing_features_stream(s, subject)) if kind == "trailing" else \
        (lambda s: view_features(s, subject))
    assert watermark_after(spark, tmp_path / kind, transform, steps) == \
        datetime(2026, 11, 23, 9, 59, 57, 500_000, tzinfo=timezone.utc)
