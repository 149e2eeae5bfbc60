# shellcheck shell=bash
# Helpers shared by the launch scripts; sourced, never run. Callers set PROG and DRY_RUN.

# Prints an error naming the script, points at --help and exits 2.
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for the usage.\n" "$PROG" >&2
  exit 2
}

# One word, shell-quoted only when it needs it (for printing and for remote command strings).
quote() {
  local word=$1
  if [[ -z $word ]]; then
    printf "''"
  elif [[ $word =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# All arguments as one shell-quoted command line.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Prints a command ("+ cmd args"), then runs it unless DRY_RUN=1.
run() {
  printf '+ %s\n' "$(quote_all "$@")"
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    return 0
  fi
  "$@"
}

# Prints a shell pipeline, then runs it with bash unless DRY_RUN=1.
run_sh() {
  printf '+ %s\n' "$1"
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    return 0
  fi
  bash -c "$1"
}

# Like run, in the background (the caller waits); the PID is appended to BACKGROUND_PIDS.
BACKGROUND_PIDS=()
run_bg() {
  printf '+ %s &\n' "$(quote_all "$@")"
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    return 0
  fi
  "$@" &
  BACKGROUND_PIDS+=("$!")
}

# Waits for every run_bg command; fails if any failed.
wait_background() {
  local pid status=0
  for pid in "${BACKGROUND_PIDS[@]+"${BACKGROUND_PIDS[@]}"}"; do
    wait "$pid" || status=1
  done
  BACKGROUND_PIDS=()
  return "$status"
}

# needs_value FLAG ARGC [NEXT]: dies unless the flag has a following value (not another --flag).
needs_value() {
  [[ $2 -ge 2 && ${3:-} != --* ]] || die "$1 needs a value"
}

positive_int() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

nonnegative_int() {
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}

# required VALUE FLAG: dies when VALUE is empty.
required() {
  [[ -n $1 ]] || die "$2 is required"
}

# KEY=VALUE check for --env.
env_assignment() {
  [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "$1 expects KEY=VALUE, got '$2'"
}

# Splits "--flag=value" arguments into "--flag" "value"; the result is in SPLIT_ARGS.
# Everything after "--" is kept as is.
split_flag_values() {
  SPLIT_ARGS=()
  while [[ $# -gt 0 ]]; do
    if [[ $1 == -- ]]; then
      SPLIT_ARGS+=("$@")
      return 0
    fi
    if [[ $1 == --*=* ]]; then
      SPLIT_ARGS+=("${1%%=*}" "${1#*=}")
    else
      SPLIT_ARGS+=("$1")
    fi
    shift
  done
}

# Preflight: compile the training step for the target slices on this machine (lens-train
# compile: libtpu's compiler, abstract weights, no TPU needed) before TPUs are asked for, so a
# configuration that cannot fit fails here in minutes. Needs lens_jax with the tpu extra
# installed locally (pip install -e '.[tpu]'); $PREFLIGHT_PYTHON (default python3) runs it.
# preflight REPO_ROOT CONFIG TYPE NUM_SLICES [lens-train flags: the --config.* ones are used]
preflight() {
  local root=$1 config=$2 type=$3 slices=$4 flag
  shift 4
  local args=("${PREFLIGHT_PYTHON:-python3}" -m lens_jax.train.cli compile --config "$config"
    --topology "$type" --num-slices "$slices")
  for flag in "$@"; do
    if [[ $flag == --config.* ]]; then
      args+=("$flag")
    fi
  done
  printf '# preflight: compiling the training step for %s x %s here (--no-preflight skips)\n' \
    "$slices" "$type"
  run_sh "cd $(quote "$root") && $(quote_all "${args[@]}")" \
    || die "preflight: the training step of $config does not compile or fit on $slices x $type" \
      "(see above); change the config, or skip the check with --no-preflight"
}
