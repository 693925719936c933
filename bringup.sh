#!/usr/bin/env bash
# A local mkv cluster in the foreground: 3 nginx volumes on :3001-:3003, the
# master on :3000, its admin listener (status page, /metrics) on :3100 and the
# S3 gateway on :9000 (S3_PORT), all on 127.0.0.1 only. Installs whatever is missing first. Ctrl-C or TERM stops it all.
# A volume that stops leaves the others and the master serving; the line that
# says so gives the command that starts it again.
#
#   MKV_HOME   where volumes and the index live      (default /tmp/mkv)
#   WORKERS    gunicorn worker processes              (default 4)
#   BASE_PORT  the master's port; volumes on the next three (default 3000)
#   Any other MKV_* setting is passed to the master (see README); MKV_SECRET to the volumes too.
set -euo pipefail
cd "$(dirname "$0")"
./install.sh

home=${MKV_HOME:-/tmp/mkv}
base=${BASE_PORT:-3000}
mkdir -p "$home"
pids=()
stop_all() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

export MKV_ADMIN_PORT=${MKV_ADMIN_PORT:-$((base + 100))}   # status page, /metrics, /health/* (admin.py)
s3_port=${S3_PORT:-9000}
for port in "$base" $((base + 1)) $((base + 2)) $((base + 3)) "$MKV_ADMIN_PORT" "$s3_port"; do
  if port_open "$port"; then
    echo "bringup.sh: port $port is already in use; stop what runs there first" >&2
    exit 1
  fi
done

declare -A volume_of   # pid -> its volume's port
for i in 1 2 3; do
  port=$((base + i))
  VOLUME_BIND=127.0.0.1 PORT=$port .venv/bin/python volume "$home/volume$i" &
  pids+=($!)
  volume_of[$!]=$port
done
for i in 1 2 3; do
  port=$((base + i))
  for _ in $(seq 100); do port_open "$port" && break; sleep 0.1; done
  port_open "$port" || { echo "bringup.sh: volume $i did not start on :$port" >&2; exit 1; }
done
echo "bringup.sh: volumes on :$((base + 1)) :$((base + 2)) :$((base + 3)), data in $home/volume{1,2,3}" >&2

export MKV_VOLUMES=${MKV_VOLUMES:-localhost:$((base + 1)),localhost:$((base + 2)),localhost:$((base + 3))}
export MKV_DB=${MKV_DB:-$home/index.sqlite3}
# the worker is gunicorn.conf.py's (worker.py: gunicorn's gevent worker, a leaner reader of requests)
.venv/bin/gunicorn -w "${WORKERS:-4}" -b "127.0.0.1:$base" mkv:app &
master=$!
pids+=($master)
echo "bringup.sh: master on :$base (index $MKV_DB); try: curl -L -X PUT -d bigswag localhost:$base/wehave" >&2
echo "bringup.sh: status page and /metrics on http://127.0.0.1:$MKV_ADMIN_PORT/" >&2
# the S3 gateway: the same index and volumes; started once the master answers, so
# that it joins the master's run folder (metrics, volume health; docs/s3.md); it
# reads the volumes' files from their folders itself (a folder counts only while
# its .id is the one its volume answers: MKV_VOLUMES may name others)
for _ in $(seq 100); do port_open "$base" && break; sleep 0.1; done
MKV_ADMIN_PORT= MKV_S3_VOLUME_DIRS=${MKV_S3_VOLUME_DIRS-$home/volume1,$home/volume2,$home/volume3} \
  .venv/bin/gunicorn -w "${WORKERS:-4}" -b "127.0.0.1:$s3_port" s3:app &
gateway=$!
pids+=($gateway)
if [ -z "${MKV_S3_KEYS:-}" ]; then
  echo "bringup.sh: S3 gateway on :$s3_port, OPEN TO ANYONE who reaches it (set MKV_S3_KEYS=ACCESS:SECRET)" >&2
else
  echo "bringup.sh: S3 gateway on :$s3_port (SigV4 with MKV_S3_KEYS)" >&2
fi

# until the master stops: a volume that stops is told about, the rest goes on
while true; do
  ended=
  wait -n -p ended "${pids[@]}" || true
  [ -n "$ended" ] || continue
  left=()
  for pid in "${pids[@]}"; do
    if [ "$pid" != "$ended" ]; then left+=("$pid"); fi
  done
  pids=("${left[@]}")
  if [ "$ended" = "$master" ] || [ "$ended" = "$gateway" ]; then
    echo "bringup.sh: the $([ "$ended" = "$master" ] && echo master || echo S3 gateway) stopped; stopping the rest" >&2
    exit 1
  fi
  port=${volume_of[$ended]}
  echo "bringup.sh: the volume on :$port stopped; the master and the other volumes go on. Start it" \
       "again with: VOLUME_BIND=127.0.0.1 PORT=$port .venv/bin/python volume $home/volume$((port - base))" >&2
done
