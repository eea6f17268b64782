"""Training sets: spines, the point-in-time join with its leakage guard, builds tracked in MLflow
(and rebuilt from a run id), and the Spark-free reader of training tables."""
