#!/usr/bin/env bash
# The test command: a clean ASan+UBSan build of everything, then every test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${DUET_TEST_BUILD:-build-test}
if [ ! -d "$B" ]; then
  cuda=()
  # NVIDIA's CUDA 13 wheels (tools/requirements-ci.txt, installed by .ci/run): the CUDA backend
  # is then compiled for sm_90a and sm_121a and linked against them (no GPU needed; the 'cuda'
  # suite never runs here). -Dcuda=enabled makes a broken toolkit an error, not a silent skip.
  # Without the wheels the toolkit is used when one is found (meson option cuda=auto).
  loc=$( (python3 -m pip show nvidia-cuda-nvcc 2>/dev/null || true) | sed -n "s/^Location: //p")
  if [ -n "$loc" ] && [ -x "$loc/nvidia/cu13/bin/nvcc" ]; then
    cuda=(-Dcuda=enabled "-Dcudahome=$loc/nvidia/cu13")
  fi
  meson setup "$B" -Db_sanitize=address,undefined -Db_lundef=false "${cuda[@]}" >/dev/null
fi
ninja -C "$B"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# the cuda suite needs a GPU: it runs on the GPU machine (docs/cuda/), never in CI
meson test -C "$B" --print-errorlogs --num-processes 2 --no-suite cuda "$@"
