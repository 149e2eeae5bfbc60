#!/usr/bin/env bash
# Train lens_jax as a GKE workload with xpk (one or several TPU slices): create the workload,
# list, stream logs, delete. Run with --help for the usage; --dry-run prints every command.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source-path=SCRIPTDIR
source "$SCRIPT_DIR/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG COMMAND --cluster CLUSTER [options] [-- extra lens-train flags]

Run lens-train as an xpk workload on a GKE cluster with TPU node pools (the cluster is made
beforehand with 'xpk cluster create'). xpk layers this checkout (--script-dir) into a base
image, or runs a ready image (--docker-image), on every host of every slice; for several
slices it sets the megascale (multi-slice) environment itself, and this script passes the
slice count to the trainer's mesh (--config.mesh.slice=N).

Commands:
  create     xpk workload create (the workload installs the code, then runs lens-train)
  list       xpk workload list
  logs       stream the workload's logs (kubectl logs -f; first host of slice 0, or all)
  delete     xpk workload delete
  launch     create, then logs

Options:
  --cluster NAME          GKE cluster made by 'xpk cluster create' (required)
  --workload NAME         workload name (required by create, logs, delete, launch)
  --tpu-type TYPE         accelerator type of one slice, e.g. v5litepod-256 (required by create)
  --num-slices N          number of slices (default 1)
  --project PROJECT       Google Cloud project (default: gcloud config's)
  --zone ZONE             zone of the cluster (default: gcloud config's; required by logs)
  --base-docker-image IMG image the checkout is layered into (default: xpk's own default)
  --docker-image IMG      ready image to run as is (lens_jax installed in it: implies
                          --no-install); not together with --base-docker-image
  --script-dir DIR        folder layered into the image (default: the repository root)
  --no-install            do not run pip install -e '.[tpu]' in the workload first
  --config PATH           trainer config, relative to the repository
                          (default configs/lens_3p8b_stage1_512.py)
  --workdir DIR           training workdir: gs://BUCKET/PATH (required by create)
  --env KEY=VALUE         environment variable for lens-train (repeatable)
  --all-workers           logs: every host of every slice, prefixed with the pod name
  --no-preflight          do not compile the training step for --tpu-type here first
                          (lens-train compile, on by default for create and launch)
  --dry-run               print every command, run none
  -h, --help              this help

Anything after -- goes to lens-train. The xpk command is \$XPK (default: xpk; e.g.
XPK="python3 xpk/xpk.py" for a source checkout).

Examples:
  $PROG launch --cluster lens-v5e --workload lens-run1 --tpu-type v5litepod-256 \\
      --num-slices 2 --zone us-west4-a --workdir gs://my-bucket/runs/run1
  $PROG delete --cluster lens-v5e --workload lens-run1
EOF
}

COMMAND=""
CLUSTER=""
WORKLOAD=""
TPU_TYPE=""
NUM_SLICES=1
PROJECT=""
ZONE=""
BASE_IMAGE=""
DOCKER_IMAGE=""
SCRIPT_DIR_ARG="$REPO_ROOT"
INSTALL=1
CONFIG="configs/lens_3p8b_stage1_512.py"
WORKDIR=""
ENVS=()
ALL_WORKERS=0
DRY_RUN=0
PREFLIGHT=1
TRAIN_ARGS=()

split_flag_values "$@"
set -- "${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --cluster) needs_value "$1" $# "${2:-}"; CLUSTER=$2; shift 2 ;;
    --workload) needs_value "$1" $# "${2:-}"; WORKLOAD=$2; shift 2 ;;
    --tpu-type) needs_value "$1" $# "${2:-}"; TPU_TYPE=$2; shift 2 ;;
    --num-slices) needs_value "$1" $# "${2:-}"; positive_int "$1" "$2"; NUM_SLICES=$2; shift 2 ;;
    --project) needs_value "$1" $# "${2:-}"; PROJECT=$2; shift 2 ;;
    --zone) needs_value "$1" $# "${2:-}"; ZONE=$2; shift 2 ;;
    --base-docker-image) needs_value "$1" $# "${2:-}"; BASE_IMAGE=$2; shift 2 ;;
    --docker-image) needs_value "$1" $# "${2:-}"; DOCKER_IMAGE=$2; INSTALL=0; shift 2 ;;
    --script-dir) needs_value "$1" $# "${2:-}"; SCRIPT_DIR_ARG=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --config) needs_value "$1" $# "${2:-}"; CONFIG=$2; shift 2 ;;
    --workdir) needs_value "$1" $# "${2:-}"; WORKDIR=$2; shift 2 ;;
    --env) needs_value "$1" $# "${2:-}"; env_assignment "$1" "$2"; ENVS+=("$2"); shift 2 ;;
    --all-workers) ALL_WORKERS=1; shift ;;
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
  create | list | logs | delete | launch) ;;
  "") die "a command is required (create, list, logs, delete, launch)" ;;
  *) die "unknown command '$COMMAND' (create, list, logs, delete, launch)" ;;
