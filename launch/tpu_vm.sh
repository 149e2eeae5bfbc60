#!/usr/bin/env bash
# Train lens_jax on Cloud TPU VMs: create the TPU (or a queued resource for several slices),
# ship and install the code on every worker, start lens-train on all of them, stream the log,
# stop, delete. Run with --help for the usage; --dry-run prints every command without running.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source-path=SCRIPTDIR
source "$SCRIPT_DIR/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG COMMAND --name NAME --zone ZONE [options] [-- extra lens-train flags]

Train lens_jax on Cloud TPU VMs with gcloud. One slice: a TPU VM
(gcloud compute tpus tpu-vm create). Several slices (--num-slices N > 1) or --queued:
a queued resource (gcloud compute tpus queued-resources create, --node-count N); the
slices are the nodes NAME-0 ... NAME-(N-1) and the trainer's mesh gets a slice axis of N.

Commands:
  create     create the TPU VM / queued resource (waits until a queued resource is ACTIVE)
  setup      copy the code to every worker (scp of this checkout, or git clone of --ref)
             and install it there: pip install -e '.[tpu]'
  train      start lens-train on every worker (--worker=all) in the background;
             log in ~/lens_train.log, PID in ~/lens_train.pid on each worker
  logs       stream the training log of one worker (tail -F; Ctrl-C stops streaming only)
  stop       stop lens-train on every worker
  delete     delete the TPU VM / queued resource (and its nodes)
  status     describe the TPU VM / queued resource
  launch     create, setup, train, then logs
  down       stop, then delete

