"""Kill/restart a component while rows are being inserted; then check every committed row reached Kafka.
usage: restart_test.py connect-kill|pg-restart-fast|pg-restart-immediate [rate_per_s] [seconds] [action_at_s]
Inserts rows owner='<tag>-<i>' (one autocommitted INSERT each), reconnecting on failure; only rows whose
commit returned are counted as committed. Logs connector/task state transitions from the REST API."""
import json, subprocess, sys, threading, time, urllib.request
import psycopg
from confluent_kafka import Consumer, TopicPartition

ACTION = sys.argv[1]
RATE = float(sys.argv[2]) if len(sys.argv) > 2 else 200
SECS = float(sys.argv[3]) if len(sys.argv) > 3 else 30
AT = float(sys.argv[4]) if len(sys.argv) > 4 else 10
TAG = f"{ACTION}-{int(time.time())}"
ROOT = "/work/proto-cdc"
TOPIC = "emb.public.accounts" if ACTION.startswith("embedded") else "cdc.public.accounts"
T0 = time.time()
ev = lambda msg: print(f"[{time.time() - T0:7.2f}s] {msg}", flush=True)

def status():
    try:
        with urllib.request.urlopen("http://127.0.0.1:18083/connectors/accounts-cdc/status", timeout=1) as r:
            s = json.load(r)
        t = s["tasks"][0] if s["tasks"] else {}
        return f"connector={s['connector']['state']} task={t.get('state')}" + (" trace=" + t["trace"].splitlines()[0][:160] if t.get("trace") else "")
    except Exception as e:
        return f"REST unavailable ({type(e).__name__})"

stop = threading.Event()
def watch():
    last = None
    while not stop.is_set() and not ACTION.startswith("embedded"):
        s = status()
        if s != last:
            ev(f"status: {s}"); last = s
        time.sleep(0.25)

committed, failures = [], 0
def insert():
    global failures
    db, i = None, 0
    while time.time() - T0 < SECS:
        try:
            if db is None:
                db = psycopg.connect("host=127.0.0.1 port=15432 user=postgres dbname=app", autocommit=True, connect_timeout=2)
            db.execute("INSERT INTO accounts(owner, balance) VALUES (%s, 0)", (f"{TAG}-{i}",))
            committed.append(i); i += 1
        except psycopg.Error as e:
            failures += 1
            if failures == 1 or failures % 20 == 0:
                ev(f"insert failed ({failures}): {str(e).strip().splitlines()[0][:100]}")
            try: db and db.close()
            except Exception: pass
            db = None; time.sleep(0.2)
        time.sleep(1 / RATE)
    ev(f"inserter done: {len(committed)} committed, {failures} failed attempts")

# a live consumer stamps first arrival after the action
arrivals = []
def live():
    c = Consumer({"bootstrap.servers": "127.0.0.1:19092", "group.id": f"live-{TAG}", "enable.auto.commit": False})
    lo, hi = c.get_watermark_offsets(TopicPartition(TOPIC, 0), timeout=10)
    c.assign([TopicPartition(TOPIC, 0, hi)])
    while not stop.is_set():
        for m in c.consume(1000, 0.1):
            if m.value() and TAG.encode() in m.value():
                arrivals.append(time.time())
    c.close()

threads = [threading.Thread(target=f, daemon=True) for f in (watch, insert, live)]
for t in threads: t.start()
time.sleep(AT)
t_action = time.time()
if ACTION == "connect-kill":
    pid = int(open(f"{ROOT}/run/connect/service.pid").read())
    subprocess.run(["kill", "-9", str(pid)]); ev(f"SIGKILL connect pid {pid}")
    time.sleep(1)
    subprocess.run([f"{ROOT}/scripts/connect_up.sh"], check=True); t_start = time.time(); ev("connect relaunched")
elif ACTION == "embedded-kill":
    pid = int(open(f"{ROOT}/run/embedded/service.pid").read())
    subprocess.run(["kill", "-9", str(pid)]); ev(f"SIGKILL embedded engine pid {pid}")
    time.sleep(1)
    subprocess.run([f"{ROOT}/scripts/embedded_up.sh"], check=True); t_start = time.time(); ev("engine relaunched")
elif ACTION.startswith("pg-restart"):
    mode = ACTION.rsplit("-", 1)[1]
    r = subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "-D", f"{ROOT}/pg/data",
                        "-l", f"{ROOT}/pg/postgres.log", "-m", mode, "-w", "restart"], capture_output=True, text=True)
    ev(f"pg_ctl restart -m {mode} rc={r.returncode}"); t_start = time.time()
# wait for the inserter, then for the stream to drain
threads[1].join()
deadline = time.time() + 120
while time.time() < deadline:
    time.sleep(1)
    if arrivals and time.time() - arrivals[-1] > 5:
        break
stop.set(); time.sleep(0.5)
resumed = [a for a in arrivals if a > t_start + 0.2]
ev(f"first event after action arrived {resumed[0] - t_start:.2f}s after relaunch/restart" if resumed else "no events after action")
# full check from the beginning
c = Consumer({"bootstrap.servers": "127.0.0.1:19092", "group.id": f"check-{TAG}", "auto.offset.reset": "earliest", "enable.auto.commit": False})
lo, hi = c.get_watermark_offsets(TopicPartition(TOPIC, 0), timeout=10)
c.assign([TopicPartition(TOPIC, 0, lo)])
seen = {}
pos, idle_since = lo, time.time()
# (with exactly-once the last offsets are transaction markers that are never delivered: stop when idle)
while pos < hi and time.time() - idle_since < 3:
    for m in c.consume(10000, 1.0):
        pos, idle_since = m.offset() + 1, time.time()
        if m.value() and TAG.encode() in m.value():
            v = json.loads(m.value())
            if v["op"] == "c":
                n = int(v["after"]["owner"].rsplit("-", 1)[1]); seen[n] = seen.get(n, 0) + 1
c.close()
missing = sorted(set(committed) - set(seen))
dups = sum(k - 1 for k in seen.values())
res = {"action": ACTION, "tag": TAG, "committed": len(committed), "failed_attempts": failures, "distinct_on_kafka": len(seen),
       "missing": len(missing), "missing_sample": missing[:10], "duplicate_events": dups,
       "extra_not_acknowledged": len(set(seen) - set(committed))}
print(json.dumps(res))
