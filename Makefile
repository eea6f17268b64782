# Every target sets up what it needs on a fresh machine: Python venv, pip packages, Maven jars,
# and (for demo/test) the local Kafka broker and Redis, started by the project's own code.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    := .local/runs
COUNT  ?= 20000

.PHONY: setup jars up down status reset demo lint test test-unit chaos bench clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -e ".[local,notebooks,dev]"
	touch $@

setup: $(VENV)/.installed jars

jars: $(VENV)/.installed
	$(PY) -m pipelines.local.jars fetch

up: setup
	$(PY) -m pipelines.local up

down:
	$(PY) -m pipelines.local down

status:
	$(PY) -m pipelines.local status

reset: $(VENV)/.installed
	$(PY) -m pipelines.local reset
	rm -rf .local/lake $(RUN)

# The main jobs end to end on the embedded local default, from a clean slate: platform up,
# generate events, ingest them into bronze / dead letter, compute the feature views into
# their tables and Redis, reconcile against what was sent, read a few online values, and
# build a point-in-time training set (an MLflow run in .local/mlflow).
demo: setup
	$(PY) -m pipelines.local reset
	rm -rf .local/lake $(RUN)
	$(PY) -m pipelines.local up
	mkdir -p $(RUN)
	$(PY) jobs/generate.py --env local --count $(COUNT) --summary-file $(RUN)/sent.json
	$(PY) jobs/ingest.py --env local --available-now
	$(PY) jobs/features.py --env local --available-now
	$(PY) jobs/reconcile.py --env local --expect $(RUN)/sent.json
	$(PY) jobs/online.py get --env local --view account_velocity --entity acct-000001,acct-000002,acct-unknown
	$(PY) jobs/build_training_set.py --env local --output fraud_demo --label-cutoff now

# ruff (ruff.toml): pyflakes' checks, import order, no import inside a function; lint-imports
# (.importlinter): the stages of pipelines/ are layers, no import cycles, a Spark-free read path.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check pipelines jobs tests bench
	$(VENV)/bin/lint-imports --no-cache

# Unit tests first (a Spark session, no services: minutes), then the integration tests, which
# start their own Kafka, Redis and schema registry on free ports (and stop them).
test: setup lint
	$(PY) -m pytest tests/unit tests/integration -q -ra --durations=30

# The fast part alone: no broker, Redis or registry is started or needed.
test-unit: setup lint
	$(PY) -m pytest tests/unit -q -ra --durations=5

# The chaos run (tests/chaos.py): the four streaming jobs on the local cluster, FAULTS faults of
# eight kinds at random instants, then exactness checked; figures for RELIABILITY.md. About
# 40 minutes here. Its CI subset is tests/integration/test_cluster.py, in `make test`.
FAULTS ?= 24
chaos: setup
	$(PY) -m tests.chaos --faults $(FAULTS)

# Every benchmark of BENCHMARKS.md, one after the other (about 40 minutes here).
bench: up
	$(PY) bench/ingest_throughput.py --env local
	$(PY) bench/feature_throughput.py --env local
	$(PY) bench/feature_latency.py --env local
	$(PY) bench/online_store.py --env local
	$(PY) bench/backfill.py --env local
	$(PY) bench/training_set.py --env local
	$(PY) bench/avro_ingest.py --env local
	$(PY) bench/cdc_throughput.py --env local

clean: down
	rm -rf .local $(VENV)
