"""Real-time ML feature platform on Spark Structured Streaming, Delta Lake, Kafka and Redis."""

from setuptools import find_packages, setup

setup(
    name="feature-platform",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["pipelines", "pipelines.*", "jobs"]),
    package_data={"pipelines": ["jvm/*/pom.xml"]},
    install_requires=[
        # Pinned: the JVM side must match (delta-spark 4.4.0 <-> io.delta:delta-spark_4.2_2.13:4.4.0;
        # 4.4.1's jar is not served by the Maven mirror this project builds against).
        "pyspark==4.2.0",
        "delta-spark==4.4.0",
        "confluent-kafka[schemaregistry,avro]==2.16.0",
        "fastavro==1.13.1",  # the Avro serializer of the generator and the benchmark baseline
        "redis==8.1.0",
        # C reply parser for redis-py: +24% sink keys/s, -44% read time for 100 entities (BENCHMARKS.md).
        "hiredis==3.5.0",
        "pyarrow==25.0.1",
        "pandas>=2.2,<3",  # pyspark 4.2 does not fully support pandas 3
        "mlflow==3.17.2",
        "pyyaml==6.0.3",
        "deltalake==1.6.6",  # reads the Delta tables without a JVM (reconciliation, notebooks)
    ],
    extras_require={
        "dev": [
            "pytest==9.2.0",
            "pyflakes==4.1.0",
            "chispa==0.12.0",
            "nbformat>=5.10",
            "nbclient>=0.10",
            "ipykernel>=6.29",
            "matplotlib>=3.9",
            "databricks-bundles==1.22.1",  # typed bundle models: validates databricks.yml in tests
            "duckdb==2.0.0",  # the ASOF JOIN baseline of bench/training_set.py
        ],
    },
    entry_points={
        "console_scripts": [
            "fp-ingest=jobs.ingest:main",
            "fp-generate=jobs.generate:main",
            "fp-reconcile=jobs.reconcile:main",
            "fp-features=jobs.features:main",
            "fp-online=jobs.online:main",
            "fp-backfill=jobs.backfill:main",
            "fp-rehydrate=jobs.rehydrate:main",
            "fp-recompute-late=jobs.recompute_late:main",
            "fp-build-training-set=jobs.build_training_set:main",
            "fp-contracts=jobs.contracts:main",
            "fp-local=pipelines.local.__main__:main",
        ],
    },
)
