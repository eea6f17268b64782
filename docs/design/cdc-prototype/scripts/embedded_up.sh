#!/bin/bash
# Debezium embedded engine (CdcEngine.java) in its own JVM.
set -euo pipefail
ROOT=/work/proto-cdc; E=$ROOT/run/embedded; mkdir -p $E
[ -f $ROOT/embedded/classes/CdcEngine.class ] || javac -d $ROOT/embedded/classes -cp "$ROOT/jars/embedded/*" $ROOT/embedded/src/CdcEngine.java
setsid java -Xmx256m -XX:+UseG1GC -Djava.awt.headless=true -Dlog4j2.configurationFile=$E/log4j2.properties \
  -cp "$ROOT/jars/embedded/*:$ROOT/embedded/classes" CdcEngine $ROOT/config/engine.properties > $E/service.out 2>&1 < /dev/null &
echo $! > $E/service.pid
echo "embedded pid $(cat $E/service.pid)"
