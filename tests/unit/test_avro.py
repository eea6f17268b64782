"""spark-avro 4.1.1 (4.2.0 is not served here) on Spark 4.2: to_avro/from_avro round-trip."""

from __future__ import annotations

from datetime import datetime

from chispa import assert_df_equality
from pyspark.sql import functions as F
from pyspark.sql.avro.functions import from_avro, to_avro

SCHEMA = """{"type": "record", "name": "Txn", "fields": [
  {"name": "transaction_id", "type": "string"},
  {"name": "amount_usd", "type": "double"},
  {"name": "device_fingerprint", "type": ["null", "string"], "default": null},
  {"name": "event_time", "type": {"type": "long", "logicalType": "timestamp-micros"}}]}"""


def test_avro_round_trip_keeps_every_value(spark):
    rows = spark.createDataFrame(
        [("tx-1", 12.5, "abc", datetime(2026, 11, 23, 11, 59, 0, 123456)), ("tx-2", 0.0, None, datetime(2026, 1, 1))],
        "transaction_id string, amount_usd double, device_fingerprint string, event_time timestamp",
    )
    encoded = rows.select(to_avro(F.struct(*rows.columns), SCHEMA).alias("value"))
    decoded = encoded.select(from_avro("value", SCHEMA).alias("event")).select("event.*")
    assert_df_equality(decoded, rows, ignore_row_order=True, ignore_nullable=True)
