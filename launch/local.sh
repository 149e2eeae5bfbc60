#!/usr/bin/env bash
# Train lens_jax on this machine (CPU, one or several GPUs, or a single-host TPU VM): make or use
# the virtual environment, then run lens-train. Run with --help for the usage; --dry-run prints
# every command without running any.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source-path=SCRIPTDIR
source "$SCRIPT_DIR/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --workdir DIR [options] [-- extra lens-train flags]

Runs lens-train on this machine with every local device of the backend. The virtual
environment (--venv) is made when missing (python3 -m venv) and the package installed into
it with pip install -e '.[EXTRA]' (EXTRA by backend: gpu -> [gpu], tpu -> [tpu], else none).

Options:
  --workdir DIR           training workdir: checkpoints, logs, TensorBoard events; a local path
                          or gs://BUCKET/PATH (required)
  --config PATH           trainer config (default configs/tiny.py)
  --backend B             auto, cpu, gpu or tpu (default auto: whatever jax finds; cpu sets
                          JAX_PLATFORMS=cpu)
  --venv DIR              virtual environment (default: .venv in the repository)
  --python PY             interpreter that makes a missing venv (default python3)
  --no-install            use the venv as it is (fail if lens-train is not installed in it)
  --reinstall             run pip install -e again even when lens-train is there
  --env KEY=VALUE         environment variable for lens-train (repeatable)
  --dry-run               print every command, run none
  -h, --help              this help

Anything after -- goes to lens-train, e.g. -- --config.num_steps=100.

Examples:
  $PROG --workdir /tmp/lens_tiny --backend cpu -- --config.num_steps=20
  $PROG --config configs/lens_3p8b_finetune.py --workdir /data/runs/ft --backend gpu
EOF
}

WORKDIR=""
CONFIG="configs/tiny.py"
BACKEND="auto"
VENV="$REPO_ROOT/.venv"
PYTHON="python3"
INSTALL=auto
ENVS=()
DRY_RUN=0
TRAIN_ARGS=()

split_flag_values "$@"
set -- "${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --workdir) needs_value "$1" $# "${2:-}"; WORKDIR=$2; shift 2 ;;
    --config) needs_value "$1" $# "${2:-}"; CONFIG=$2; shift 2 ;;
    --backend) needs_value "$1" $# "${2:-}"; BACKEND=$2; shift 2 ;;
    --venv) needs_value "$1" $# "${2:-}"; VENV=$2; shift 2 ;;
    --python) needs_value "$1" $# "${2:-}"; PYTHON=$2; shift 2 ;;
    --no-install) INSTALL=never; shift ;;
    --reinstall) INSTALL=always; shift ;;
    --env) needs_value "$1" $# "${2:-}"; env_assignment "$1" "$2"; ENVS+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done

required "$WORKDIR" --workdir
case $BACKEND in
  auto | cpu) EXTRA="" ;;
  gpu) EXTRA="[gpu]" ;;
  tpu) EXTRA="[tpu]" ;;
  *) die "--backend must be auto, cpu, gpu or tpu, got '$BACKEND'" ;;
esac
CONFIG_PATH=$CONFIG
if [[ $CONFIG_PATH != /* ]]; then
  CONFIG_PATH="$REPO_ROOT/$CONFIG"
fi
[[ -f $CONFIG_PATH ]] || die "--config $CONFIG: no such file"

if [[ $DRY_RUN == 1 ]]; then
  echo "# dry run: commands are printed, not run"
fi

if [[ ! -x $VENV/bin/python ]]; then
  [[ $INSTALL != never ]] || die "--no-install: no virtual environment at $VENV"
  run "$PYTHON" -m venv "$VENV"
  INSTALL=always
fi
if [[ $INSTALL == always || ( $INSTALL == auto && ! -x $VENV/bin/lens-train ) ]]; then
  run "$VENV/bin/python" -m pip install --upgrade pip
  run "$VENV/bin/python" -m pip install -e "$REPO_ROOT$EXTRA"
elif [[ ! -x $VENV/bin/lens-train && $DRY_RUN == 0 ]]; then
  die "--no-install: lens-train is not installed in $VENV"
fi

ENV_ARGS=()
if [[ $BACKEND == cpu ]]; then
  ENV_ARGS+=("JAX_PLATFORMS=cpu")
fi
ENV_ARGS+=("${ENVS[@]+"${ENVS[@]}"}")
COMMAND=("$VENV/bin/lens-train" --config "$CONFIG_PATH" --workdir "$WORKDIR")
COMMAND+=("${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
cd "$REPO_ROOT"
if [[ ${#ENV_ARGS[@]} -gt 0 ]]; then
  run env "${ENV_ARGS[@]}" "${COMMAND[@]}"
else
  run "${COMMAND[@]}"
fi