Options:
  --name NAME             TPU VM or queued resource name (required)
  --zone ZONE             zone, e.g. us-west4-a (required)
  --project PROJECT       Google Cloud project (default: gcloud config's)
  --type TYPE             accelerator type of one slice, e.g. v5litepod-16, v4-32, v5p-64,
                          v6e-16 (required by create)
  --runtime-version V     TPU software version (default by type: v4/v2/v3 tpu-ubuntu2204-base,
                          v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --num-slices N          number of slices (default 1); N > 1 uses a queued resource with
                          --node-count N and passes --config.mesh.slice=N to lens-train
  --queued                use a queued resource even for one slice (waits for capacity)
  --spot                  Spot capacity (preemptible)
  --reserved              reserved capacity
  --wait-minutes M        how long create waits for a queued resource to be ACTIVE (default 120)
  --config PATH           trainer config, relative to the repository
                          (default configs/lens_3p8b_stage1_512.py)
  --workdir DIR           training workdir, shared by all workers: use gs://BUCKET/PATH
                          (required by train)
  --source scp|git        how setup ships the code (default scp: the tracked and untracked,
                          not ignored files of this checkout)
  --repo URL              git repository for --source git (default: this checkout's origin)
  --ref REF               git branch, tag or commit for --source git (default main)
  --remote-dir DIR        code folder on the workers, relative to the home (default lens_jax)
  --env KEY=VALUE         environment variable for lens-train (repeatable)
  --stage GS_SRC=DIR      setup: also copy GS_SRC into the folder DIR (relative to the home) on
                          every worker with gcloud storage cp -r (repeatable): records, converted
                          weights; --stage gs://my-bucket/data/shapes=data gives ~/data/shapes
  --megascale-env         multi-slice: export MEGASCALE_COORDINATOR_ADDRESS (node 0, worker 0),
                          MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID, MEGASCALE_PORT per node
                          (queued resources set these themselves; this is for other set-ups)
  --megascale-port PORT   port of the megascale coordinator (default 8080)
  --log-worker W          worker whose log 'logs' streams (default 0)
  --log-node N            multi-slice: node (slice) whose log 'logs' streams (default 0)
  --no-preflight          do not compile the training step for --type here first
                          (lens-train compile, on by default for create and launch)
  --dry-run               print every command, run none
  -h, --help              this help

Anything after -- goes to lens-train (e.g. -- --config.num_steps=1000).
lens-train gets --config.distributed=yes: it calls jax.distributed.initialize() with no
arguments, and JAX finds the coordinator and the hosts of the slice by itself (TPU VM metadata).

Examples:
  $PROG launch --name lens-v5e --zone us-west4-a --type v5litepod-16 \\
      --workdir gs://my-bucket/runs/lens1 --config configs/lens_3p8b_stage1_512.py
  $PROG launch --name lens-ms --zone us-west4-a --type v5litepod-256 --num-slices 2 \\
      --spot --workdir gs://my-bucket/runs/lens2
  $PROG down --name lens-v5e --zone us-west4-a
EOF
}

COMMAND=""
NAME=""
ZONE=""
PROJECT=""
TYPE=""
RUNTIME_VERSION=""
NUM_SLICES=1
QUEUED=0
CAPACITY=""
WAIT_MINUTES=120
CONFIG="configs/lens_3p8b_stage1_512.py"
WORKDIR=""
SOURCE="scp"
REPO=""
REF="main"
REMOTE_DIR="lens_jax"
ENVS=()
STAGES=()
MEGASCALE_ENV=0
MEGASCALE_PORT=8080
LOG_WORKER=0
LOG_NODE=0
DRY_RUN=0
PREFLIGHT=1
TRAIN_ARGS=()

split_flag_values "$@"
set -- "${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name) needs_value "$1" $# "${2:-}"; NAME=$2; shift 2 ;;
    --zone) needs_value "$1" $# "${2:-}"; ZONE=$2; shift 2 ;;
    --project) needs_value "$1" $# "${2:-}"; PROJECT=$2; shift 2 ;;
    --type) needs_value "$1" $# "${2:-}"; TYPE=$2; shift 2 ;;
    --runtime-version) needs_value "$1" $# "${2:-}"; RUNTIME_VERSION=$2; shift 2 ;;
    --num-slices) needs_value "$1" $# "${2:-}"; positive_int "$1" "$2"; NUM_SLICES=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) CAPACITY="--spot"; shift ;;
    --reserved) CAPACITY="--reserved"; shift ;;
    --wait-minutes) needs_value "$1" $# "${2:-}"; positive_int "$1" "$2"; WAIT_MINUTES=$2; shift 2 ;;
    --config) needs_value "$1" $# "${2:-}"; CONFIG=$2; shift 2 ;;
    --workdir) needs_value "$1" $# "${2:-}"; WORKDIR=$2; shift 2 ;;
    --source) needs_value "$1" $# "${2:-}"; SOURCE=$2; shift 2 ;;
    --repo) needs_value "$1" $# "${2:-}"; REPO=$2; shift 2 ;;
    --ref) needs_value "$1" $# "${2:-}"; REF=$2; shift 2 ;;
    --remote-dir) needs_value "$1" $# "${2:-}"; REMOTE_DIR=$2; shift 2 ;;
    --env) needs_value "$1" $# "${2:-}"; env_assignment "$1" "$2"; ENVS+=("$2"); shift 2 ;;
    --stage)
      needs_value "$1" $# "${2:-}"
      [[ $2 == gs://*=* && -n ${2#*=} && ${2#*=} != /* ]] \
        || die "--stage expects gs://SRC=DIR, DIR relative to the workers' home, got '$2'"
      STAGES+=("$2"); shift 2 ;;
    --megascale-env) MEGASCALE_ENV=1; shift ;;
    --megascale-port) needs_value "$1" $# "${2:-}"; positive_int "$1" "$2"; MEGASCALE_PORT=$2; shift 2 ;;
    --log-worker) needs_value "$1" $# "${2:-}"; nonnegative_int "$1" "$2"; LOG_WORKER=$2; shift 2 ;;
    --log-node) needs_value "$1" $# "${2:-}"; nonnegative_int "$1" "$2"; LOG_NODE=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --no-preflight) PREFLIGHT=0; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    -*) die "unknown option '$1'" ;;
    *)
      [[ -z $COMMAND ]] || die "one command expected, got '$COMMAND' and '$1'"
      COMMAND=$1; shift ;;
  esac
done

case $COMMAND in
  create | setup | train | logs | stop | delete | status | launch | down) ;;
  "") die "a command is required (create, setup, train, logs, stop, delete, status, launch, down)" ;;
  *) die "unknown command '$COMMAND' (create, setup, train, logs, stop, delete, status, launch, down)" ;;
