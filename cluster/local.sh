#!/usr/bin/env bash
# A single-node Ray cluster on this machine, the way a real one is run: `ray start --head` (bound to
# 127.0.0.1, token authentication on), the job submitted with `ray job submit` (cluster/submit.sh), its logs
# followed, the exit status the job's, and the cluster this script started (and only that one) stopped.
#
#   cluster/local.sh [CONFIG] [key=value ...]        # default: configs/quickstart.yaml
#
# Environment: RAYSFT_NUM_CPUS (logical CPUs of the head, default 4: 2 Train workers + Ray Data tasks).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/quickstart.yaml}"; [ $# -gt 0 ] && shift
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  ray get-auth-token --generate >/dev/null  # ~/.ray/auth_token, made once, read by ray start and the clients
fi
free_port() { python3 scripts/free_port.py; }  # below the kernel's ephemeral range: see the script
GCS_PORT=$(free_port); DASHBOARD_PORT=$(free_port)  # and the job agent's: its default (52365) may be another Ray's
TEMP_DIR=$(mktemp -d /tmp/raysft-ray-XXXXXX)  # this cluster's own session, sockets and logs
setsid ray start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --num-cpus="${RAYSFT_NUM_CPUS:-4}" \
  --dashboard-agent-listen-port="$(free_port)" \
  --temp-dir="$TEMP_DIR" --disable-usage-stats >"$TEMP_DIR/ray-start.log" 2>&1 &
HEAD_PID=$!
stop() {  # the head's whole process group: raylet, GCS, dashboard, workers of this cluster only
  kill -TERM -- "-$HEAD_PID" 2>/dev/null || true
  for _ in $(seq 30); do pgrep -g "$HEAD_PID" >/dev/null || break; sleep 1; done
  kill -KILL -- "-$HEAD_PID" 2>/dev/null || true
  echo "local.sh: stopped the Ray cluster at 127.0.0.1:$GCS_PORT (logs: $TEMP_DIR/session_latest/logs)"
}
trap stop EXIT
ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
for _ in $(seq 90); do
  if ray job list --address "$ADDRESS" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$HEAD_PID" 2>/dev/null; then echo "local.sh: ray start failed:" >&2; cat "$TEMP_DIR/ray-start.log" >&2; exit 1; fi
  sleep 1
done
echo "local.sh: Ray cluster up at 127.0.0.1:$GCS_PORT, dashboard $ADDRESS"
set +e
cluster/submit.sh --address "$ADDRESS" "$CONFIG" "$@"
rc=$?
set -e
echo "local.sh: job finished with exit status $rc"
exit $rc
