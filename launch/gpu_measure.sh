#!/usr/bin/env bash
# The GPU measurement in one call (docs/gpu.md): installs the wheels carried in .whl/ (the
# packages the GPU host lacks, e.g. ml-collections) into a folder without their dependencies,
# puts this checkout on PYTHONPATH, runs `python -m ait_jax.bench --suite=gpu` and leaves in OUT
# at most 8 flat files: gpu_suite.json, gpu_suite.log and the two profiles' traces.
set -euo pipefail

PROG=$(basename "$0")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/gpu_measurement}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$ROOT/.whl}
SITE=${SITE:-/tmp/ait_jax_site}
WORK=${WORK:-/tmp/ait_jax_gpu_suite}
LIMIT_S=${LIMIT_S:-560}

usage() {
  cat <<EOF
Usage: $PROG [flags for python -m ait_jax.bench, e.g. --smoke or --budget_s=420]

Runs the GPU measurement of this checkout ($ROOT) on this host's GPU and copies its results
into OUT. Settings (environment variable, default):
  OUT      where the results go ($ROOT/gpu_measurement; on a lent GPU, the tool's \$OUT)
  PYTHON   the Python with jax[cuda], flax, optax, orbax and chex ($PYTHON)
  WHEELS   wheels to install first, without dependencies ($ROOT/.whl; docs/gpu.md lists them)
  SITE     where they are installed ($SITE)
  WORK     the suite's own folder, profiles included ($WORK)
  LIMIT_S  a hard limit on the suite, seconds: SIGTERM then (the table is still printed), and a
           kill 30 s later, so that the copy into OUT runs within a 600 s call ($LIMIT_S)
Takes about 9 minutes on one H100 or H200: 8 for the suite (its budget), plus imports.
EOF
}

for arg in "$@"; do
  if [[ $arg == -h || $arg == --help ]]; then
    usage
    exit 0
  fi
done

mkdir -p "$OUT"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
fi
export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

status=0
timeout -k 30 "$LIMIT_S" "$PYTHON" -m ait_jax.bench --suite=gpu --out="$WORK" "$@" 2>&1 |
  tee "$OUT/gpu_suite.log" || status=$?
# What the tool brings back: flat files of at most 16 MiB.
[[ -f $WORK/gpu_suite.json ]] && cp "$WORK/gpu_suite.json" "$OUT/"
for arch in ait vit; do
  for trace in "$WORK"/profile/"$arch"_*/plugins/profile/*/*.trace.json.gz; do
    cp "$trace" "$OUT/$arch.trace.json.gz"
  done
  for xplane in "$WORK"/profile/"$arch"_*/plugins/profile/*/*.xplane.pb; do
    if (($(stat -c %s "$xplane") < 16 * 1024 * 1024)); then
      cp "$xplane" "$OUT/$arch.xplane.pb"
    fi
  done
done
echo "$PROG: results in $OUT (exit status $status)"
exit "$status"
