#!/bin/bash
# SIGTERM the standalone worker, insert a probe row, relaunch, time task RUNNING and the probe's arrival on sa.public.accounts.
ROOT=/work/proto-cdc; cd $ROOT
pid=$(cat run/standalone/service.pid); kill -TERM $pid; while kill -0 $pid 2>/dev/null; do sleep 0.1; done
probe="probe-sa-$(date +%s%N)"
psql -q -h 127.0.0.1 -p 15432 -U postgres -d app -c "INSERT INTO accounts(owner) VALUES ('$probe')"
t0=$(date +%s.%N)
setsid java -Xmx512m -Xms128m -XX:+UseG1GC -Djava.awt.headless=true -Dlog4j2.configurationFile=run/standalone/log4j2.properties \
  -cp "jars/connect/*" org.apache.kafka.connect.cli.ConnectStandalone run/standalone/worker.properties config/standalone-connector.json \
  >> run/standalone/service.out 2>&1 < /dev/null & echo $! > run/standalone/service.pid
for i in $(seq 1 400); do curl -s http://127.0.0.1:18084/connectors/accounts-sa/status 2>/dev/null | grep -q '"tasks":\[{"id":0,"state":"RUNNING"' && break; sleep 0.1; done
t1=$(date +%s.%N)
/work/main/.venv/bin/python - "$probe" <<'PY'
import sys, time
from confluent_kafka import Consumer, TopicPartition
c = Consumer({"bootstrap.servers": "127.0.0.1:19092", "group.id": f"p{time.time()}", "enable.auto.commit": False})
lo, hi = c.get_watermark_offsets(TopicPartition("sa.public.accounts", 0), timeout=10)
c.assign([TopicPartition("sa.public.accounts", 0, max(lo, hi - 50))])
end = time.time() + 60
while time.time() < end:
    m = c.poll(0.05)
    if m and m.value() and sys.argv[1].encode() in m.value(): break
PY
t2=$(date +%s.%N)
echo "{\"mode\": \"standalone\", \"task_running_s\": $(echo "$t1-$t0"|bc), \"first_event_s\": $(echo "$t2-$t0"|bc), \"load\": \"$(cut -d' ' -f1 /proc/loadavg)\"}"
