#!/usr/bin/env bash
# Sampler cost per draw (ms) on one core, V = 129280: the current worker/worker_sample.c and the
# one of commit BASE (default 014bb45, the last full-sort sampler), same program, same flags.
# Prints the table and writes the CSV with the command, machine and commit. Not a test.
#   tools/bench-sample/bench_sample.sh [BASE] [OUT_CSV]
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE=${1:-014bb45}
OUT=${2:-docs/benchmarks/sampler.csv}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
git show "$BASE:worker/worker_sample.c" > "$T/base_sample.c"
CC="cc -O2 -I. -D_GNU_SOURCE"
$CC tools/bench-sample/sample_bench.c worker/worker_sample.c common/err.c -o "$T/now" -lm
$CC tools/bench-sample/sample_bench.c "$T/base_sample.c" common/err.c -o "$T/base" -lm
commit=$(git rev-parse --short HEAD)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
{
  echo "# command: tools/bench-sample/bench_sample.sh $BASE $OUT"
  echo "# machine: $cpu, $(nproc) cores (one used); commit $commit; $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "sampler,case,vocab,ms_per_draw"
  "$T/base" --label "$BASE" --draws 10
  "$T/now" --label "$commit" --draws 20
} > "$OUT"
column -s, -t < <(grep -v '^#' "$OUT")
