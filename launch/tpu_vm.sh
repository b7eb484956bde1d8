#!/usr/bin/env bash
# Cloud TPU VM launcher: create a TPU VM (single host or pod), install ait_jax on every worker, train
# on all workers in a detached tmux session, watch, copy results back and delete the VM.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

# Defaults; each is overridden by the environment variable of the same name, then by its flag.
D_ZONE=us-central2-b
D_ACCELERATOR_TYPE=v4-32
D_REPO_REF=main
D_PYTHON=python3.11
D_DISTRIBUTED=on
D_TMUX_SESSION=ait
D_LOG_WORKER=0
D_LOG_LINES=100

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-$D_ZONE}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-$D_ACCELERATOR_TYPE}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-$D_REPO_REF}
PYTHON=${PYTHON:-$D_PYTHON}
EXTRAS=${EXTRAS:-}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
DATA_DIR=${DATA_DIR:-}
DISTRIBUTED=${DISTRIBUTED:-$D_DISTRIBUTED}
TMUX_SESSION=${TMUX_SESSION:-$D_TMUX_SESSION}
LOG_WORKER=${LOG_WORKER:-$D_LOG_WORKER}
LOG_LINES=${LOG_LINES:-$D_LOG_LINES}
FOLLOW=${FOLLOW:-0}
COPY_DEST=${COPY_DEST:-}
ASSUME_YES=${ASSUME_YES:-0}

