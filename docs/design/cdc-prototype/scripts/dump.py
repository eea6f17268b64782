"""Print every record of a topic (from the beginning) as: partition offset key value(or NULL) latency."""
import json, sys, time
from confluent_kafka import Consumer, TopicPartition
topic = sys.argv[1] if len(sys.argv) > 1 else "cdc.public.accounts"
idle = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
c = Consumer({"bootstrap.servers": "127.0.0.1:19092", "group.id": f"dump-{time.time()}",
              "auto.offset.reset": "earliest", "enable.auto.commit": False})
c.subscribe([topic])
last = time.time()
while time.time() - last < idle:
    m = c.poll(0.5)
    if m is None or m.error():
        continue
    last = time.time()
    k = m.key().decode() if m.key() else None
    v = m.value().decode() if m.value() is not None else "NULL(tombstone)"
    print(f"{m.partition()}:{m.offset()} key={k} value={v}")
c.close()
