#!/bin/bash
# Throwaway Kafka 4.1.1 KRaft broker, same style as pipelines/local/platform.py, on ports 19092/19093.
set -euo pipefail
ROOT=/work/proto-cdc; K=$ROOT/run/kafka; mkdir -p $K
cat > $K/server.properties <<P
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:19093
listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093
advertised.listeners=PLAINTEXT://127.0.0.1:19092
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$K/data
auto.create.topics.enable=false
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=-1
P
cat > $K/log4j2.properties <<P
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $K/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.apache.name = org.apache.kafka
logger.apache.level = warn
P
JAVA=(java -Xmx1g -Xms256m -XX:+UseG1GC -Djava.awt.headless=true -Dlog4j2.configurationFile=$K/log4j2.properties -cp "$ROOT/jars/kafka/*")
if [ ! -f $K/data/meta.properties ]; then
  CID=$(python3 -c 'import base64,uuid
while True:
  c=base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
  if not c.startswith("-"): print(c); break')
  "${JAVA[@]}" kafka.tools.StorageTool format -t $CID -c $K/server.properties
fi
setsid "${JAVA[@]}" kafka.Kafka $K/server.properties > $K/service.out 2>&1 < /dev/null &
echo $! > $K/service.pid
echo "kafka pid $(cat $K/service.pid)"
