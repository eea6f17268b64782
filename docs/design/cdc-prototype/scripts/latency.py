"""Commit -> Kafka latency of single-row commits through Debezium.

Inserts N rows into public.accounts, one autocommitted INSERT each, `interval` s apart; a consumer thread
(assigned at the topic's end before the first insert) stamps each change event on arrival.
latency = arrival time - time the INSERT's commit returned to the client (same host clock). Also reports
arrival - source.ts_ms (Postgres' commit timestamp as carried by Debezium).
usage: latency.py N interval tag
"""
import json, statistics, sys, threading, time
import psycopg
from confluent_kafka import Consumer, TopicPartition, OFFSET_END

N = int(sys.argv[1]) if len(sys.argv) > 1 else 300
INTERVAL = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
TAG = sys.argv[3] if len(sys.argv) > 3 else f"lat{int(time.time())}"
TOPIC = sys.argv[4] if len(sys.argv) > 4 else "cdc.public.accounts"

c = Consumer({"bootstrap.servers": "127.0.0.1:19092", "group.id": f"lat-{TAG}", "enable.auto.commit": False,
              "fetch.wait.max.ms": 10})
lo, hi = c.get_watermark_offsets(TopicPartition(TOPIC, 0), timeout=10)
c.assign([TopicPartition(TOPIC, 0, hi)])
arrived, src_lat = {}, {}
done = threading.Event()

def consume():
    while not done.is_set():
        m = c.poll(0.05)
        if m is None or m.error() or m.value() is None:
            continue
        now = time.time()
        v = json.loads(m.value())
        a = v.get("after") or {}
        if v.get("op") == "c" and str(a.get("owner", "")).startswith(TAG):
            arrived[a["id"]] = now
            src_lat[a["id"]] = now - v["source"]["ts_ms"] / 1000

t = threading.Thread(target=consume, daemon=True); t.start()
time.sleep(1.0)
committed = {}
with psycopg.connect("host=127.0.0.1 port=15432 user=postgres dbname=app", autocommit=True) as db:
    for i in range(N):
        row = db.execute("INSERT INTO accounts(owner, balance) VALUES (%s, %s) RETURNING id", (f"{TAG}-{i}", i)).fetchone()
        committed[row[0]] = time.time()
        time.sleep(INTERVAL)
deadline = time.time() + 30
while len(arrived) < N and time.time() < deadline:
    time.sleep(0.1)
done.set(); t.join(); c.close()
lat = sorted(arrived[k] - committed[k] for k in committed if k in arrived)
srcl = sorted(src_lat.values())
q = lambda xs, p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]
print(json.dumps({"tag": TAG, "n": N, "interval_s": INTERVAL, "received": len(lat),
                  "client_commit_to_kafka_ms": {"p50": round(q(lat, .5) * 1000, 1), "p95": round(q(lat, .95) * 1000, 1),
                                                 "p99": round(q(lat, .99) * 1000, 1), "max": round(lat[-1] * 1000, 1),
                                                 "mean": round(statistics.mean(lat) * 1000, 1)},
                  "pg_commit_ts_to_kafka_ms": {"p50": round(q(srcl, .5) * 1000, 1), "p99": round(q(srcl, .99) * 1000, 1)}}))
