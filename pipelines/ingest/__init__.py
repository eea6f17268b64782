"""Kafka -> bronze: one streaming query per topic, each record validated (JSON) or decoded (Avro)
against its contract, duplicates dropped, valid rows to the bronze Delta table and invalid ones
to the dead-letter table, exactly once; and the reconciliation of every record sent."""
