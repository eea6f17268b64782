#!/bin/bash
# Kafka Connect 4.1.1 worker, distributed mode (1 worker), its own JVM on Java 17, REST on 127.0.0.1:18083.
set -euo pipefail
ROOT=/work/proto-cdc; C=$ROOT/run/connect; mkdir -p $C
DISCOVERY=${PLUGIN_DISCOVERY:-service_load}
cat > $C/worker.properties <<P
bootstrap.servers=127.0.0.1:19092
group.id=proto-cdc-connect
listeners=http://127.0.0.1:18083
rest.advertised.host.name=127.0.0.1
plugin.path=$ROOT/plugins
plugin.discovery=$DISCOVERY
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=false
value.converter.schemas.enable=false
config.storage.topic=_connect-configs
offset.storage.topic=_connect-offsets
status.storage.topic=_connect-status
config.storage.replication.factor=1
offset.storage.replication.factor=1
status.storage.replication.factor=1
offset.storage.partitions=1
status.storage.partitions=1
offset.flush.interval.ms=${OFFSET_FLUSH_MS:-5000}
exactly.once.source.support=${EOS:-disabled}
topic.creation.enable=true
P
cat > $C/log4j2.properties <<P
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $C/connect.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.reflections.name = org.reflections
logger.reflections.level = error
P
setsid java -Xmx512m -Xms128m -XX:+UseG1GC -Djava.awt.headless=true \
  -Dlog4j2.configurationFile=$C/log4j2.properties \
  -cp "$ROOT/jars/connect/*" org.apache.kafka.connect.cli.ConnectDistributed $C/worker.properties \
  > $C/service.out 2>&1 < /dev/null &
echo $! > $C/service.pid
echo "connect pid $(cat $C/service.pid)"
