#!/usr/bin/env bash
# On the GPU machine, one device-tool call: the CUDA op test, the golden test (device-side and
# host-side MoE grouping), the CUDA worker behind the coordinator vs a CPU worker, and
# optionally duet-bench. Binaries come from a release build with -Dcuda=enabled made on the dev
# machine and carried in an ignored folder D (default .dev/g):
#   D/bin/{duet-worker,duet-generate,duet-coordinator,duetctl,test_cuda_ops,test_cuda_golden,
#          duet-bench}, D/lib/ (libjansson, libuv, libprotobuf-c, libevent: the GPU machine lacks
#   some), D/tiny/ (mkmodel --seed 1).
# Output under $OUT: ops.txt, golden.txt, golden-host.txt, worker.txt, bench-{graph,direct}.*
#   tools/gpu/run_checks.sh [D] [--bench "duet-bench args"] [--bench-seconds S] [--no-checks]
# D may hold bin.tgz instead of bin/ (the carry limit): it is unpacked first.
set -u
cd "$(dirname "$0")/../.."
D=.dev/g; [ $# -gt 0 ] && [ "${1#--}" = "$1" ] && { D=$1; shift; }
BENCH=""; CHECKS=1; BENCH_S=280
while [ $# -gt 0 ]; do case $1 in
  --bench) BENCH=$2; shift 2;; --bench-seconds) BENCH_S=$2; shift 2;; --no-checks) CHECKS=0; shift;; *) echo "unknown $1"; exit 2;; esac; done
[ -f $D/bin.tgz ] && [ ! -d $D/bin ] && tar xzf $D/bin.tgz -C $D
export LD_LIBRARY_PATH=$PWD/$D/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
O=${OUT:-/tmp/out}; mkdir -p "$O"; B=$D/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $O/device.txt
if [ $CHECKS = 1 ]; then
  date +%T; timeout 150 $B/test_cuda_ops > $O/ops.txt 2>&1; echo "ops rc=$?"; tail -2 $O/ops.txt
  grep -c "moe dev=host" $O/ops.txt | sed 's/^/moe dev=host rows: /'; grep -i "FAIL" $O/ops.txt | head
  for m in dev host; do
    f=$O/golden.txt; [ $m = host ] && f=$O/golden-host.txt
    date +%T
    DUET_CUDA_MOE_HOST=$([ $m = host ] && echo 1 || echo 0) \
      timeout 100 $B/test_cuda_golden $D/tiny tests/golden/fixtures > $f 2>&1; echo "golden ($m MoE) rc=$?"
    tail -13 $f
  done
  # the worker on each backend behind the coordinator (CUDA also with graphs): same greedy tokens
  R=$(mktemp -d); chmod 700 $R; head -c 32 /dev/urandom | base64 > $R/token; chmod 600 $R/token
  P="0 128 256 384 512 640 768 896 5 9 77 300 301 302 303 304 305 306 307 308 309"
  {
  for be in cpu cuda cuda-graph; do
    port=$([ $be = cpu ] && echo 27100 || ([ $be = cuda ] && echo 27200 || echo 27300))
    DUET_CUDA_GRAPH=$([ $be = cuda-graph ] && echo 1 || echo 0) \
    $B/duet-worker --rank 0 --world-size 1 --model $D/tiny --auth-token-file $R/token \
       --listen 127.0.0.1:$port --backend ${be%-graph} > $R/w-$be.out 2> $R/w-$be.log & WP=$!
    for i in $(seq 1 300); do grep -q "listening on" $R/w-$be.out 2>/dev/null && break; sleep 0.1; done
    $B/duet-coordinator --workers 127.0.0.1:$port --auth-token-file $R/token --block-size 128 \
       --admin-socket $R/adm-$be/admin.sock > $R/c-$be.out 2> $R/c-$be.log & CP=$!
    for i in $(seq 1 300); do
      $B/duetctl -s $R/adm-$be/admin.sock --json status 2>/dev/null | grep -q '"warm": *true' && break
      sleep 0.1; done
    echo "== $be: 32 greedy tokens, twice (the second through the prefix cache)"
    for k in 1 2; do
      $B/duetctl -s $R/adm-$be/admin.sock --json generate --max-tokens 32 "$P $P $P $P $P $P $P" \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r.get("cached_tokens"), r["token_ids"])'
    done
    kill $CP; wait $CP 2>/dev/null; kill $WP; wait $WP 2>/dev/null
    echo "-- worker log ($be)"; tail -4 $R/w-$be.log
  done
  } > $O/worker.txt 2>&1
  cat $O/worker.txt | grep -v "^--\|^\[" | head -20
fi
if [ -n "$BENCH" ]; then
  # decode steps issued directly (the engine's default), then the same run as CUDA graphs
  for m in direct graph; do
    date +%T
    extra=""; [ $m = graph ] && extra="--graphs 1 --prefill 0" # graphs: decode steps only
    timeout $BENCH_S $B/duet-bench $BENCH $extra \
      --csv $O/bench-$m.csv --breakdown $O/bench-$m-breakdown.csv > $O/bench-$m.txt 2>&1
    echo "bench ($m) rc=$?"; grep -v "^    " $O/bench-$m.txt | tail -25
  done
  # GPU time per kernel of a batch-1 decode step (4 layers, every launch timed alone by ncu)
  if command -v ncu > /dev/null; then
    ncu --clock-control none --metrics gpu__time_duration.sum --csv \
      --kernel-name regex:"^k_[^r]|^k_r[^a]" $B/duet-bench --batches 1 --prefill 0 --steps 1 \
      --layers 4 > $O/ncu-decode.csv 2> $O/ncu.err
    python3 tools/gpu/kernel_times.py $O/ncu-decode.csv 3 > $O/kernels-decode.txt
    python3 tools/gpu/kernel_times.py $O/ncu-decode.csv 3 --grid > $O/kernels-decode-grid.txt
    head -30 $O/kernels-decode.txt
  fi
fi
date +%T
