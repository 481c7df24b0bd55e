#!/usr/bin/env bash
# The test command: a clean ASan+UBSan build of everything, then every test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${DUET_TEST_BUILD:-build-test}
if [ ! -d "$B" ]; then
  meson setup "$B" -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
fi
ninja -C "$B"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# the cuda suite needs a GPU: it runs on the GPU machine (docs/cuda/), never in CI
meson test -C "$B" --print-errorlogs --num-processes 2 --no-suite cuda "$@"
