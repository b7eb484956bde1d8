# shellcheck shell=bash
# Helpers sourced by tpu_vm.sh and gpu.sh: errors, the flag loop, shell quoting and the --dry-run
# command runner.
# Not meant to be run on its own.

# The jax release CI tests (constraints.txt); the accelerator builds must match it.
# shellcheck disable=SC2034  # used by the scripts that source this file
AIT_JAX_VERSION=0.10.2

# 1 prints every command instead of running it (the scripts' --dry-run flag sets it too).
DRY_RUN=${DRY_RUN:-0}

# die MESSAGE: one clear sentence on stderr and exit status 2 (a usage error).
die() {
  echo "${PROG:-$0}: error: $*" >&2
  exit 2
}

# need_value FLAG REST...: a flag that takes a value must be followed by one.
need_value() {
  (($# > 1)) || die "$1 needs a value (see --help)."
}

# require VALUE FLAG ENV: a setting without a default must be given.
require() {
  [[ -n $1 ]] || die "no $2 given: pass $2 or set $3."
}

# Flags renamed since, as OLD=NEW words: the old spelling stops with one line naming the new one.
# --data_dir is the data folder's spelling everywhere (ait_jax.data.prepare, --config.data_dir).
RENAMED=(--data-dir=--data_dir)

# parse_args ARGS...: the scripts' one flag loop. A script names its flags in two arrays of
# FLAG=VARIABLE words, SWITCHES (the flag sets VARIABLE to 1) and VALUE_FLAGS (the flag takes a
# value, as --flag VALUE or --flag=VALUE), and defines usage. Sets SUBCOMMAND (the one word that is
# not a flag) and EXTRA (the words after --). --dry-run counts wherever it stands, after -- too
# (and is not passed on): a flag added at the end of a command line must never launch for real.
parse_args() {
  SUBCOMMAND=
  EXTRA=()
  local arg variable
  for arg in "$@"; do
    [[ $arg != --dry-run ]] || DRY_RUN=1
  done
  while (($#)); do
    arg=$1
    shift
    if [[ $arg == --*=* ]]; then
      set -- "${arg#*=}" "$@"
      arg=${arg%%=*}
    fi
    case $arg in
      -h | --help) usage; exit 0 ;;
      --)
        for arg in "$@"; do
          [[ $arg == --dry-run ]] || EXTRA+=("$arg")
        done
        break ;;
    esac
    if variable=$(flag_variable "$arg" "${SWITCHES[@]}"); then
      printf -v "$variable" 1
    elif variable=$(flag_variable "$arg" "${VALUE_FLAGS[@]}"); then
      need_value "$arg" "$@"
      printf -v "$variable" '%s' "$1"
      shift
    elif variable=$(flag_variable "$arg" "${RENAMED[@]}"); then
      die "$arg is now spelled $variable (see --help)."
    elif [[ $arg == -* ]]; then
      die "unknown flag $arg (see --help)."
    else
      [[ -z $SUBCOMMAND ]] || die "one subcommand at a time, got '$SUBCOMMAND' and '$arg'."
      SUBCOMMAND=$arg
    fi
  done
}

# flag_variable FLAG FLAG=VARIABLE...: prints the VARIABLE of FLAG; fails when FLAG is not listed.
flag_variable() {
  local flag=$1 entry
  shift
  for entry in "$@"; do
    if [[ ${entry%%=*} == "$flag" ]]; then
      printf '%s' "${entry#*=}"
      return 0
    fi
  done
  return 1
}

# quote ARGS...: the arguments as one line that a POSIX shell splits back into the same words.
quote() {
  local plain='^[A-Za-z0-9_./:=@%+,-]+$' word out=()
  for word in "$@"; do
    if [[ $word =~ $plain ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  local IFS=' '
  printf '%s' "${out[*]}"
}

# run CMD ARGS...: prints the command (stdout with --dry-run, else stderr as a log line) and runs it
# unless this is a dry run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote "$@")"
  else
    printf '+ %s\n' "$(quote "$@")" >&2
    "$@"
  fi
}

# run_sh LINE: like run, for a local shell line with pipes or redirections.
run_sh() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$1"
  else
    printf '+ %s\n' "$1" >&2
    bash -o pipefail -c "$1"
  fi
}

# compile_here TOPOLOGY: `compile` of both scripts, run on this host (a TPU slice or a GPU is
# compiled for, not needed): python -m ait_jax.compile for --config and the extra arguments.
compile_here() {
  require "$CONFIG" --config CONFIG
  local args=("--config=$CONFIG" "--topology=$1")
  args+=(${EXTRA[@]+"${EXTRA[@]}"})
  cd "$ROOT" || die "cannot enter $ROOT."  # the config path is relative to the checkout, as for train
  run python -m ait_jax.compile "${args[@]}"
}
