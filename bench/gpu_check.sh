#!/usr/bin/env bash
# One GPU's whole check in one go: tests/test_cuda.py, then every GPU stage of
# `afmrec bench speed` (training, statistics, compression, inference) in one process, so
# that one record holds every speed figure of the device (BENCHMARKS.md's table).
#
# usage: OUT=/tmp/gpu bash bench/gpu_check.sh [bench speed options...]
#   default options: the published run (--device cuda, 6 variants, AOTInductor, profiles)
# needs: torch (CUDA), torchrec, fbgemm-gpu and pytest importable by python3. afmrec is
# used from this checkout when it is not installed. On a copy of the tree, set
# AFMREC_GIT_COMMIT to the commit it holds: the record stores it in place of git's.
# writes: $OUT/test_cuda.log, $OUT/speed.json (rewritten after each stage), $OUT/speed.log,
# $OUT/profile_*.txt. Exit status: the tests', else the benchmark's.
set -uo pipefail
OUT=${OUT:-/tmp/gpu}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

if ! python3 -c "import afmrec.launch.cli" 2>/dev/null; then
    # the package `afmrec` is the checkout's api/ plus its sibling folders (setup.cfg)
    PKG=$(mktemp -d)
    mkdir -p "$PKG/afmrec"
    for d in common models pipeline sharding launch; do ln -s "$ROOT/$d" "$PKG/afmrec/$d"; done
    ln -s "$ROOT"/api/*.py "$PKG/afmrec/"
    export PYTHONPATH="$PKG:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ $# -eq 0 ]; then
    set -- --device cuda --stages train,stats,compress,inference \
        --variants original,afm4x,afm8x,afm4x_int8,afm4x_dense4,afm4x_int8_dense4 --aoti --profile --workdir "${WORKDIR:-/dev/shm}"
fi

(cd "$ROOT" && python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py) 2>&1 | tee "$OUT/test_cuda.log"
tests=${PIPESTATUS[0]}
python3 -m afmrec.launch.cli bench speed "$@" --json "$OUT/speed.json" --profile-dir "$OUT" 2>&1 | tee "$OUT/speed.log"
bench=${PIPESTATUS[0]}
[ "$tests" -ne 0 ] && exit "$tests"
exit "$bench"
