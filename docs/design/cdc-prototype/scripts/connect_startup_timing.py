"""Stop Connect (SIGTERM, wait), relaunch it, time: REST answers, connector+task RUNNING, first change event of a
probe row inserted right after launch. usage: connect_startup_timing.py runs [plugin_discovery]"""
import json, os, signal, subprocess, sys, time, urllib.request
import psycopg
from confluent_kafka import Consumer, TopicPartition
ROOT, TOPIC = "/work/proto-cdc", "cdc.public.accounts"
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
disc = sys.argv[2] if len(sys.argv) > 2 else "service_load"

def get(path):
    with urllib.request.urlopen(f"http://127.0.0.1:18083{path}", timeout=1) as r:
        return json.load(r)

def stop():
    pid = int(open(f"{ROOT}/run/connect/service.pid").read())
    t = time.time(); os.kill(pid, signal.SIGTERM)
    while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(") ", 1)[1][0] != "Z":
        time.sleep(0.05)
    return time.time() - t

for run in range(runs):
    stop_s = stop()
    c = Consumer({"bootstrap.servers": "127.0.0.1:19092", "group.id": f"st-{time.time()}", "enable.auto.commit": False})
    lo, hi = c.get_watermark_offsets(TopicPartition(TOPIC, 0), timeout=10); c.assign([TopicPartition(TOPIC, 0, hi)])
    probe = f"probe-{time.time()}"
    with psycopg.connect("host=127.0.0.1 port=15432 user=postgres dbname=app", autocommit=True) as db:
        db.execute("INSERT INTO accounts(owner) VALUES (%s)", (probe,))
    t0 = time.time()
    subprocess.run([f"{ROOT}/scripts/connect_up.sh"], check=True, env={**os.environ, "PLUGIN_DISCOVERY": disc}, capture_output=True)
    rest = running = event = None
    while event is None and time.time() - t0 < 120:
        if rest is None:
            try: get("/"); rest = time.time() - t0
            except Exception: pass
        if rest is not None and running is None:
            try:
                s = get("/connectors/accounts-cdc/status")
                if s["connector"]["state"] == "RUNNING" and s["tasks"] and s["tasks"][0]["state"] == "RUNNING":
                    running = time.time() - t0
            except Exception: pass
        for m in c.consume(100, 0.05):
            if m.value() and probe.encode() in m.value():
                event = time.time() - t0
    c.close()
    print(json.dumps({"run": run, "plugin.discovery": disc, "sigterm_stop_s": round(stop_s, 2), "rest_up_s": round(rest, 2),
                      "task_running_s": round(running, 2), "first_event_s": round(event, 2)}), flush=True)
