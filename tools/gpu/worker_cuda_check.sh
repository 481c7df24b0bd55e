#!/usr/bin/env bash
# On the GPU machine: the tiny model behind the coordinator with a CUDA worker, vs a CPU worker
# and vs single-process duet-generate (same greedy tokens expected), then the memory cap refusal.
# Layout expected next to this script (copied by hand into an ignored folder and carried to the
# GPU machine): bin/worker/{duet-worker,duet-generate}, bin/coordinator/duet-coordinator,
# bin/tools/duetctl/duetctl (a release build with -Dcuda=enabled), lib/ (libjansson,
# libprotobuf-c, libuv, libevent: the GPU machine lacks some), tiny/ (mkmodel --seed 1).
# Output: $OUT/cuda-worker.txt (committed as docs/cuda/worker-h100.txt).
set -u
G=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=$G/lib:${LD_LIBRARY_PATH:-}
O=${OUT:-/tmp/out}; mkdir -p "$O"
R=$(mktemp -d); chmod 700 $R; head -c 32 /dev/urandom | base64 > $R/token; chmod 600 $R/token
P="0 128 256 384 512 640 768 896"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
wait_line() { for i in $(seq 1 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timeout waiting for $2 in $1"; cat "$1"; return 1; }
run_cluster() { # backend port extra-worker-args
  local be=$1 port=$2; shift 2
  $G/bin/worker/duet-worker --rank 0 --world-size 1 --model $G/tiny --auth-token-file $R/token \
     --listen 127.0.0.1:$port --backend $be "$@" > $R/w-$be.out 2> $R/w-$be.log &
  WP=$!
  wait_line $R/w-$be.out "listening on" || return 1
  $G/bin/coordinator/duet-coordinator --workers 127.0.0.1:$port --auth-token-file $R/token \
     --admin-socket $R/adm-$be/admin.sock > $R/c-$be.out 2> $R/c-$be.log &
  CP=$!
  for i in $(seq 1 300); do
    $G/bin/tools/duetctl/duetctl -s $R/adm-$be/admin.sock status 2>/dev/null | grep -q serving && break
    kill -0 $CP 2>/dev/null || break; sleep 0.1; done
}
stop_cluster() { kill $CP 2>/dev/null; wait $CP 2>/dev/null; kill $WP 2>/dev/null; wait $WP 2>/dev/null; }
{
echo "== reference: duet-generate, CPU backend, one process"
$G/bin/worker/duet-generate --model $G/tiny --prompt "$P" -n 32 2>&1
for be in cpu cuda; do
  echo "== cluster: coordinator + 1 worker --backend $be"
  run_cluster $be $([ $be = cpu ] && echo 27100 || echo 27200)
  $G/bin/tools/duetctl/duetctl -s $R/adm-$be/admin.sock status
  $G/bin/tools/duetctl/duetctl -s $R/adm-$be/admin.sock --json generate --max-tokens 32 "$P"
  echo
  stop_cluster
  echo "-- worker log ($be)"; cat $R/w-$be.log
done
echo "== memory cap: --gpu-memory-utilization 0.00001 must be refused cleanly"
run_cluster cuda 27300 --gpu-memory-utilization 0.00001
sleep 1
echo "-- coordinator log"; cat $R/c-cuda.log | tail -5
echo "-- worker log"; cat $R/w-cuda.log | tail -5
kill -0 $WP 2>/dev/null && echo "worker still running after the refusal: yes"
stop_cluster
} 2>&1 | tee $O/cuda-worker.txt
