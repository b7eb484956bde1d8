#!/usr/bin/env bash
# GPU host launcher: install ait_jax with the CUDA build of jax into a virtualenv, check that JAX sees
# the GPUs, and train (the preflight, then python -m ait_jax.main, logged to a file).
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

# Defaults; each is overridden by the environment variable of the same name, then by its flag.
D_VENV=$ROOT/.venv
D_PYTHON=python3
D_CUDA=12

VENV=${VENV:-$D_VENV}
PYTHON=${PYTHON:-$D_PYTHON}
CUDA=${CUDA:-$D_CUDA}
EXTRAS=${EXTRAS:-}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
DATA_DIR=${DATA_DIR:-}
LOG_FILE=${LOG_FILE:-}
D_GPU=h100x8
GPU=${GPU:-$D_GPU}

usage() {
  cat <<EOF
Usage: $PROG <subcommand> [flags] [-- extra flags for python -m ait_jax.main]

Runs ait_jax on this machine's GPUs, from this checkout ($ROOT).

Subcommands:
  install   create the venv, then install jax[cuda<CUDA>]==$AIT_JAX_VERSION and the package through the
            checkout's constraints.txt (every dependency as CI tests it, on Python 3.11):
            pip install -c constraints.txt 'jax[cuda<CUDA>]==$AIT_JAX_VERSION' -e '.[EXTRAS]'
  check     print jax.devices() (fails when JAX sees no GPU), then the preflight
            python -m ait_jax.distributed (process index, process count, devices)
  train     the preflight, then python -m ait_jax.main --config=CONFIG --workdir=WORKDIR
            [--config.data_dir=DATA_DIR] [extra], with all output appended to LOG_FILE
  compile   here, before renting a GPU (no GPU, driver or venv needed): python -m ait_jax.compile
            --config=CONFIG --topology=GPU [extra], the steps compiled by JAX's CUDA plugin, memory
            per GPU and whether it fits; exit status 1 when it does not (plugin: README, GPU)

Flags (environment variable, default):
  --venv DIR          VENV        ($D_VENV)
  --python PYTHON     PYTHON      ($D_PYTHON; creates the venv, needs Python >= 3.11; CI tests 3.11)
  --cuda 12|13        CUDA        ($D_CUDA; jax[cuda12] needs an NVIDIA driver >= 525, jax[cuda13] >= 580)
  --extras EXTRAS     EXTRAS      (none; e.g. gcs for a gs:// workdir, prepare for ImageNet-100)
  --config CONFIG     CONFIG      (required by train; e.g. configs/cifar100.py:model=base)
  --workdir DIR       WORKDIR     (required by train; a local folder or gs:// path)
                                  CONFIG is relative to the checkout, other paths to the current folder
  --data_dir DIR      DATA_DIR    (none: the config's data_dir; e.g. gs://BUCKET/tfds)
  --log-file FILE     LOG_FILE    (WORKDIR/train.log; \$HOME/ait_logs/train.log for a gs:// workdir)
  --gpu GPU           GPU         ($D_GPU; compile's target: a100-40, a100-80, h100, h200,
                                  h100x8, ...)
  --dry-run           DRY_RUN=1   (0; print each command instead of running it; anywhere, after -- too)
  -h, --help          this help

Several GPU hosts: run the same train command on each host with
  AIT_JAX_COORDINATOR=HOST0:1234 AIT_JAX_NUM_PROCESSES=N AIT_JAX_PROCESS_ID=I
(I = 0 on HOST0); SLURM jobs are detected without them.

Example:
  $PROG install
  $PROG check
  $PROG train --config configs/cifar100.py:model=base --workdir workdir/cifar100 \\
      --data_dir ~/tensorflow_datasets -- --config.seed=1
EOF
}

# shellcheck disable=SC2034  # read by parse_args (common.sh)
SWITCHES=(--dry-run=DRY_RUN)
# shellcheck disable=SC2034
VALUE_FLAGS=(--venv=VENV --python=PYTHON --cuda=CUDA --extras=EXTRAS --config=CONFIG
             --workdir=WORKDIR --data_dir=DATA_DIR --log-file=LOG_FILE --gpu=GPU)
parse_args "$@"

[[ -n $SUBCOMMAND ]] || { usage >&2; die "no subcommand given."; }
PY=$VENV/bin/python

cmd_install() {
  [[ $CUDA == 12 || $CUDA == 13 ]] || die "--cuda must be 12 or 13, got '$CUDA'."
  if [[ $DRY_RUN != 1 ]]; then
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found: pass --python with a Python >= 3.11."
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
      die "jax $AIT_JAX_VERSION needs Python >= 3.11, $PYTHON is older: pass --python python3.11 (or newer)."
  fi
  local package=$ROOT
  [[ -z $EXTRAS ]] || package="${ROOT}[$EXTRAS]"
  run "$PYTHON" -m venv "$VENV"
  run "$PY" -m pip install -U pip
  # One resolve, so that the CUDA plugins and the package's dependencies agree with the pins.
  run "$PY" -m pip install -c "$ROOT/constraints.txt" "jax[cuda$CUDA]==$AIT_JAX_VERSION" -e "$package"
}

cmd_check() {
  [[ $DRY_RUN == 1 || -x $PY ]] || die "no venv at $VENV: run '$PROG install' first (or pass --venv)."
  run "$PY" -c 'import sys, jax; print(jax.devices()); sys.exit(None if jax.default_backend() == "gpu" else "JAX sees no GPU: check nvidia-smi, and that --cuda matches the driver.")'
  run_sh "cd $(quote "$ROOT") && $(quote "$PY") -m ait_jax.distributed"
}

cmd_train() {
  require "$CONFIG" --config CONFIG
  require "$WORKDIR" --workdir WORKDIR
  [[ $DRY_RUN == 1 || -x $PY ]] || die "no venv at $VENV: run '$PROG install' first (or pass --venv)."
  # The job runs from the checkout (where configs/ lives): make local paths given here absolute.
  [[ $WORKDIR == gs://* || $WORKDIR == /* ]] || WORKDIR=$PWD/$WORKDIR
  local log=$LOG_FILE
  if [[ -z $log ]]; then
    if [[ $WORKDIR == gs://* ]]; then log=$HOME/ait_logs/train.log; else log=$WORKDIR/train.log; fi
  fi
  local args=("--config=$CONFIG" "--workdir=$WORKDIR")
  [[ -z $DATA_DIR ]] || args+=("--config.data_dir=$DATA_DIR")
  args+=(${EXTRA[@]+"${EXTRA[@]}"})
  [[ $log == /* ]] || log=$PWD/$log
  run mkdir -p "$(dirname "$log")"
  run_sh "cd $(quote "$ROOT") && { $(quote "$PY") -m ait_jax.distributed && $(quote "$PY") -m ait_jax.main $(quote "${args[@]}"); } 2>&1 | tee -a $(quote "$log")"
}

cmd_compile() {
  compile_here "$GPU"
}

case $SUBCOMMAND in
  install | check | train | compile) "cmd_$SUBCOMMAND" ;;
  *) die "unknown subcommand '$SUBCOMMAND': use install, check, train or compile." ;;
esac
