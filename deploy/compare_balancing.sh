#!/bin/bash
# Measure the choice docs/design.md explains: two workers behind nginx either on
# one SO_REUSEPORT port (one upstream server) or on one port per slot (two upstream
# servers, as deploy/nginx.conf is rendered).  Replays a synthetic access log through
# nginx for DURATION seconds and prints the requests each worker served; with KILL=1 it
# SIGKILLs worker 0 two seconds in (no supervisord here, so it stays dead) and the
# replay's error count shows which requests nginx could not retry elsewhere.
#
#   deploy/compare_balancing.sh reuse|slots        (env: DURATION=5 KILL=1 PORT_BASE=19000)
#
# Needs the dev virtualenv (`make venv-dev`: bench/ and its plotting libraries).
#
# Loopback only, bounded in time; every process it starts is stopped by its pid on exit.
# It uses ports PORT_BASE+80 (nginx), +133 (queue), +200/+201 (workers).
set -euo pipefail
MODE=${1:?usage: $0 reuse|slots}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
B=${PORT_BASE:-19000}
NGINX_PORT=$((B + 80)) QUEUE_PORT=$((B + 133)) WORKER_PORT=$((B + 200))
WORK=$(mktemp -d /tmp/ingest-balance.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_http() {  # poll a URL until it answers 200, for at most 30 s
  for _ in $(seq 300); do curl -sf -m1 "$1" >/dev/null && return 0; sleep 0.1; done
  echo "no answer from $1" >&2; return 1
}

cd "$WORK"
"$PY" -m ingest queue --port "$QUEUE_PORT" --data "$WORK/queue" --sync-ms 100 >queue.out 2>&1 &
PIDS+=($!)
for slot in 0 1; do
  if [ "$MODE" = reuse ]; then port=$WORKER_PORT; flags=(--reuse-port true)
  else port=$((WORKER_PORT + slot)); flags=(); fi
  "$PY" -m ingest serve --port "$port" "${flags[@]}" --kestrel "127.0.0.1:$QUEUE_PORT" \
    --access-log "$WORK/worker$slot.log" >"worker$slot.out" 2>&1 &
  PIDS+=($!)
done
WORKER0=${PIDS[1]}
wait_http "http://127.0.0.1:$WORKER_PORT/ready"
[ "$MODE" = slots ] && wait_http "http://127.0.0.1:$((WORKER_PORT + 1))/ready"

INGEST_WORKERS=2 INGEST_PORT=$NGINX_PORT INGEST_LISTEN=127.0.0.1 \
  INGEST_WORKER_BASE_PORT=$WORKER_PORT "$PY" "$ROOT/deploy/launch.py" render-nginx >/dev/null
# One upstream server for the shared SO_REUSEPORT port.
[ "$MODE" = reuse ] && sed -i "/server 127.0.0.1:$((WORKER_PORT + 1)) /d" var/nginx/nginx.conf
/usr/sbin/nginx -p "$WORK/var/nginx/" -c "$WORK/var/nginx/nginx.conf" -e stderr >nginx.out 2>&1 &
PIDS=("$!" "${PIDS[@]}")   # stopped first
wait_http "http://127.0.0.1:$NGINX_PORT/ready"

(cd "$ROOT" && "$PY" -m bench.make_log --requests 3000 --out "$WORK/requests.log" >/dev/null 2>&1)
if [ -n "${KILL:-}" ]; then (sleep 2; kill -KILL "$WORKER0") & fi
(cd "$ROOT" && timeout 120 "$PY" -m bench.replay --log "$WORK/requests.log" \
  --url "http://127.0.0.1:$NGINX_PORT" --duration "${DURATION:-5}" --out "$WORK/report") 2>&1 |
  grep '^target' || true
grep -h '^Status counts\|^Errors' "$WORK/report/report.md" || true
echo "$MODE: worker0 served $(wc -l <"$WORK/worker0.log"), worker1 served $(wc -l <"$WORK/worker1.log")"
