#!/bin/bash
# usage: prof/run.sh TAG  -- 300-VU SSE load on this stack, py-spy router+api 30s of the hold, JMX snapshots
set -u
TAG=$1; cd /work/wt-router; OUT=/tmp/rprof/$TAG; mkdir -p $OUT
ROUTER=$(pgrep -f "wt-router/.venv/bin/python3 -m streams router" | head -1)
API=$(pgrep -f "wt-router/.venv/bin/python3 -m producers" | head -1)
WORKER=$(pgrep -f "wt-router/.venv/bin/python3 -m streams worker" | head -1)
.venv/bin/eco2 bench load --mode sse --vus 300 --ramp-up 20 --hold 60 --ramp-down 10 --quiet --name $TAG > $OUT/load.txt 2>&1 &
LP=$!
sleep 35
KPID=$(pgrep -f "wt-router/eco2/kafka/log4j2" | head -1); .venv/bin/python /tmp/rprof/threads.py $KPID $OUT/thr0.json
.venv/bin/python /tmp/rprof/jmx.py $OUT/jmx0.json
T0=$(date +%s.%N)
.venv/bin/py-spy record -p $ROUTER -d 30 -r 50 -f raw -o $OUT/router.txt > /dev/null 2>&1 &
.venv/bin/py-spy record -p $API -d 30 -r 50 -f raw -o $OUT/api.txt > /dev/null 2>&1 &
wait $(jobs -p | grep -v "^$LP$")
.venv/bin/python /tmp/rprof/jmx.py $OUT/jmx1.json
T1=$(date +%s.%N); .venv/bin/python /tmp/rprof/threads.py $KPID $OUT/thr1.json
echo "$T0 $T1" > $OUT/jmxtimes
wait $LP
echo done
