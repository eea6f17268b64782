"""Re-check one restart-test tag: distinct rows and duplicates of op=c events whose owner starts with the tag.
usage: check_tag.py TAG_PREFIX expected_count [topic]"""
import json, sys, time
from confluent_kafka import Consumer, TopicPartition
prefix, expected = sys.argv[1], int(sys.argv[2])
topic = sys.argv[3] if len(sys.argv) > 3 else "cdc.public.accounts"
c = Consumer({"bootstrap.servers": "127.0.0.1:19092", "group.id": f"chk-{time.time()}", "enable.auto.commit": False})
lo, hi = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
c.assign([TopicPartition(topic, 0, lo)])
seen, tags, idle = {}, set(), time.time()
while time.time() - idle < 3:
    for m in c.consume(10000, 1.0):
        idle = time.time()
        if m.value() and prefix.encode() in m.value():
            v = json.loads(m.value())
            if v["op"] == "c":
                tag, n = v["after"]["owner"].rsplit("-", 1); tags.add(tag); seen[int(n)] = seen.get(int(n), 0) + 1
print(json.dumps({"tags": sorted(tags), "expected": expected, "distinct": len(seen),
                  "missing": len(set(range(expected)) - set(seen)), "duplicate_events": sum(v - 1 for v in seen.values())}))
