#!/usr/bin/env bash
# duet-cluster.sh — worker-first launch of a duet cluster: start workers, then the coordinator.
#
# Why: the workers hold the GPUs and the weights; they must listen before the coordinator
# connects (it retries until --connect-timeout). This script is the one place that knows the
# order: start-cluster starts every worker (local ones here, remote ones over ssh), waits for
# each "listening on" line, then starts the local coordinator and waits until it serves.
# Everything is configured by an env file (deploy/duet.env.example). It never starts a second
# copy of a process that is still running and never kills a pid it did not record.
#
#   deploy/duet-cluster.sh [--env FILE] start-worker --rank R
#   deploy/duet-cluster.sh [--env FILE] start-coordinator
#   deploy/duet-cluster.sh [--env FILE] start-cluster
#   deploy/duet-cluster.sh [--env FILE] stop | stop-worker --rank R | stop-coordinator
#   deploy/duet-cluster.sh [--env FILE] status
#   deploy/duet-cluster.sh [--env FILE] logs [coordinator | worker R] [-f]
#   deploy/duet-cluster.sh [--env FILE] run-worker --rank R | run-coordinator   (foreground,
#                                                                  for systemd units)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENV_FILE=${DUET_ENV:-/etc/duet/duet.env}
if [ "${1:-}" = "--env" ]; then ENV_FILE=$2; shift 2; fi
if [ -f "$ENV_FILE" ]; then
  set -a
  # shellcheck disable=SC1090
  . "$ENV_FILE"
  set +a
elif [ "$ENV_FILE" != /etc/duet/duet.env ]; then
  echo "duet-cluster: env file $ENV_FILE not found" >&2; exit 2
fi

: "${DUET_BIN:=$ROOT/build}"                 # build dir (or install prefix with the same layout)
: "${DUET_MODEL:?set DUET_MODEL to the checkpoint directory in the env file}"
: "${DUET_TOKEN_FILE:?set DUET_TOKEN_FILE (mode 0600, >= 16 bytes) in the env file}"
: "${DUET_WORKERS:?set DUET_WORKERS=host:port,host:port (rank order) in the env file}"
: "${DUET_PEERS:=}"                          # data-plane host:port per rank (world > 1)
: "${DUET_BACKEND:=cpu}"
: "${DUET_STATE_DIR:=${XDG_STATE_HOME:-$HOME/.local/state}/duet}"
: "${DUET_ADMIN_SOCKET:=}"
: "${DUET_START_TIMEOUT:=300}"                # seconds to wait for workers / the coordinator
: "${DUET_DRAIN_GRACE:=30}"
: "${DUET_WORKER_ARGS:=}"
: "${DUET_COORDINATOR_ARGS:=}"
: "${DUET_CONFIG:=}"                          # coordinator JSON config (docs/config.md)
: "${DUET_REMOTE_ROOT:=$ROOT}"                # the clone on remote hosts (same layout)
: "${DUET_REMOTE_ENV:=$ENV_FILE}"             # the env file on remote hosts
: "${DUET_SSH:=ssh -o BatchMode=yes}"

