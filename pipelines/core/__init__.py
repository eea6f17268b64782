"""What every stage shares: the settings and declarations loaded from ``conf/`` (environments,
event contracts, feature views), errors and their exit codes, time and duration primitives, the
Spark session factory, Delta and Kafka helpers, the streaming runner and progress listener, and
the command-line plumbing of the jobs. Imports no stage package."""
