#!/usr/bin/env bash
# Packs a release CUDA build for tools/gpu/run_checks.sh into an ignored carry folder:
#   tools/gpu/pack.sh BUILD_DIR DEST   (DEST/bin.tgz; lib/ and tiny/ copied from .dev/gf)
# bin.tgz keeps the carry under the device tool's 64 MiB: each CUDA binary is ~29 MB.
set -eu
B=$1; D=$2
mkdir -p $D/bin
[ -d $D/lib ] || cp -r .dev/gf/lib $D/
[ -d $D/tiny ] || cp -r .dev/gf/tiny $D/
cp $B/worker/duet-worker $B/worker/duet-generate $B/coordinator/duet-coordinator \
   $B/tools/duetctl/duetctl $B/tests/cuda/test_cuda_ops $B/tests/cuda/test_cuda_golden \
   $B/tools/bench/duet-bench $B/kernels/duet-gemv-bench $D/bin/
tar czf $D/bin.tgz -C $D bin && rm -rf $D/bin
du -sh $D