WORKER=$DUET_BIN/worker/duet-worker
COORD=$DUET_BIN/coordinator/duet-coordinator
DUETCTL=$DUET_BIN/tools/duetctl/duetctl
IFS=, read -r -a WORKERS <<<"$DUET_WORKERS"
WORLD=${#WORKERS[@]}
mkdir -p "$DUET_STATE_DIR"
chmod 700 "$DUET_STATE_DIR"

die() { echo "duet-cluster: $*" >&2; exit 1; }
ctl() { if [ -n "$DUET_ADMIN_SOCKET" ]; then "$DUETCTL" -s "$DUET_ADMIN_SOCKET" "$@"; else "$DUETCTL" "$@"; fi; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
is_local() {
  case "$1" in
    127.*|localhost|::1|"$(hostname)"|"$(hostname -f 2>/dev/null || true)") return 0 ;;
  esac
  hostname -I 2>/dev/null | tr ' ' '\n' | grep -qx "$1"
}
host_of() { local a=$1; a=${a%:*}; a=${a#[}; echo "${a%]}"; }

worker_argv() { # rank -> WARGV
  local rank=$1
  if [ "$rank" -lt 0 ] || [ "$rank" -ge "$WORLD" ]; then die "--rank must be in 0..$((WORLD - 1))"; fi
  WARGV=("$WORKER" --rank "$rank" --world-size "$WORLD" --listen "${WORKERS[$rank]}"
    --model "$DUET_MODEL" --backend "$DUET_BACKEND" --auth-token-file "$DUET_TOKEN_FILE")
  [ "$WORLD" -gt 1 ] && WARGV+=(--peers "${DUET_PEERS:?set DUET_PEERS for world size $WORLD}")
  # shellcheck disable=SC2206
  WARGV+=($DUET_WORKER_ARGS)
}

coordinator_argv() {
  CARGV=("$COORD" --workers "$DUET_WORKERS" --auth-token-file "$DUET_TOKEN_FILE"
    --connect-timeout "$DUET_START_TIMEOUT" --drain-grace "$DUET_DRAIN_GRACE")
  [ -n "$DUET_ADMIN_SOCKET" ] && CARGV+=(--admin-socket "$DUET_ADMIN_SOCKET")
  [ -n "$DUET_CONFIG" ] && CARGV+=(--config "$DUET_CONFIG")
  # shellcheck disable=SC2206
  CARGV+=($DUET_COORDINATOR_ARGS)
}

start_worker() {
  local rank=$1
  if [ "$rank" -lt 0 ] || [ "$rank" -ge "$WORLD" ]; then die "--rank must be in 0..$((WORLD - 1))"; fi
  local pidf=$DUET_STATE_DIR/worker$rank.pid log=$DUET_STATE_DIR/worker$rank.log
  if alive "$pidf"; then echo "worker $rank already running (pid $(cat "$pidf"))"; return 0; fi
  [ -x "$WORKER" ] || die "$WORKER not found: build first (meson setup build && ninja -C build)"
  worker_argv "$rank"
  : >"$log"
  nohup "${WARGV[@]}" >>"$log" 2>&1 </dev/null &
  echo $! >"$pidf"
  local end=$((SECONDS + DUET_START_TIMEOUT))
  until grep -q "listening on" "$log"; do
    if ! alive "$pidf"; then tail -20 "$log" >&2; die "worker $rank exited during start-up (log $log)"; fi
    [ $SECONDS -lt $end ] || die "worker $rank did not listen within ${DUET_START_TIMEOUT}s (log $log)"
    sleep 0.1
  done
  echo "worker $rank: $(grep -m1 -o 'listening on [^ ]*' "$log") (pid $(cat "$pidf"), log $log)"
}

start_coordinator() {
  local pidf=$DUET_STATE_DIR/coordinator.pid log=$DUET_STATE_DIR/coordinator.log
  if alive "$pidf"; then echo "coordinator already running (pid $(cat "$pidf"))"; return 0; fi
  [ -x "$COORD" ] || die "$COORD not found: build first"
  coordinator_argv
  : >"$log"
  nohup "${CARGV[@]}" >>"$log" 2>&1 </dev/null &
  echo $! >"$pidf"
  local end=$((SECONDS + DUET_START_TIMEOUT))
  until ctl --json status 2>/dev/null | grep -q '"state":"serving"'; do
    if ! alive "$pidf"; then tail -20 "$log" >&2; die "the coordinator exited during start-up (log $log)"; fi
    [ $SECONDS -lt $end ] || die "the coordinator did not serve within ${DUET_START_TIMEOUT}s (log $log)"
    sleep 0.2
  done
  echo "coordinator: serving (pid $(cat "$pidf"), log $log)"
}

remote() { # host, subcommand...
  local host=$1; shift
  # shellcheck disable=SC2029
  $DUET_SSH "$host" "cd '$DUET_REMOTE_ROOT' && deploy/duet-cluster.sh --env '$DUET_REMOTE_ENV' $*"
}

start_cluster() {
  local r pids=() fail=0
  for r in $(seq 0 $((WORLD - 1))); do
    local h; h=$(host_of "${WORKERS[$r]}")
    if is_local "$h"; then start_worker "$r"; else remote "$h" start-worker --rank "$r" & pids+=($!); fi
  done
  for p in "${pids[@]}"; do wait "$p" || fail=1; done
  [ $fail = 0 ] || die "a remote worker did not start; see its log with: duet-cluster.sh logs worker R"
  start_coordinator
}

stop_pid() { # pidfile name grace
  local pidf=$1 name=$2 grace=$3
  if ! alive "$pidf"; then echo "$name: not running"; rm -f "$pidf"; return 0; fi
  local pid; pid=$(cat "$pidf")
  kill -TERM "$pid"
  local end=$((SECONDS + grace))
  while kill -0 "$pid" 2>/dev/null; do
    if [ $SECONDS -ge $end ]; then echo "$name: still running after ${grace}s; killing"; kill -KILL "$pid"; break; fi
    sleep 0.1
  done
  rm -f "$pidf"
  echo "$name: stopped"
}

stop_cluster() {
  stop_pid "$DUET_STATE_DIR/coordinator.pid" coordinator $((DUET_DRAIN_GRACE + 10))
  local r
  for r in $(seq 0 $((WORLD - 1))); do
    local h; h=$(host_of "${WORKERS[$r]}")
    if is_local "$h"; then stop_pid "$DUET_STATE_DIR/worker$r.pid" "worker $r" 20
    else remote "$h" stop-worker --rank "$r" || true; fi
  done
}

rank_arg() {
  if [ "${1:-}" != "--rank" ] || ! [[ "${2:-}" =~ ^[0-9]+$ ]]; then die "give --rank R"; fi
  echo "$2"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  start-worker) start_worker "$(rank_arg "$@")" ;;
  run-worker) worker_argv "$(rank_arg "$@")"; exec "${WARGV[@]}" ;;
  run-coordinator) coordinator_argv; exec "${CARGV[@]}" ;;
  start-coordinator) start_coordinator ;;
  start-cluster) start_cluster ;;
  stop) stop_cluster ;;
  stop-worker) r=$(rank_arg "$@"); stop_pid "$DUET_STATE_DIR/worker$r.pid" "worker $r" 20 ;;
  stop-coordinator) stop_pid "$DUET_STATE_DIR/coordinator.pid" coordinator $((DUET_DRAIN_GRACE + 10)) ;;
  status)
    any=0
    for f in "$DUET_STATE_DIR"/*.pid; do
      [ -e "$f" ] || continue
      any=1
      n=$(basename "$f" .pid)
      if alive "$f"; then echo "$n: running (pid $(cat "$f"))"; else echo "$n: not running"; fi
    done
    [ $any = 1 ] || echo "no process started from $DUET_STATE_DIR"
    ctl status ;;
  logs)
    follow=()
    [ "${*: -1}" = "-f" ] && follow=(-f)
    case "${1:-coordinator}" in
      coordinator) tail -n 100 "${follow[@]}" "$DUET_STATE_DIR/coordinator.log" ;;
      worker) tail -n 100 "${follow[@]}" "$DUET_STATE_DIR/worker${2:?give the worker rank}.log" ;;
      *) die "logs: coordinator or worker R" ;;
    esac ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2 ;;
esac
