#!/bin/bash
# Two profiled 300-VU runs on my stack: api_txn_window_ms=0 then 25 (API restarted between).
set -u
cd /work/wt-router
restart_api() {
  A=$(pgrep -f "wt-router/.venv/bin/python3 -m producers"); kill $A; sleep 3
  timeout 200 .venv/bin/eco2 stack up > /dev/null 2>&1
}
sed -i '/ECO2_API_TXN_WINDOW_MS/d' .eco2.env; restart_api; sleep 5
/tmp/rprof/run.sh win0
echo "ECO2_API_TXN_WINDOW_MS=25" >> .eco2.env; restart_api; sleep 5
/tmp/rprof/run.sh win25
sed -i '/ECO2_API_TXN_WINDOW_MS/d' .eco2.env; restart_api
echo finished
