"""Batch jobs over the feature tables: backfill sources (Kafka replays, bronze snapshots, files),
whole-day backfills with ``replaceWhere``, the late-event recompute, and the Redis rehydrate."""
