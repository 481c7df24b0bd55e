#!/usr/bin/env bash
# CPU backend throughput on a checkpoint (default: the tiny demo model): prefill and greedy decode
# tokens/s from duet-generate at several thread counts. Prints a table and writes a CSV with the
# exact command, machine and commit. Not a test: numbers depend on the machine.
#   tools/bench-cpu/bench_cpu.sh [MODEL_DIR] [OUT_CSV]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-models/tiny}
OUT=${2:-docs/benchmarks/cpu-tiny.csv}
B=build
[ -d $B ] || meson setup $B --buildtype=release >/dev/null
ninja -C $B worker/duet-generate tools/mkmodel/mkmodel >/dev/null
[ -f "$MODEL/config.json" ] || $B/tools/mkmodel/mkmodel --config tools/mkmodel/tiny.json --out "$MODEL" --seed 1
PROMPT=$(python3 -c "import random; r=random.Random(7); print(' '.join(str(r.randrange(1024)) for _ in range(512)))")
commit=$(git rev-parse --short HEAD)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
mkdir -p "$(dirname "$OUT")"
{
  echo "# command: tools/bench-cpu/bench_cpu.sh $MODEL $OUT"
  echo "# machine: $cpu, $(nproc) cores; commit $commit; $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "threads,prompt_tokens,prefill_tok_s,decode_tokens,decode_tok_s"
} > "$OUT"
printf "%8s %8s %14s %8s %14s\n" threads prompt prefill_tok/s decode decode_tok/s
for t in 1 $(nproc); do
  line=$($B/worker/duet-generate --model "$MODEL" --prompt "$PROMPT" -n 129 --threads $t 2>&1 >/dev/null | tail -1)
  pf=$(echo "$line" | sed -E 's/.*prefill [0-9]+ tokens [0-9.]+ s \(([0-9.]+) tok\/s\).*/\1/')
  dc=$(echo "$line" | sed -E 's/.*decode [0-9]+ tokens [0-9.]+ s \(([0-9.]+) tok\/s\).*/\1/')
  printf "%8s %8s %14s %8s %14s\n" $t 512 "$pf" 128 "$dc"
  echo "$t,512,$pf,128,$dc" >> "$OUT"
done
echo "wrote $OUT"
