#!/usr/bin/env bash
# A local mkv cluster in the foreground: 3 nginx volumes on :3001-:3003 and the
# master on :3000, all on 127.0.0.1 only. Installs whatever is missing first. Ctrl-C stops it all.
#
#   MKV_HOME   where volumes and the index live      (default /tmp/mkv)
#   WORKERS    gunicorn worker processes              (default 4)
#   Any other MKV_* setting is passed to the master (see README); MKV_SECRET to the volumes too.
set -euo pipefail
cd "$(dirname "$0")"
./install.sh

home=${MKV_HOME:-/tmp/mkv}
mkdir -p "$home"
pids=()
stop_all() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_all EXIT INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for i in 1 2 3; do
  port=300$i
  if port_open "$port"; then
    echo "bringup.sh: port $port is already in use; stop what runs there first" >&2
    exit 1
  fi
  VOLUME_BIND=127.0.0.1 PORT=$port .venv/bin/python volume "$home/volume$i" &
  pids+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 100); do port_open "300$i" && break; sleep 0.1; done
  port_open "300$i" || { echo "bringup.sh: volume $i did not start on :300$i" >&2; exit 1; }
done
echo "bringup.sh: volumes on :3001 :3002 :3003, data in $home/volume{1,2,3}" >&2

export MKV_VOLUMES=${MKV_VOLUMES:-localhost:3001,localhost:3002,localhost:3003}
export MKV_DB=${MKV_DB:-$home/index.sqlite3}
export MKV_ADMIN_PORT=${MKV_ADMIN_PORT:-3100}   # status page, /metrics, /health/* (admin.py)
.venv/bin/gunicorn -k gevent -w "${WORKERS:-4}" -b 127.0.0.1:3000 mkv:app &
pids+=($!)
echo "bringup.sh: master on :3000 (index $MKV_DB); try: curl -L -X PUT -d bigswag localhost:3000/wehave" >&2
echo "bringup.sh: status page and /metrics on http://127.0.0.1:$MKV_ADMIN_PORT/" >&2
wait -n "${pids[@]}"
echo "bringup.sh: a server stopped; stopping the rest" >&2
exit 1
