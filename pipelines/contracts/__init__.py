"""Event contracts enforced at the edge: record validation of JSON values, contracts as Spark and
Avro schemas with the Confluent wire format, schema compatibility, and the schema-registry client
behind ``fp-contracts``. (The contract declarations themselves are loaded by
:mod:`pipelines.core.contract_spec`.)"""
