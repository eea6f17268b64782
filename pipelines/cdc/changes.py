"""Debezium change events -> checked, typed change rows: a pure transform, the same on a static
DataFrame (tests, replays of bronze or Kafka) and on the streaming one of ``fp-cdc``.

A change-event topic carries, per committed row change, a schemaless JSON envelope keyed by the
row's primary key (``{"account_id": "acct-1"}``)::

    {"before": {...} | null, "after": {...} | null, "op": "c" | "u" | "d" | "r",
     "source": {"lsn": 26640960, "txId": 743, "ts_us": 1796391648849165, "snapshot": "false", ...},
     "ts_us": ...}

and, after a delete, a tombstone (the same key, a null value) for log compaction. What each
becomes (:func:`change_rows`):

* ``c`` (insert), ``u`` (update), ``r`` (a snapshot's read): the row is ``after``, checked
  against the table's contract field by field as an event is
  (:func:`pipelines.ingest.json_records.json_verdicts`: missing, renamed, null or mistyped
  columns are errors); its key must be the message key's.
* ``d`` (delete): only the key is known, from the message key. With the table's default replica
  identity ``before`` holds the key and *type defaults* for the other columns (``""``, ``0``,
  the epoch): never read as values.
* a tombstone: recognised (``cdc_tombstone``), no change of its own (the delete before it is).
* anything else (not JSON, an unknown ``op``, no LSN or commit time, a key that is not the
  table's): an error, for the dead-letter table with the original bytes.

The envelope's columns: ``cdc_op``, ``cdc_lsn`` (the change's position in the write-ahead log:
per key, the order of its changes), ``cdc_tx_id``, ``cdc_commit_time`` (``source.ts_us``: when
the transaction committed; a snapshot's read time for ``r``), ``cdc_snapshot`` and
``cdc_deleted``. A column the table gained after the contract was written is not an error: its
value is kept, as text by name, in ``cdc_extra`` (``fp-cdc`` adds it to the tables as a
new nullable column).
"""

from __future__ import annotations

import dataclasses

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, MapType, StringType, StructField, StructType

from pipelines.contracts.spark_schema import spark_type
from pipelines.contracts.validation import ValidationRules
from pipelines.core.contract_spec import Contract
from pipelines.ingest.json_records import json_verdicts
from pipelines.ingest.records import kafka_records

OPS = ("c", "u", "d", "r")
#: The envelope as Spark's JSON reader takes it apart: ``before`` and ``after`` as their JSON
#: texts (a string field of an object value is the object's text), the source's position.
ENVELOPE_SCHEMA = StructType([
    StructField("before", StringType()),
    StructField("after", StringType()),
    StructField("op", StringType()),
    StructField("source", StructType([
        StructField("lsn", LongType()),
        StructField("txId", LongType()),
        StructField("ts_us", LongType()),
        StructField("snapshot", StringType()),
    ])),
])
#: The envelope's columns of a change row, in order.
CHANGE_COLUMNS = ("cdc_op", "cdc_lsn", "cdc_tx_id", "cdc_commit_time", "cdc_snapshot", "cdc_deleted")


def _after_extra(after_text: Column, contract: Contract) -> Column:
    """The columns of ``after`` the contract does not declare: name -> value as text (a string
    unquoted, anything else its JSON); null when there are none."""
    declared = F.array(*[F.lit(n) for n in contract.field_names])
    read = F.from_json(after_text, MapType(StringType(), StringType()))
    extra = F.map_filter(read, lambda k, _: ~F.array_contains(declared, k))
    return F.when(F.size(extra) > 0, extra)


