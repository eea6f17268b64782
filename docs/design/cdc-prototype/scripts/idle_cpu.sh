#!/bin/bash
# CPU seconds used by a pid over N idle seconds (utime+stime from /proc/<pid>/stat, clock ticks).
pid=$1; n=${2:-20}; hz=$(getconf CLK_TCK)
a=$(awk '{print $14+$15}' /proc/$pid/stat); sleep $n; b=$(awk '{print $14+$15}' /proc/$pid/stat)
echo "pid $pid: $(echo "scale=3; ($b-$a)/$hz/$n*100" | bc)% of one core over ${n}s idle; RSS $(awk '/VmRSS/{print $2/1024" MB"}' /proc/$pid/status)"
