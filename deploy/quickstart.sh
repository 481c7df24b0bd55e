#!/usr/bin/env bash
# quickstart.sh — from a fresh clone to a generation on a two-worker cluster on this machine.
#
# Why: one command that shows the whole worker-first launch working: installs the Debian build
# packages that are missing, builds (build/, release), writes the demo model (tiny random
# weights, deterministic) to models/tiny if absent, makes an auth token in a private temporary
# directory, starts two CPU workers (world size 2, tensor + expert parallel over the TCP data
# plane) and a coordinator on loopback with deploy/duet-cluster.sh, runs a sample greedy
# generation through duetctl, prints the token ids and stops everything — also on Ctrl-C or
# failure (trap). It never listens on anything but 127.0.0.1 and leaves nothing running.
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

# ---- a private run directory: token, env file, logs, admin socket ---------------------------------
RUN=$(mktemp -d /tmp/duet-quickstart-XXXXXX)
chmod 700 "$RUN"
head -c 32 /dev/urandom | base64 >"$RUN/token"
chmod 600 "$RUN/token"
PORT=${DUET_QS_PORT:-17100}
cat >"$RUN/duet.env" <<EOF
DUET_BIN=$ROOT/$B
DUET_MODEL=$(cd "$MODEL" && pwd)
DUET_TOKEN_FILE=$RUN/token
DUET_WORKERS=127.0.0.1:$PORT,127.0.0.1:$((PORT + 1))
DUET_PEERS=127.0.0.1:$((PORT + 100)),127.0.0.1:$((PORT + 101))
DUET_BACKEND=cpu
DUET_STATE_DIR=$RUN/state
DUET_ADMIN_SOCKET=$RUN/admin/admin.sock
DUET_START_TIMEOUT=120
DUET_DRAIN_GRACE=10
EOF
CLUSTER=(deploy/duet-cluster.sh --env "$RUN/duet.env")
cleanup() {
  local rc=$?
  echo "quickstart: stopping"
  "${CLUSTER[@]}" stop || true
  if [ $rc != 0 ]; then
    for f in "$RUN"/state/*.log; do [ -e "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done
  fi
  rm -rf "$RUN"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- start the cluster (workers first), generate, stop ------------------------------------------
echo "quickstart: starting 2 CPU workers and a coordinator on loopback (ports $PORT, $((PORT + 1)))"
"${CLUSTER[@]}" start-cluster
"${CLUSTER[@]}" status
PROMPT="0 128 256 384 512 640 768 896"
echo "quickstart: greedy generation from token ids [$PROMPT]"
"$B"/tools/duetctl/duetctl -s "$RUN/admin/admin.sock" generate --max-tokens 16 "$PROMPT"