esac
required "$NAME" --name
required "$ZONE" --zone
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name '$NAME': lowercase letters, digits and hyphens, starting with a letter"
[[ $SOURCE == scp || $SOURCE == git ]] || die "--source must be scp or git, got '$SOURCE'"
[[ -n $REMOTE_DIR && $REMOTE_DIR != /* && $REMOTE_DIR != *..* ]] \
  || die "--remote-dir '$REMOTE_DIR': a folder relative to the workers' home (e.g. lens_jax)"
if [[ $NUM_SLICES -gt 1 ]]; then
  QUEUED=1
fi
if [[ $MEGASCALE_ENV == 1 && $NUM_SLICES == 1 ]]; then
  die "--megascale-env needs --num-slices > 1"
fi
case $COMMAND in
  create | launch)
    required "$TYPE" "--type (the accelerator type, e.g. v5litepod-16)"
    if [[ -z $RUNTIME_VERSION ]]; then
      case $TYPE in
        v5litepod-* | v5e-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
        v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
        v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
        v2-* | v3-* | v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
        *) die "no default --runtime-version for --type '$TYPE'; pass --runtime-version" ;;
      esac
    fi ;;
esac
case $COMMAND in
  train | launch)
    required "$WORKDIR" "--workdir (use gs://BUCKET/PATH: every worker writes there)"
    [[ -f $REPO_ROOT/$CONFIG ]] || die "--config $CONFIG: no such file in $REPO_ROOT"
    if [[ $WORKDIR != gs://* ]]; then
      printf '%s: warning: --workdir %s is not gs://: on a multi-host slice it must be a folder\n' \
        "$PROG" "$WORKDIR" >&2
      printf '%s: warning: every worker shares (e.g. a gcsfuse mount at the same path)\n' \
        "$PROG" >&2
    fi ;;
esac

# What setup needs is checked before anything is created.
case $COMMAND in
  setup | launch)
    if [[ $SOURCE == git && -z $REPO ]]; then
      REPO=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null) \
        || die "--source git: no --repo given and this checkout has no 'origin' remote"
    fi
    if [[ $SOURCE == scp ]]; then
      git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
        || die "--source scp ships the files git knows in $REPO_ROOT, which is not a git checkout"
    fi ;;
esac

GCLOUD_COMMON=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then
  GCLOUD_COMMON+=("--project=$PROJECT")
fi

# ssh to the workers: ssh_workers NODES WORKERS REMOTE_COMMAND (NODES ignored for a TPU VM).
ssh_workers() {
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources ssh "$NAME" "${GCLOUD_COMMON[@]}" \
      "--node=$1" "--worker=$2" "--command=$3"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_COMMON[@]}" "--worker=$2" "--command=$3"
  fi
}

do_create() {
  local extra=()
  if [[ -n $CAPACITY ]]; then
    extra+=("$CAPACITY")
  fi
  if [[ $QUEUED == 0 ]]; then
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_COMMON[@]}" \
      "--accelerator-type=$TYPE" "--version=$RUNTIME_VERSION" "${extra[@]+"${extra[@]}"}"
    return
  fi
  if [[ $NUM_SLICES -gt 1 ]]; then
    extra+=("--node-count=$NUM_SLICES" "--node-prefix=$NAME")
  else
    extra+=("--node-id=$NAME")
  fi
  run gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_COMMON[@]}" \
    "--accelerator-type=$TYPE" "--runtime-version=$RUNTIME_VERSION" "${extra[@]}"
  wait_active
}

wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_COMMON[@]}"
    "--format=value(state.state)")
  printf '# waiting up to %s minutes for queued resource %s to be ACTIVE:\n' "$WAIT_MINUTES" "$NAME"
  run "${describe[@]}"
  if [[ $DRY_RUN == 1 ]]; then
    return 0
  fi
  local deadline=$((SECONDS + 60 * WAIT_MINUTES)) state
  while true; do
    state=$("${describe[@]}")
    case $state in
      ACTIVE) echo "queued resource $NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING)
        echo "$PROG: queued resource $NAME is $state" >&2; exit 1 ;;
    esac
    if [[ $SECONDS -ge $deadline ]]; then
      echo "$PROG: queued resource $NAME still $state after $WAIT_MINUTES minutes" >&2
      exit 1
    fi
    echo "queued resource $NAME: $state"
    sleep 30
  done
}

do_setup() {
  local install stage
  install="cd ~/$(quote "$REMOTE_DIR") && python3 -m pip install --upgrade pip"
  install+=' && python3 -m pip install -e ".[tpu]"'
  for stage in "${STAGES[@]+"${STAGES[@]}"}"; do
    install+=" && mkdir -p ~/$(quote "${stage#*=}")"
    install+=" && gcloud storage cp -r $(quote "${stage%%=*}") ~/$(quote "${stage#*=}")"
  done
  if [[ $SOURCE == git ]]; then
    local dir fetch
    # shellcheck disable=SC2088  # the tilde is expanded on the workers
    dir="~/$(quote "$REMOTE_DIR")"
    # The ref is fetched, then checked out detached: branches, tags and commits alike, and a
    # second setup moves an existing clone to the ref's current commit.
    fetch="(test -d $dir/.git || git clone $(quote "$REPO") $dir)"
    fetch+=" && git -C $dir fetch --tags origin $(quote "$REF")"
    fetch+=" && git -C $dir checkout --detach FETCH_HEAD"
    ssh_workers all all "$fetch && $install"
    return
  fi
  local tarball
  tarball="${TMPDIR:-/tmp}/lens_jax_src_${NAME}.tgz"
  run_sh "cd $(quote "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard \
| tar czf $(quote "$tarball") --null -T -"
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources scp "$tarball" "$NAME:lens_jax_src.tgz" \
      "${GCLOUD_COMMON[@]}" --node=all --worker=all
  else
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:lens_jax_src.tgz" \
      "${GCLOUD_COMMON[@]}" --worker=all
  fi
  local unpack
  unpack="mkdir -p ~/$(quote "$REMOTE_DIR")"
  unpack+=" && tar xzf ~/lens_jax_src.tgz -C ~/$(quote "$REMOTE_DIR")"
  ssh_workers all all "$unpack && $install"
}

# The command that starts lens-train in the background on one worker ($1: extra exports).
train_command() {
  local exports=$1 cmd
  # distributed=yes: jax.distributed.initialize() with no arguments on every worker; JAX reads
  # the slice's hosts (and a multi-slice set-up) from the TPU VM metadata. Failing loudly beats
  # workers silently training alone.
  local args=(lens-train --config "$CONFIG" --workdir "$WORKDIR" --config.distributed=yes)
  if [[ $NUM_SLICES -gt 1 ]]; then
    args+=("--config.mesh.slice=$NUM_SLICES")
  fi
  args+=("${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
  cmd="cd ~/$(quote "$REMOTE_DIR") && export PATH=\"\$HOME/.local/bin:\$PATH\""
  local assignment
  for assignment in "${ENVS[@]+"${ENVS[@]}"}"; do
    cmd+=" && export $(quote "$assignment")"
  done
  cmd+="$exports"
  cmd+=" && (nohup $(quote_all "${args[@]}") > ~/lens_train.log 2>&1 < /dev/null &"
  cmd+=" echo \$! > ~/lens_train.pid) && echo started lens-train on \$(hostname)"
  printf '%s' "$cmd"
}

do_train() {
  if [[ $MEGASCALE_ENV == 0 ]]; then
    ssh_workers all all "$(train_command "")"
    return
  fi
  # Multi-slice with explicit megascale settings: one ssh per node (its slice id), in parallel.
  local ip_command=(gcloud compute tpus tpu-vm describe "$NAME-0" "${GCLOUD_COMMON[@]}"
    "--format=value(networkEndpoints[0].ipAddress)")
  local coordinator="NODE0_WORKER0_IP"
  printf '# megascale coordinator: worker 0 of node %s-0\n' "$NAME"
  run "${ip_command[@]}"
  if [[ $DRY_RUN == 0 ]]; then
    coordinator=$("${ip_command[@]}")
    [[ -n $coordinator ]] || { echo "$PROG: no IP address for $NAME-0" >&2; exit 1; }
  fi
  local node exports
  for ((node = 0; node < NUM_SLICES; node++)); do
    exports=" && export MEGASCALE_COORDINATOR_ADDRESS=$coordinator:$MEGASCALE_PORT"
    exports+=" MEGASCALE_NUM_SLICES=$NUM_SLICES MEGASCALE_SLICE_ID=$node"
    exports+=" MEGASCALE_PORT=$MEGASCALE_PORT"
    run_bg gcloud compute tpus queued-resources ssh "$NAME" "${GCLOUD_COMMON[@]}" \
      "--node=$node" --worker=all "--command=$(train_command "$exports")"
  done
  wait_background
}

do_logs() {
  ssh_workers "$LOG_NODE" "$LOG_WORKER" "tail -n +1 -F ~/lens_train.log"
}

do_stop() {
  # shellcheck disable=SC2016  # expanded on the workers
  ssh_workers all all 'if [ -f ~/lens_train.pid ]; then
kill "$(cat ~/lens_train.pid)" 2>/dev/null || true; rm -f ~/lens_train.pid
echo stopped lens-train on $(hostname); fi'
}

do_delete() {
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_COMMON[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_COMMON[@]}" --quiet
  fi
}

do_status() {
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_COMMON[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_COMMON[@]}"
  fi
}

if [[ $DRY_RUN == 1 ]]; then
  echo "# dry run: commands are printed, not run"
fi
# The training step must compile and fit on the slices before any TPU is asked for.
if [[ $PREFLIGHT == 1 && ($COMMAND == create || $COMMAND == launch) ]]; then
  preflight "$REPO_ROOT" "$CONFIG" "$TYPE" "$NUM_SLICES" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"
fi
case $COMMAND in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  status) do_status ;;
  launch) do_create; do_setup; do_train; do_logs ;;
  down) do_stop; do_delete ;;
esac
