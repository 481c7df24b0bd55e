#!/usr/bin/env bash
# Quickstart: build duet, make the embedded default model (a small random DeepSeek-V4 with the
# spec's tiny config, deterministic seed) if absent, and run a sample greedy generation on the
# CPU backend. Installs the Debian build packages first when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for p in meson ninja pkg-config; do command -v $p >/dev/null || need+=("$p"); done
for lib in jansson libutf8proc check; do pkg-config --exists $lib 2>/dev/null || need+=("$lib"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "quickstart: installing build dependencies (${need[*]})"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq build-essential meson ninja-build pkg-config check libsubunit-dev \
    libjansson-dev libutf8proc-dev >/dev/null
fi
B=build
[ -d $B ] || meson setup $B --buildtype=release >/dev/null
ninja -C $B worker/duet-generate tools/mkmodel/mkmodel >/dev/null
MODEL=${DUET_MODEL:-models/tiny}
if [ ! -f "$MODEL/config.json" ]; then
  echo "quickstart: writing the demo model to $MODEL"
  $B/tools/mkmodel/mkmodel --config tools/mkmodel/tiny.json --out "$MODEL" --seed 1
fi
PROMPT="0 128 256 384 512 640 768 896"
echo "quickstart: greedy generation from token ids [$PROMPT]"
$B/worker/duet-generate --model "$MODEL" --prompt "$PROMPT" -n 16