def change_rows(records: DataFrame, contract: Contract, rules: ValidationRules,
                batch_time: Column | None = None) -> DataFrame:
    """Kafka records of a change-event topic -> one row per record (none dropped): the
    ``kafka_*`` columns, ``validated_at``, the contract's fields (typed; for a delete the key
    only; null for an invalid record), :data:`CHANGE_COLUMNS`, ``cdc_extra``,
    ``cdc_tombstone``, ``error_class`` and ``error_reason`` (null exactly when the record is a
    valid change or a tombstone). ``kafka_value`` is kept for invalid records only."""
    if not contract.is_changes:
        raise ValueError(f"contract {contract.name!r} is not a change-event contract (format: debezium)")
    key_field = contract.key_field
    with_time = kafka_records(records, batch_time)
    raw, key_raw = F.col("kafka_value"), F.col("kafka_key")
    size_ok = F.octet_length(raw) <= rules.max_value_bytes
    text = F.when(raw.isNotNull() & size_ok & F.call_function("is_valid_utf8", raw), raw.cast("string"))
    envelope = F.from_json(text, ENVELOPE_SCHEMA)
    parsed = with_time.withColumns({
        "_cdc_json": F.call_function("try_parse_json", text),
        "_cdc_env": envelope,
        # The message key's primary key (the key converter's schemaless JSON object).
        "_cdc_key": F.get_json_object(key_raw.cast("string"), f"$['{key_field}']"),
    })
    env = F.col("_cdc_env")
    op = env["op"]
    rows = parsed.withColumn("_cdc_after", F.when(op.isin("c", "u", "r"), env["after"]).cast("binary"))
    # The row of c/u/r, checked as an event's value is (the contract's rules, its reasons). A
    # column the contract does not declare is one the table gained: kept, not refused.
    checked = json_verdicts(rows, dataclasses.replace(contract, strict=False), rules, value="_cdc_after")
    tombstone = raw.isNull() & key_raw.isNotNull()
    is_object = F.col("_cdc_json").isNotNull() & F.startswith(F.ltrim(text), F.lit("{"))
    source = env["source"]
    key_of_after = F.col(key_field).cast("string")
    classes = [
        (tombstone, F.lit(None)),
        (raw.isNull(), F.lit("not_json")),
        (~size_ok, F.lit("oversize")),
        (text.isNull(), F.lit("not_utf8")),
        (~is_object, F.lit("not_json")),
        (op.isNull() | ~op.isin(*OPS), F.lit("bad_envelope")),
        (source["lsn"].isNull() | source["ts_us"].isNull(), F.lit("bad_envelope")),
        (op.isin("c", "u", "r") & env["after"].isNull(), F.lit("bad_envelope")),
        (F.col("_cdc_key").isNull(), F.lit("bad_key")),
        ((op == "d"), F.lit(None)),
        (F.col("error_class").isNotNull(), F.col("error_class")),
        (key_of_after != F.col("_cdc_key"), F.lit("key_mismatch")),
    ]
    verdict = F.lit(None).cast("string")
    for condition, name in reversed(classes):
        verdict = F.when(F.coalesce(condition, F.lit(False)), name).otherwise(verdict)
    judged = checked.withColumn("_cdc_class", verdict)
    cls = F.col("_cdc_class")
    reason = (
        F.when(cls == "not_json", F.when(raw.isNull(), F.lit("value is null and so is the key: neither a change "
                                                             "nor a tombstone"))
               .otherwise(F.lit("value is not a JSON object (a Debezium change event)")))
        .when(cls == "oversize", F.format_string(f"value is %d bytes, over the limit of {rules.max_value_bytes} bytes",
                                                 F.octet_length(raw)))
        .when(cls == "not_utf8", F.lit("value is not UTF-8"))
        .when(cls == "bad_envelope", F.when(op.isNull(), F.lit("the change event has no 'op'"))
              .when(~op.isin(*OPS), F.format_string("the change event's op %s is not one of c, u, d, r", op))
              .when(op.isin("c", "u", "r") & env["after"].isNull(),
                    F.format_string("the change event's op is %s and it has no 'after'", op))
              .otherwise(F.lit("the change event's source has no 'lsn' or no 'ts_us' (commit time)")))
        .when(cls == "bad_key", F.lit(f"the message key has no '{key_field}': not a key of this table"))
        .when(cls == "key_mismatch", F.format_string(f"'after' has {key_field} %s, the message key %s",
                                                     key_of_after, F.col("_cdc_key")))
        .when(cls.isNotNull(), F.concat(F.lit("'after': "), F.col("error_reason")))
    )
    valid = cls.isNull()
    change = valid & ~tombstone
    deleted = op == "d"
    snapshot = source["snapshot"]
    return judged.select(
        *[F.col(c) for c in with_time.columns if c != "kafka_value"],
        F.when(~valid, raw).alias("kafka_value"),
        *[(F.when(change & deleted, F.col("_cdc_key")).otherwise(F.when(change, F.col(f.name)))
           if f.name == key_field else F.when(change & ~deleted, F.col(f.name))).cast(spark_type(f)).alias(f.name)
          for f in contract.fields],
        F.when(change, op).alias("cdc_op"),
        F.when(change, source["lsn"]).alias("cdc_lsn"),
        F.when(change, source["txId"]).alias("cdc_tx_id"),
        F.when(change, F.timestamp_micros(source["ts_us"])).alias("cdc_commit_time"),
        F.when(change, F.coalesce(snapshot.isin("true", "first", "first_in_data_collection", "last",
                                                "last_in_data_collection", "incremental"),
                                  F.lit(False))).alias("cdc_snapshot"),
        F.when(change, deleted).alias("cdc_deleted"),
        F.when(change & ~deleted, _after_extra(env["after"], contract)).alias("cdc_extra"),
        F.when(valid, tombstone).alias("cdc_tombstone"),
        cls.alias("error_class"),
        F.when(~valid, reason).alias("error_reason"),
    )
