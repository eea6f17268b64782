"""Training-set build time: the project's point-in-time join against pandas ``merge_asof`` and
DuckDB's ``ASOF JOIN`` on the same data, in the same run, with identical results required.

Data (numpy, seeded): a feature table of one view (``account_velocity``'s columns: entity,
event time, ``computed_at``, four features) with unique (entity, event time), and a spine of
(spine id, entity, timestamp) over the same 30 days; about 5 % of spine entities have no rows.
``max_age`` 7 days. Written once as Parquet (and as Delta for Spark, untimed).

Methods, each in its own process (so that its peak memory is its own), each timed from reading
its inputs to the joined result written as Parquet:

* ``spark``: :func:`pipelines.training.join.point_in_time_join` (union + running max per entity);
* ``spark-range``: the textbook alternative, a range join on entity and ``[T - max_age, T]`` then
  ``row_number()`` per spine row (the strategy the project did not pick; shown to say why);
* ``pandas``: ``merge_asof(by=entity, tolerance=7d, direction="backward")``;
* ``duckdb``: ``ASOF LEFT JOIN`` (then the 7-day tolerance as a CASE);
* ``build``: the whole ``fp-build-training-set`` path (pinned reads, join, leakage guard and
  report, content hash, histograms, Delta write, MLflow run), for what a user waits for.

Every method's rows (by spine id: feature event time and the four features) must equal the
``spark`` method's, or the run fails. Peak memory: the method process's peak RSS (``VmHWM``),
plus the Spark JVM's for Spark methods.

Results: ``bench/results/training-<time>.json`` and a table on stdout.

Usage: python bench/training_set.py --env local [--sizes 100000x1000000,1000000x10000000]
       [--entities 100000] [--methods spark,spark-range,pandas,duckdb,build]
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START = datetime(2026, 10, 1, tzinfo=timezone.utc)
SPAN = timedelta(days=30)
MAX_AGE = timedelta(days=7)
FEATURES = ["count_1h", "sum_amount_usd_1h", "max_amount_usd_1d", "last_balance_usd_1d"]
METHODS = ("spark", "spark-range", "pandas", "duckdb", "build")
COMPARED = ["account_velocity__event_time", *[f"account_velocity__{f}" for f in FEATURES]]


# --------------------------------------------------------------------------- data


def make_data(folder: Path, spine_rows: int, feature_rows: int, entities: int, seed: int = 42) -> dict:
    rng = np.random.default_rng(seed)
    span_us = int(SPAN.total_seconds() * 1_000_000)
    start_us = int(START.timestamp() * 1_000_000)

    def names(ids: np.ndarray) -> pa.Array:
        return pc.binary_join_element_wise("acct-", pc.utf8_lpad(pa.array(ids).cast(pa.string()), 7, "0"), "")

    entity = rng.integers(0, entities, feature_rows)
    event_us = start_us + rng.integers(0, span_us, feature_rows)
    # Unique (entity, event time): ties would make the baselines' choice arbitrary.
    _, first = np.unique(np.stack([entity, event_us]), axis=1, return_index=True)
    first.sort()
    entity, event_us = entity[first], event_us[first]
    n = len(first)
    features = pa.table({
        "account_id": names(entity),
        "event_time": pa.array(event_us, pa.timestamp("us", tz="UTC")),
        "computed_at": pa.array(event_us + rng.integers(0, 60_000_000, n), pa.timestamp("us", tz="UTC")),
        "count_1h": pa.array(rng.integers(1, 50, n), pa.int64()),
        "sum_amount_usd_1h": pa.array(np.round(rng.lognormal(5, 1, n), 2)),
        "max_amount_usd_1d": pa.array(np.round(rng.lognormal(4, 1, n), 2)),
        "last_balance_usd_1d": pa.array(np.round(rng.uniform(0, 25_000, n), 2)),
    })
    spine = pa.table({
        "spine_id": pa.array(np.arange(spine_rows), pa.int64()),
        "account_id": names(rng.integers(0, int(entities * 1.05), spine_rows)),
        "ts": pa.array(start_us + rng.integers(0, span_us, spine_rows), pa.timestamp("us", tz="UTC")),
    })
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(features, folder / "features.parquet", row_group_size=1_000_000)
    pq.write_table(spine, folder / "spine.parquet", row_group_size=1_000_000)
    return {"feature_rows": n, "spine_rows": spine_rows, "entities": entities}


# --------------------------------------------------------------------------- methods (one process each)


def _settings(env: str, folder: Path):
    from pipelines.core.settings import load_settings

    return load_settings(env, None, {
        "storage": {"root": str(folder / "lake")},
        "mlflow": {"tracking_uri": f"sqlite:///{folder}/mlflow/mlflow.db", "artifact_location": str(folder / "mlflow" / "artifacts")},
    })


def _spark(env: str, folder: Path):
    """A session and the view request; the Delta copies of the inputs are made once (untimed)."""
    from pipelines.core.session import build_session
    from pipelines.training.join import view_request

    settings = _settings(env, folder)
    spark = build_session(settings.spark)
    spark.sparkContext.setLogLevel("ERROR")
    table_path, spine_path = settings.storage.feature_path("account_velocity"), str(folder / "spine_delta")
    if not (Path(table_path) / "_delta_log").exists():
        spark.read.parquet(str(folder / "features.parquet")).write.format("delta").save(table_path)
        spark.read.parquet(str(folder / "spine.parquet")).write.format("delta").save(spine_path)
    request = view_request(settings.views["account_velocity"], FEATURES, MAX_AGE)
    return spark, settings, request, table_path, spine_path


def run_method(method: str, env: str, folder: Path) -> dict:
    out = folder / f"out-{method}.parquet"
    shutil.rmtree(out, ignore_errors=True)
    if out.exists():
        out.unlink()
    jvm_pid = None
    if method in ("spark", "spark-range", "build"):
        spark, settings, request, table_path, spine_path = _spark(env, folder)
        jvm_pid = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()
        started = time.perf_counter()
        if method == "spark":
            from pipelines.training.join import point_in_time_join

            spine, table = spark.read.format("delta").load(spine_path), spark.read.format("delta").load(table_path)
            point_in_time_join(spine, {"account_velocity": table}, [request], "ts").write.parquet(str(out))
        elif method == "spark-range":
            spine, table = spark.read.format("delta").load(spine_path), spark.read.format("delta").load(table_path)
            range_join(spine, table).write.parquet(str(out))
        else:
            from pipelines.training.build import TrainingSetRequest, build_training_set
            from pipelines.training.spines import SpineSpec

            result = build_training_set(spark, settings, TrainingSetRequest(
                name="bench", spine=SpineSpec("delta", path=spine_path, timestamp_column="ts"), views=(request,)))
            spark.read.format("delta").load(result.path).write.parquet(str(out))  # for the comparison (untimed below)
        seconds = time.perf_counter() - started
        if method == "build":
            seconds = result.seconds
    elif method == "pandas":
        started = time.perf_counter()
        pandas_join(folder, out)
        seconds = time.perf_counter() - started
    else:
        started = time.perf_counter()
        duckdb_join(folder, out)
        seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would report the parent's peak
    # (the generator's arrays) for every method.
    peak = {"process_mb": round(_vm_hwm_mb(os.getpid()))}
    if jvm_pid:
        peak["jvm_mb"] = round(_vm_hwm_mb(jvm_pid))
    return {"method": method, "seconds": round(seconds, 2), "peak": peak}


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def range_join(spine, table):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    s, f = spine.alias("s"), table.alias("f")
    joined = s.join(f, (F.col("s.account_id") == F.col("f.account_id"))
                    & (F.col("f.event_time") <= F.col("s.ts"))
                    & (F.col("f.event_time") >= F.col("s.ts") - F.expr(f"INTERVAL {MAX_AGE.days} DAYS")), "left")
    best = Window.partitionBy("s.spine_id").orderBy(F.col("f.event_time").desc_nulls_last(), F.col("f.computed_at").desc())
    return (joined.withColumn("_n", F.row_number().over(best)).where("_n = 1")
            .select("s.spine_id", "s.account_id", "s.ts", F.col("f.event_time").alias("account_velocity__event_time"),
                    F.col("f.computed_at").alias("account_velocity__computed_at"),
                    *[F.col(f"f.{c}").alias(f"account_velocity__{c}") for c in FEATURES]))


def pandas_join(folder: Path, out: Path) -> None:
    import pandas as pd

    spine = pd.read_parquet(folder / "spine.parquet").sort_values("ts", kind="stable")
    table = pd.read_parquet(folder / "features.parquet").sort_values("event_time", kind="stable")
    table = table.rename(columns={c: f"account_velocity__{c}" for c in table.columns if c != "account_id"})
    table["_t"] = table["account_velocity__event_time"]
    joined = pd.merge_asof(spine, table, left_on="ts", right_on="_t", by="account_id", direction="backward",
                           allow_exact_matches=True, tolerance=pd.Timedelta(MAX_AGE)).drop(columns="_t")
    joined.to_parquet(out, index=False)


def duckdb_join(folder: Path, out: Path) -> None:
    import duckdb

    fresh = f"f.event_time >= s.ts - INTERVAL {MAX_AGE.days} DAY"
    columns = ", ".join(f"CASE WHEN {fresh} THEN f.{c} END AS account_velocity__{c}"
                        for c in ["event_time", "computed_at", *FEATURES])
    with duckdb.connect() as con:
        con.execute("SET threads = 2")
        con.execute(f"""
            COPY (SELECT s.spine_id, s.account_id, s.ts, {columns}
                  FROM read_parquet('{folder / "spine.parquet"}') s
                  ASOF LEFT JOIN read_parquet('{folder / "features.parquet"}') f
                  ON s.account_id = f.account_id AND s.ts >= f.event_time)
            TO '{out}' (FORMAT parquet)""")


# --------------------------------------------------------------------------- comparison and report


def comparable(path: Path) -> dict[str, np.ndarray]:
    """The compared columns by spine id: times as int64 microseconds (-1 = null), numbers as
    float64 (NaN = null)."""
    table = pq.read_table(path, columns=["spine_id", *COMPARED]).sort_by("spine_id")
    result = {"spine_id": table["spine_id"].to_numpy()}
    for name in COMPARED:
        column = table[name]
        if pa.types.is_timestamp(column.type):
            result[name] = pc.fill_null(column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()), -1).to_numpy()
        else:
            result[name] = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return result


def identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(a[k], b[k], equal_nan=k != "spine_id" and a[k].dtype.kind == "f") for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="local")
    parser.add_argument("--sizes", default="100000x1000000,1000000x10000000", help="SPINExFEATURES,...")
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one method, in its own process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:
        print("RESULT " + json.dumps(run_method(args.method, args.env, Path(args.data))))
        return 0

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    root = PROJECT_ROOT / ".local" / "bench" / f"training-{stamp}"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = {"machine": {"cpus": os.cpu_count(), "python": host.python_version(), "platform": host.platform()},
              "started": stamp, "max_age_days": MAX_AGE.days, "sizes": []}
    for size in args.sizes.split(","):
        spine_rows, feature_rows = (int(x) for x in size.split("x"))
        folder = root / size
        started = time.perf_counter()
        data = make_data(folder, spine_rows, feature_rows, args.entities)
        print(f"\n{size}: {data} (generated in {time.perf_counter() - started:.0f} s)", flush=True)
        results = []
        for method in methods:
            done = subprocess.run([sys.executable, __file__, "--env", args.env, "--method", method, "--data", str(folder)],
                                  capture_output=True, text=True, cwd=PROJECT_ROOT)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(done.stdout[-3000:], done.stderr[-5000:], file=sys.stderr)
                raise SystemExit(f"{method} failed at {size}")
            result = json.loads(lines[-1][len("RESULT "):])
            results.append(result)
            print(f"  {method:<12} {result['seconds']:>8.1f} s   peak {result['peak']}", flush=True)
        reference = comparable(folder / "out-spark.parquet") if "spark" in methods else None
        for result in results:
            result["identical_to_spark"] = (identical(reference, comparable(folder / f"out-{result['method']}.parquet"))
                                            if reference is not None else None)
        matched = int((reference["account_velocity__event_time"] >= 0).sum()) if reference is not None else None
        report["sizes"].append({**data, "matched_spine_rows": matched, "results": results})
        verdicts = ", ".join(f"{r['method']}: {r['identical_to_spark']}" for r in results)
        print(f"  identical to spark: {verdicts}; {matched} of {spine_rows} spine rows matched", flush=True)
        if any(r["identical_to_spark"] is False for r in results):
            raise SystemExit(f"results differ at {size}: see {folder}")
    out = PROJECT_ROOT / "bench" / "results" / f"training-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {out}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
