"""Real-time ML feature platform on Spark Structured Streaming, Delta Lake, Kafka and Redis."""

from setuptools import find_packages, setup

setup(
    name="feature-platform",
    version="0.1.0",
    description=__doc__,
    # The wheel runs on Databricks Runtime 18 LTS (Python 3.12) as well as locally on 3.11.
    python_requires=">=3.11",
    packages=find_packages(include=["pipelines", "pipelines.*", "jobs"]),
    package_data={"pipelines.local": ["jvm/*/pom.xml"]},
    # What a Databricks runtime does not provide. Ranges where a runtime has the package (pandas,
    # pyarrow, pyyaml), so that pip keeps the runtime's copy; exact pins where it does not.
    install_requires=[
        "confluent-kafka[schemaregistry,avro]==2.16.0",
        "fastavro==1.13.1",  # the Avro serializer of the generator and the benchmark baseline
        "redis==8.1.0",
        # C reply parser for redis-py: +24% sink keys/s, -44% read time for 100 entities (BENCHMARKS.md).
        "hiredis==3.5.0",
        "pandas>=2.2,<3",  # pyspark 4.2 does not fully support pandas 3
        "numpy>=1.26",  # the trailing views' state
        "pyarrow>=15",
        "pyyaml>=6.0",
        "deltalake==1.6.6",  # reads the Delta tables without a JVM (training sets, notebooks)
        "threadpoolctl>=3.1",  # fp-score caps a model's native threads (a runtime has it with scikit-learn)
        "prometheus-client==0.26.0",  # the streaming jobs' /metrics endpoint
    ],
    extras_require={
        # What a cluster runtime provides and a laptop needs: `make setup` installs it. Never
        # installed on Databricks, where pip would lay these over the runtime's own Spark, Delta
        # and MLflow.
        "local": [
            # Pinned: the JVM side must match (delta-spark 4.4.0 <-> io.delta:delta-spark_4.2_2.13:4.4.0;
            # 4.4.1's jar is not served by the Maven mirror this project builds against).
            "pyspark==4.2.0",
            "delta-spark==4.4.0",
            "mlflow==3.17.2",
            "pyarrow==25.0.1",
            "pyyaml==6.0.3",
            "matplotlib>=3.9",  # the training-set build's feature histograms
            "psycopg[binary]==3.3.9",  # the local platform's PostgreSQL: its bootstrap, the generator's writes
        ],
        # What the notebooks import beyond the package: the training notebook's model (scikit-learn,
        # logged by MLflow in the skops format) and the kernel they run on.
        "notebooks": [
            "scikit-learn>=1.5",
            "skops>=0.10",
            "ipython>=8.20",
            "ipykernel>=6.29",
        ],
        "dev": [
            "pytest==9.2.0",
            "ruff==0.17.5",  # make lint: pyflakes' checks, import order, no imports inside functions
            "import-linter==2.16",  # make lint: the stage layers and no import cycles (.importlinter)
            "chispa==0.12.0",
            "nbformat>=5.10",  # the tests execute the notebooks
            "nbclient>=0.10",
            "databricks-bundles==1.22.1",  # typed bundle models: validates databricks.yml in tests
            "duckdb==2.0.0",  # the ASOF JOIN baseline of bench/training_set.py
        ],
    },
    entry_points={
        "console_scripts": [
            "fp-ingest=jobs.ingest:main",
            "fp-generate=jobs.generate:main",
            "fp-reconcile=jobs.reconcile:main",
            "fp-monitor=jobs.monitor:main",
            "fp-features=jobs.features:main",
            "fp-live=jobs.live:main",
            "fp-score=jobs.score:main",
            "fp-cdc=jobs.cdc:main",
            "fp-model-quality=jobs.model_quality:main",
            "fp-skew=jobs.skew:main",
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