esac
required "$CLUSTER" --cluster
case $COMMAND in
  create | logs | delete | launch)
    required "$WORKLOAD" --workload
    [[ $WORKLOAD =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
      || die "--workload '$WORKLOAD': lowercase letters, digits and hyphens, starting with a letter" ;;
esac
case $COMMAND in
  create | launch)
    required "$TPU_TYPE" "--tpu-type (the accelerator type of one slice, e.g. v5litepod-256)"
    required "$WORKDIR" "--workdir (use gs://BUCKET/PATH: every host writes there)"
    [[ -f $REPO_ROOT/$CONFIG ]] || die "--config $CONFIG: no such file in $REPO_ROOT"
    if [[ -n $BASE_IMAGE && -n $DOCKER_IMAGE ]]; then
      die "--base-docker-image and --docker-image exclude each other"
    fi
    if [[ -z $DOCKER_IMAGE && ! -d $SCRIPT_DIR_ARG ]]; then
      die "--script-dir $SCRIPT_DIR_ARG: no such folder"
    fi ;;
esac
case $COMMAND in
  logs | launch) required "$ZONE" "--zone (logs fetch the cluster's credentials)" ;;
esac

read -r -a XPK_CMD <<<"${XPK:-xpk}"
LOCATION_ARGS=()
if [[ -n $PROJECT ]]; then
  LOCATION_ARGS+=("--project=$PROJECT")
fi
if [[ -n $ZONE ]]; then
  LOCATION_ARGS+=("--zone=$ZONE")
fi

# The shell command every host runs.
workload_command() {
  local cmd="" assignment
  local args=(lens-train --config "$CONFIG" --workdir "$WORKDIR")
  if [[ $NUM_SLICES -gt 1 ]]; then
    args+=("--config.mesh.slice=$NUM_SLICES")
  fi
  args+=("${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
  for assignment in "${ENVS[@]+"${ENVS[@]}"}"; do
    cmd+="export $(quote "$assignment") && "
  done
  if [[ $INSTALL == 1 ]]; then
    cmd+='python3 -m pip install -e ".[tpu]" && '
  fi
  cmd+=$(quote_all "${args[@]}")
  printf '%s' "$cmd"
}

do_create() {
  local image_args=()
  if [[ -n $DOCKER_IMAGE ]]; then
    image_args+=("--docker-image=$DOCKER_IMAGE")
  else
    image_args+=("--script-dir=$SCRIPT_DIR_ARG")
    if [[ -n $BASE_IMAGE ]]; then
      image_args+=("--base-docker-image=$BASE_IMAGE")
    fi
  fi
  run "${XPK_CMD[@]}" workload create "--cluster=$CLUSTER" "--workload=$WORKLOAD" \
    "--tpu-type=$TPU_TYPE" "--num-slices=$NUM_SLICES" "${LOCATION_ARGS[@]+"${LOCATION_ARGS[@]}"}" \
    "${image_args[@]}" "--command=$(workload_command)"
}

do_list() {
  run "${XPK_CMD[@]}" workload list "--cluster=$CLUSTER" "${LOCATION_ARGS[@]+"${LOCATION_ARGS[@]}"}"
}

do_delete() {
  run "${XPK_CMD[@]}" workload delete "--cluster=$CLUSTER" "--workload=$WORKLOAD" \
    "${LOCATION_ARGS[@]+"${LOCATION_ARGS[@]}"}"
}

do_logs() {
  local region=${ZONE%-*}  # xpk clusters are regional: us-west4-a -> us-west4
  local credentials=(gcloud container clusters get-credentials "$CLUSTER" "--location=$region")
  if [[ -n $PROJECT ]]; then
    credentials+=("--project=$PROJECT")
  fi
  run "${credentials[@]}"
  local selector="jobset.sigs.k8s.io/jobset-name=$WORKLOAD"
  local logs=(kubectl logs -f --container=jax-tpu --timestamps)
  if [[ $ALL_WORKERS == 1 ]]; then
    logs+=(--prefix --max-log-requests=1024 "--selector=$selector")
  else
    logs+=("--selector=$selector,jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0")
  fi
  printf '# waiting for the pods of %s (Ctrl-C stops streaming only, not the workload)\n' \
    "$WORKLOAD"
  local pods=(kubectl get pods "--selector=$selector" -o name)
  run "${pods[@]}"
  if [[ $DRY_RUN == 0 ]]; then
    local deadline=$((SECONDS + 3600))
    until [[ -n $("${pods[@]}" 2>/dev/null) ]]; do
      [[ $SECONDS -lt $deadline ]] || { echo "$PROG: no pod of $WORKLOAD after 1 hour" >&2; exit 1; }
      sleep 20
    done
  fi
  run kubectl wait --for=condition=Ready pod "--selector=$selector" --timeout=3600s
  run "${logs[@]}"
}

if [[ $DRY_RUN == 1 ]]; then
  echo "# dry run: commands are printed, not run"
fi
# The training step must compile and fit on the slices before the workload is queued.
if [[ $PREFLIGHT == 1 && ($COMMAND == create || $COMMAND == launch) ]]; then
  preflight "$REPO_ROOT" "$CONFIG" "$TPU_TYPE" "$NUM_SLICES" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"
fi
case $COMMAND in
  create) do_create ;;
  list) do_list ;;
  logs) do_logs ;;
  delete) do_delete ;;
  launch) do_create; do_logs ;;
esac