usage() {
  cat <<EOF
Usage: $PROG <subcommand> [flags] [-- extra flags for python -m ait_jax.main (or .compile)]

Runs ait_jax on a Cloud TPU VM with gcloud. On the VM, every worker holds the code in ~/ait_jax,
a virtualenv in ~/ait_venv and its training log in ~/ait_logs/worker-<hostname>.log.

Subcommands:
  compile   here, before create (no TPU and no gcloud needed): python -m ait_jax.compile
            --config=CONFIG --topology=ACCELERATOR_TYPE [extra], i.e. the train and eval steps
            compiled for that slice by libtpu (pip install -c constraints.txt -e '.[tpu]'), HBM
            per chip and whether it fits; exit status 1 when it does not
  create    gcloud compute tpus tpu-vm create (name, zone, accelerator type, runtime version)
  install   put the code on every worker (scp of the local git tree, or git clone of --repo), then
            install tmux, a venv and the package with its tpu and gcs extras through the code's
            constraints.txt (jax[tpu]==$AIT_JAX_VERSION, its libtpu, every dependency as CI tests it):
            pip install -c constraints.txt -e '.[tpu,gcs,EXTRAS]'
  check     the preflight on every worker: python -m ait_jax.distributed (process index, devices)
  train     on every worker (--worker=all), in a detached tmux session: the preflight, then
            python -m ait_jax.main --config=CONFIG --workdir=WORKDIR [--config.data_dir=DATA_DIR] [extra]
  status    VM state, the tmux session and the last log lines of every worker
  logs      tail (or --follow) the log of one worker
  copy      copy the worker logs (and the workdir) to a local folder
  delete    gcloud compute tpus tpu-vm delete

Flags (environment variable, default):
  --name NAME               TPU_NAME           (required)
  --zone ZONE               ZONE               ($D_ZONE)
  --project PROJECT         PROJECT            (gcloud's configured project)
  --accelerator-type TYPE   ACCELERATOR_TYPE   ($D_ACCELERATOR_TYPE; e.g. v5litepod-8, v6e-8)
  --runtime-version VER     RUNTIME_VERSION    (from the accelerator type, as Cloud TPU's docs give
                                                it: v2, v3, v4 tpu-ubuntu2204-base, v5e (v5litepod)
                                                v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e
                                                v2-alpha-tpuv6e)
  --spot                    SPOT=1             (0: on-demand VM)
  --repo URL                REPO_URL           (empty: copy this checkout, tracked and untracked
                                                non-ignored files, with tpu-vm scp)
  --ref REF                 REPO_REF           ($D_REPO_REF; branch or tag cloned from --repo)
  --python PYTHON           PYTHON             ($D_PYTHON; jax $AIT_JAX_VERSION needs Python >= 3.11,
                                                installed with apt if missing)
  --extras EXTRAS           EXTRAS             (none beyond tpu,gcs; e.g. prepare, for ImageNet-100)
  --config CONFIG           CONFIG             (required by train and compile; e.g.
                                                configs/cifar100.py:model=base)
  --workdir DIR             WORKDIR            (required by train; a gs:// path on a pod, so that all
                                                workers write checkpoints to one place)
  --data_dir DIR            DATA_DIR           (none: the config's data_dir; e.g. gs://BUCKET/tfds)
  --distributed MODE        DISTRIBUTED        ($D_DISTRIBUTED; AIT_JAX_DISTRIBUTED on the workers)
  --session NAME            TMUX_SESSION       ($D_TMUX_SESSION)
  --worker N|all            LOG_WORKER         ($D_LOG_WORKER; the worker whose log 'logs' shows)
  --lines N                 LOG_LINES          ($D_LOG_LINES; log lines 'logs' shows)
  --follow                  FOLLOW=1           (0; 'logs' keeps following the log)
  --dest DIR                COPY_DEST          (./ait_results/NAME; where 'copy' puts results)
  --yes                     ASSUME_YES=1       (0; 'delete' without gcloud's confirmation prompt)
  --dry-run                 DRY_RUN=1          (0; print each command instead of running it;
                                                anywhere on the line, after -- too)
  -h, --help                this help

Example (a v4-32 pod: 4 workers):
  $PROG compile --accelerator-type v4-32 --config configs/cifar100.py:model=base
  $PROG create  --name ait-v4 --zone us-central2-b --accelerator-type v4-32
  $PROG install --name ait-v4
  $PROG train   --name ait-v4 --config configs/cifar100.py:model=base \\
      --workdir gs://BUCKET/ait/cifar100 --data_dir gs://BUCKET/tfds -- --config.seed=1
  $PROG logs    --name ait-v4 --follow
  $PROG copy    --name ait-v4 --workdir gs://BUCKET/ait/cifar100
  $PROG delete  --name ait-v4
EOF
}

# shellcheck disable=SC2034  # read by parse_args (common.sh)
SWITCHES=(--dry-run=DRY_RUN --spot=SPOT --follow=FOLLOW --yes=ASSUME_YES)
# shellcheck disable=SC2034
VALUE_FLAGS=(--name=TPU_NAME --zone=ZONE --project=PROJECT --accelerator-type=ACCELERATOR_TYPE
             --runtime-version=RUNTIME_VERSION --repo=REPO_URL --ref=REPO_REF --python=PYTHON
             --extras=EXTRAS --config=CONFIG --workdir=WORKDIR --data_dir=DATA_DIR
             --distributed=DISTRIBUTED --session=TMUX_SESSION --worker=LOG_WORKER
             --lines=LOG_LINES --dest=COPY_DEST)
parse_args "$@"

[[ -n $SUBCOMMAND ]] || { usage >&2; die "no subcommand given."; }
if [[ $SUBCOMMAND != compile ]]; then  # compile runs here and needs no VM
  require "$TPU_NAME" --name TPU_NAME
  require "$ZONE" --zone ZONE
  if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null; then
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) or use --dry-run."
  fi
fi

GCLOUD_FLAGS=("--zone=$ZONE")
[[ -z $PROJECT ]] || GCLOUD_FLAGS+=("--project=$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# ssh_workers WORKER COMMAND: run a shell line on one worker or on all of them.
ssh_workers() {
  run "${TPU[@]}" ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "--worker=$1" --command "$2"
}

cmd_compile() {
  compile_here "$ACCELERATOR_TYPE"
}

# runtime_version ACCELERATOR_TYPE: the TPU software version that Cloud TPU's docs name for the
# type's generation (cloud.google.com/tpu/docs/runtimes); fails for a type it does not know.
runtime_version() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

cmd_create() {
  local version=$RUNTIME_VERSION
  if [[ -z $version ]]; then
    version=$(runtime_version "$ACCELERATOR_TYPE") ||
      die "no runtime version known for the accelerator type '$ACCELERATOR_TYPE': pass --runtime-version (see cloud.google.com/tpu/docs/runtimes)."
  fi
  local flags=("--accelerator-type=$ACCELERATOR_TYPE" "--version=$version")
  [[ $SPOT != 1 ]] || flags+=(--spot)
  run "${TPU[@]}" create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" ${flags[@]+"${flags[@]}"}
}

cmd_install() {
  local get_code
  if [[ -n $REPO_URL ]]; then
    get_code="if [ -d ait_jax/.git ]; then git -C ait_jax fetch --depth 1 origin $(quote "$REPO_REF") && git -C ait_jax checkout --force FETCH_HEAD; else git clone --depth 1 --branch $(quote "$REPO_REF") $(quote "$REPO_URL") ait_jax; fi"
  else
    local tarball="${TMPDIR:-/tmp}/ait_jax-$TPU_NAME.tar.gz"
    run_sh "git -C $(quote "$ROOT") ls-files -z --cached --others --exclude-standard | tar -C $(quote "$ROOT") --null -T - -czf $(quote "$tarball")"
    run "${TPU[@]}" scp "$tarball" "$TPU_NAME:ait_jax.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
    get_code="mkdir -p ait_jax && tar -xzf ait_jax.tar.gz -C ait_jax"
  fi
  # The tpu extra is jax[tpu] (libtpu), gcs reads and writes gs:// (a pod's workdir and data).
  local package="./ait_jax[tpu,gcs${EXTRAS:+,$EXTRAS}]"
  local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  ssh_workers all "set -e; $get_code; \
$apt -qq update && $apt -qq install -y tmux $(quote "$PYTHON" "$PYTHON-venv"); \
[ -x ait_venv/bin/python ] || $(quote "$PYTHON") -m venv ait_venv; \
ait_venv/bin/pip install -q -U pip; \
ait_venv/bin/pip install -c ait_jax/constraints.txt -e $(quote "$package")"
}

# The preflight and the environment it needs, as a shell line run from the home directory.
preflight() {
  printf '%s' "cd \"\$HOME/ait_jax\" && . \"\$HOME/ait_venv/bin/activate\" && export AIT_JAX_DISTRIBUTED=$(quote "$DISTRIBUTED") && python -m ait_jax.distributed"
}

cmd_check() {
  ssh_workers all "$(preflight)"
}

cmd_train() {
  require "$CONFIG" --config CONFIG
  require "$WORKDIR" --workdir WORKDIR
  local args=("--config=$CONFIG" "--workdir=$WORKDIR")
  [[ -z $DATA_DIR ]] || args+=("--config.data_dir=$DATA_DIR")
  args+=(${EXTRA[@]+"${EXTRA[@]}"})
  # shellcheck disable=SC2016  # expanded on the worker
  local log='"$HOME/ait_logs/worker-$(hostname).log"'
  local job
  job="{ $(preflight) && python -m ait_jax.main $(quote "${args[@]}"); echo \"[ait] exit status \$?\"; } 2>&1 | tee -a $log"
  local session
  session=$(quote "$TMUX_SESSION")
  ssh_workers all "mkdir -p ait_logs && \
if tmux has-session -t $session 2>/dev/null; then echo \"tmux session $session is still running on \$(hostname): wait for it or stop it with: tmux kill-session -t $session\" >&2; exit 1; fi && \
tmux new-session -d -s $session $(quote "$job") && echo \"started on \$(hostname), log: ~/ait_logs/worker-\$(hostname).log\""
}

cmd_status() {
  run "${TPU[@]}" describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" '--format=value(state,acceleratorType,runtimeVersion)'
  ssh_workers all "echo \"== \$(hostname)\"; tmux ls 2>/dev/null || echo 'no tmux session'; tail -n 3 ait_logs/*.log 2>/dev/null || echo 'no log yet'"
}

cmd_logs() {
  local tail_flags=(-n "$LOG_LINES")
  [[ $FOLLOW != 1 ]] || tail_flags+=(-F)
  ssh_workers "$LOG_WORKER" "tail $(quote "${tail_flags[@]}") ait_logs/worker-*.log"
}

cmd_copy() {
  local dest=${COPY_DEST:-./ait_results/$TPU_NAME}
  run mkdir -p "$dest"
  run "${TPU[@]}" scp --recurse "$TPU_NAME:ait_logs" "$dest" "${GCLOUD_FLAGS[@]}" --worker=all
  if [[ $WORKDIR == gs://* ]]; then
    run gcloud storage rsync --recursive "$WORKDIR" "$dest/workdir"
  elif [[ -n $WORKDIR ]]; then
    # A workdir on the VM's disk: checkpoints are written by worker 0.
    run "${TPU[@]}" scp --recurse "$TPU_NAME:$WORKDIR" "$dest/workdir" "${GCLOUD_FLAGS[@]}" --worker=0
  fi
}

cmd_delete() {
  local flags=()
  [[ $ASSUME_YES != 1 ]] || flags+=(--quiet)
  run "${TPU[@]}" delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" ${flags[@]+"${flags[@]}"}
}

case $SUBCOMMAND in
  compile | create | install | check | train | status | logs | copy | delete) "cmd_$SUBCOMMAND" ;;
  *) die "unknown subcommand '$SUBCOMMAND': use compile, create, install, check, train, status, logs, copy or delete." ;;
esac
