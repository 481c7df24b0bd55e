#!/bin/sh
# run.sh — builds one harness, tests/fuzz/fuzz_NAME.c, with clang + libFuzzer (+ASan, UBSan)
# and runs it for a bounded time from the committed seed corpus tests/fuzz/corpus/NAME.
# Why a script: the project's default compiler is gcc, which has no libFuzzer. It never writes into the committed corpus (new
# inputs go to a scratch directory under the build dir) and fails — never skips — when clang
# or libFuzzer is missing.
# Usage: run.sh SOURCE_ROOT BUILD_DIR NAME [SECONDS]   (SECONDS: $FUZZ_SECONDS, else 60)
# NAME: outparse or encoder.
set -eu
src=$1
out=$2/$3
name=fuzz_$3
secs=${4:-${FUZZ_SECONDS:-60}}
cc=${CLANG:-clang}
if ! command -v "$cc" >/dev/null 2>&1; then
    echo "FAIL: $cc not found; install the Debian package clang (libFuzzer comes with it)" >&2
    exit 1
fi
mkdir -p "$out/scratch-corpus"
chat="$src/coordinator/chat"
"$cc" -std=c11 -D_GNU_SOURCE -g -O1 -Wall -Wextra -Werror \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -I"$src" "$src/tests/fuzz/$name.c" "$chat/outparse.c" "$chat/encoder.c" \
    "$chat/sbuf.c" "$chat/pyjson.c" "$src/common/err.c" $(pkg-config --cflags --libs jansson) \
    -o "$out/$name"
log="$out/$name.log"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    "$out/$name" -max_total_time="$secs" -max_len=8192 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$out/" \
    "$out/scratch-corpus" "$src/tests/fuzz/corpus/$3" >"$log" 2>&1 || {
    tail -60 "$log" >&2
    echo "FAIL: $name found a problem; the crashing input is in $out/" >&2
    exit 1
}
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
echo "$name: ${runs:-?} executions in ${secs}s, no invariant violated"
[ -n "$runs" ] && [ "$runs" -gt 0 ]
