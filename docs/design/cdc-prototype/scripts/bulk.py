"""Change events/s for one bulk statement. usage: bulk.py insert|update N
insert: INSERT N rows in one transaction; update: UPDATE every row with id in the bulk range (one transaction).
Reports commit->last event, first event->last event, events/s over both."""
import json, sys, threading, time
import psycopg
from confluent_kafka import Consumer, TopicPartition

MODE, N = sys.argv[1], int(sys.argv[2])
TOPIC = "cdc.public.accounts"
c = Consumer({"bootstrap.servers": "127.0.0.1:19092", "group.id": f"bulk-{time.time()}", "enable.auto.commit": False})
lo, hi = c.get_watermark_offsets(TopicPartition(TOPIC, 0), timeout=10)
c.assign([TopicPartition(TOPIC, 0, hi)])
op = {"insert": "c", "update": "u"}[MODE]
stamps = []
def consume():
    while len(stamps) < N:
        for m in c.consume(10000, 0.2):
            if m.error() or m.value() is None:
                continue
            if json.loads(m.value())["op"] == op:
                stamps.append(time.time())
t = threading.Thread(target=consume, daemon=True); t.start(); time.sleep(1)
with psycopg.connect("host=127.0.0.1 port=15432 user=postgres dbname=app") as db:
    t0 = time.time()
    if MODE == "insert":
        db.execute("INSERT INTO accounts(owner, balance) SELECT 'bulk-' || g, g FROM generate_series(1, %s) g", (N,))
    else:
        db.execute("UPDATE accounts SET balance = balance + 1, updated_at = now() WHERE owner LIKE 'bulk-%%'")
    db.commit(); tc = time.time()
t.join(timeout=600); c.close()
print(json.dumps({"mode": MODE, "n": N, "received": len(stamps), "sql_s": round(tc - t0, 2),
                  "commit_to_first_s": round(stamps[0] - tc, 2), "commit_to_last_s": round(stamps[-1] - tc, 2),
                  "events_per_s_from_commit": round(len(stamps) / (stamps[-1] - tc)),
                  "events_per_s_first_to_last": round(len(stamps) / (stamps[-1] - stamps[0]))}))
