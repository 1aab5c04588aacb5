#!/bin/bash
# One 300-VU SSE load on this worktree's stack (under the shared lock) with the broker sampled
# during the hold: requests per type (JMX RequestMetrics) and CPU per JVM thread pool (/proc).
# usage: load_sample.sh LABEL [HOLD_S]
set -u
cd "$(dirname "$0")/../../../.."
label=$1; hold=${2:-120}
out=bench/reports/issue19-broker/round4
export ECO2X_JMX_PORT=11119
flock /work/helpers/bench.lock bash -c "
  K=\$(cat .local/run/kafka.pid)
  .venv/bin/eco2 bench load --mode sse --vus 300 --ramp-up 20 --hold $hold --ramp-down 10 --quiet \
      --name load-$label --out $out > $out/load-$label.log 2>&1 &
  L=\$!
  sleep 50
  uptime > $out/uptime-$label.txt
  .venv/bin/python -m bench.broker_cpu requests \$K 60 > $out/jmx-300vu-$label.txt &
  .venv/bin/python -m bench.broker_cpu threads \$K 60 > $out/threads-300vu-$label.txt &
  ps -o pid,cputime,cmd -p \$(cat .local/run/*.pid | tr '\n' ',' | sed 's/,\$//') > $out/ps-before-$label.txt
  wait %2 %3
  ps -o pid,cputime,cmd -p \$(cat .local/run/*.pid | tr '\n' ',' | sed 's/,\$//') > $out/ps-after-$label.txt
  uptime >> $out/uptime-$label.txt
  wait \$L
"
