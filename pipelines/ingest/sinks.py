"""The ``foreachBatch`` handler of the ingest stream: valid rows to bronze, invalid ones to the
dead-letter table and its Kafka topic.

Both Delta writes are exactly once (:func:`pipelines.core.delta.write_delta_idempotent`). Kafka
has no such transaction with Delta, so the ``<topic>.dlq`` copy is at least once: before
publishing, the handler checks whether the batch's dead letters are already in the Delta
dead-letter table (then it was published too, and it skips); a crash between the publish and
the Delta commit re-publishes that batch once, with ``dlq.source_*`` headers to dedupe on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.contracts.registry import SchemaRegistry
from pipelines.core.contract_spec import Contract
from pipelines.core.delta import streaming_query_id, write_delta_idempotent
from pipelines.core.settings import KafkaSettings, StorageSettings, TopicSettings
from pipelines.ingest.avro_records import resolve_with_registry
from pipelines.ingest.bronze import bronze_rows, dead_letter_messages, dead_letter_rows

log = logging.getLogger(__name__)


def publish_to_kafka(messages: DataFrame, kafka: KafkaSettings, topic: str) -> None:
    """Write ``messages`` (key, value, headers) to ``topic`` with Spark's Kafka sink."""
    writer = messages.write.format("kafka").option("topic", topic)
    for key, value in kafka.spark_producer_options().items():
        writer = writer.option(key, value)
    writer.save()


@dataclass(frozen=True)
class BatchResult:
    """What one ``foreachBatch`` call wrote (or found already written, on a replay)."""

    bronze_rows: int
    dead_letter_rows: int
    dead_letters_published: bool


class IngestBatchWriter:
    """``foreachBatch`` handler of one topic: valid rows -> bronze, invalid -> dead letter.

    Input: the validated, deduplicated stream (see :mod:`pipelines.ingest.bronze`). The handler keeps
    each batch's :class:`BatchResult` for the progress listener (``results``).
    """

    def __init__(self, topic: str, contract: Contract, kafka: KafkaSettings, storage: StorageSettings,
                 publish_dead_letters: bool = True, registry: SchemaRegistry | None = None):
        self.topic = topic
        #: For Avro topics: the registry that resolves schema ids the query did not know when it
        #: started.
        self.registry = registry
        if contract.format == "avro" and registry is None:
            raise ValueError(f"{topic}: an Avro topic's batch handler needs the schema registry")
        self.contract = contract
        self.kafka = kafka
        self.storage = storage
        self.publish_dead_letters = publish_dead_letters
        self.results: dict[int, BatchResult] = {}
        self._lock = threading.Lock()
        # A batch can be a replay only if it is the first this handler sees (the one a crash
        # interrupted) or not newer than the last one: only then is the dead-letter check needed.
        self._last_batch_id: int | None = None

    def app_id(self, spark: SparkSession) -> str:
        return f"ingest:{self.topic}:{streaming_query_id(spark)}"

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        self.write_batch(batch, batch_id, self.app_id(batch.sparkSession))

    def write_batch(self, batch: DataFrame, batch_id: int, app_id: str) -> BatchResult:
        """Write one batch idempotently under ``(app_id, batch_id)``.

        Safe to call again with the same arguments, in this handler or in a new one (as after a
        restart): the Delta writes are skipped by their transaction ids, the Kafka publish by a
        look-up in the dead-letter table, made only when the batch id could be a replay.
        """
        started = time.monotonic()
        cached = batch.persist(StorageLevel.MEMORY_AND_DISK)
        batch = cached
        try:
            if self.contract.format == "avro":
                batch = self._resolve_schema_ids(batch)
            counts = {
                row["valid"]: row["n"]
                for row in batch.groupBy(F.col("error_class").isNull().alias("valid"))
                .agg(F.count(F.lit(1)).alias("n"))
                .collect()
            }
            valid, invalid = counts.get(True, 0), counts.get(False, 0)
            counted = time.monotonic()
            if valid:
                write_delta_idempotent(
                    bronze_rows(batch, self.contract), self.storage.bronze_path(self.topic),
                    app_id, batch_id, ["event_date"],
                )
            bronze_written = time.monotonic()
            published = False
            if invalid:
                dead_letters = dead_letter_rows(batch, self.contract).persist(StorageLevel.MEMORY_AND_DISK)
                try:
                    replay_possible = self._last_batch_id is None or batch_id <= self._last_batch_id
                    replay = replay_possible and self._already_dead_lettered(dead_letters, invalid)
                    if self.publish_dead_letters and not replay:
                        publish_to_kafka(dead_letter_messages(dead_letters), self.kafka,
                                         self.kafka.dlq_topic_for(self.topic))
                        published = True
                    write_delta_idempotent(dead_letters, self.storage.dead_letter_path, app_id, batch_id,
                                           ["failed_date"])
                finally:
                    dead_letters.unpersist()
        finally:
            cached.unpersist()
        log.debug("%s batch %d: read+validate+dedupe %.1fs, bronze %.1fs, dead letters %.1fs", self.topic, batch_id,
                  counted - started, bronze_written - counted, time.monotonic() - bronze_written)
        self._last_batch_id = batch_id if self._last_batch_id is None else max(self._last_batch_id, batch_id)
        result = BatchResult(valid, invalid, published)
        with self._lock:
            self.results[batch_id] = result
        return result

    def _resolve_schema_ids(self, batch: DataFrame) -> DataFrame:
        """Ask the registry about the ids the query could not decode (raises if it cannot be
        reached, or if an id is a new version of this topic's subject: see
        :mod:`pipelines.ingest.avro_records`)."""
        return resolve_with_registry(batch, self.registry, TopicSettings.subject(self.topic))

    def _already_dead_lettered(self, dead_letters: DataFrame, expected: int) -> bool:
        """True if every row of this batch is already in the dead-letter table (a replay)."""
        spark = dead_letters.sparkSession
        path = self.storage.dead_letter_path
        if not DeltaTable.isDeltaTable(spark, path):
            return False
        batch_keys = dead_letters.select("failed_date", "kafka_topic", "kafka_partition", "kafka_offset")
        dates = [r[0] for r in batch_keys.select("failed_date").distinct().collect()]
        stored = (
            spark.read.format("delta").load(path)
            .filter(F.col("failed_date").isin(dates) & (F.col("kafka_topic") == self.topic))
            .select("failed_date", "kafka_topic", "kafka_partition", "kafka_offset")
        )
        return batch_keys.join(stored, batch_keys.columns, "left_semi").count() == expected
