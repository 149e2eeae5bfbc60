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

Runs lens-train on this machine with every local device of the backend, or, with
--processes N, N lens-train processes joined by jax.distributed as the hosts of a pod slice are
(coordinator on 127.0.0.1, a free port; CPU backend with --devices-per-process fake devices each;
CPU collectives: gloo). Their log lines are prefixed with "[INDEX] "; the first process to fail
stops the others (SIGTERM, then SIGKILL after --stop-grace seconds) and its status is the exit
status; SIGTERM/SIGINT to this script is passed to every process. The virtual
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
  --processes N           lens-train processes on this machine, as the hosts of a slice (default 1)
  --devices-per-process M fake CPU devices per process (XLA_FLAGS; implies --backend cpu)
  --module MOD            run python -m MOD instead of lens-train (same arguments; tests)
  --stop-grace S          seconds between SIGTERM and SIGKILL when stopping processes (default 10)
  --dry-run               print every command, run none
  -h, --help              this help

Anything after -- goes to lens-train, e.g. -- --config.num_steps=100.

Examples:
  $PROG --workdir /tmp/lens_tiny --backend cpu -- --config.num_steps=20
  $PROG --config configs/lens_3p8b_finetune.py --workdir /data/runs/ft --backend gpu
  $PROG --workdir /tmp/lens_2x4 --processes 2 --devices-per-process 4 -- --config.num_steps=20
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
PROCESSES=1
DEVICES_PER_PROCESS=""
MODULE=""
STOP_GRACE=10

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
    --processes) needs_value "$1" $# "${2:-}"; positive_int "$1" "$2"; PROCESSES=$2; shift 2 ;;
    --devices-per-process) needs_value "$1" $# "${2:-}"; positive_int "$1" "$2"
      DEVICES_PER_PROCESS=$2; shift 2 ;;
    --module) needs_value "$1" $# "${2:-}"; MODULE=$2; shift 2 ;;
    --stop-grace) needs_value "$1" $# "${2:-}"; nonnegative_int "$1" "$2"; STOP_GRACE=$2; shift 2 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done

required "$WORKDIR" --workdir
if [[ -n $DEVICES_PER_PROCESS ]]; then
  [[ $BACKEND == auto || $BACKEND == cpu ]] || die "--devices-per-process needs --backend cpu"
  BACKEND=cpu
fi
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
if [[ -n $DEVICES_PER_PROCESS ]]; then
  ENV_ARGS+=("XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
fi
ENV_ARGS+=("${ENVS[@]+"${ENVS[@]}"}")
if [[ -n $MODULE ]]; then
  PROGRAM=("$VENV/bin/python" -m "$MODULE")
else
  PROGRAM=("$VENV/bin/lens-train")
fi
COMMAND=("${PROGRAM[@]}" --config "$CONFIG_PATH" --workdir "$WORKDIR")
cd "$REPO_ROOT"

if [[ $PROCESSES == 1 ]]; then
  COMMAND+=("${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
  if [[ ${#ENV_ARGS[@]} -gt 0 ]]; then
    run env "${ENV_ARGS[@]}" "${COMMAND[@]}"
  else
    run "${COMMAND[@]}"
  fi
  exit 0
fi

# --- several processes: one per "host", joined by jax.distributed on 127.0.0.1
if [[ $DRY_RUN == 1 ]]; then
  PORT=PORT
else
  PORT=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
PIDS=()
stop_all() {  # stop_all SIGNAL: signal every process still running
  local pid
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
    kill -"$1" "$pid" 2>/dev/null || true
  done
}
# shellcheck disable=SC2329  # called by the traps below
on_signal() {
  echo "[local.sh] $1: passing it to every process"
  stop_all TERM
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
for ((i = 0; i < PROCESSES; i++)); do
  ARGS=("${COMMAND[@]}" --config.distributed=yes --config.coordinator_address="127.0.0.1:$PORT"
        --config.num_processes="$PROCESSES" --config.process_id="$i"
        "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
  printf '+ [%d] %s &\n' "$i" "$(quote_all env "${ENV_ARGS[@]}" "${ARGS[@]}")"
  if [[ $DRY_RUN == 1 ]]; then
    continue
  fi
  env "${ENV_ARGS[@]}" "${ARGS[@]}" > >(sed -u "s/^/[$i] /") 2>&1 &
  PIDS+=("$!")
  echo "[local.sh] process $i: pid $!"
done
[[ $DRY_RUN == 0 ]] || exit 0

STATUS=0
REMAINING=${#PIDS[@]}
while [[ $REMAINING -gt 0 ]]; do
  DONE_PID=""
  CODE=0
  wait -n -p DONE_PID "${PIDS[@]}" || CODE=$?
  if [[ -z $DONE_PID ]]; then
    continue  # interrupted by a trapped signal; keep waiting
  fi
  REMAINING=$((REMAINING - 1))
  NEW_PIDS=()
  for pid in "${PIDS[@]}"; do
    [[ $pid == "$DONE_PID" ]] || NEW_PIDS+=("$pid")
  done
  PIDS=("${NEW_PIDS[@]+"${NEW_PIDS[@]}"}")
  if [[ $CODE != 0 && $STATUS == 0 ]]; then
    STATUS=$CODE
    echo "[local.sh] pid $DONE_PID exited with status $CODE: stopping the others"
    stop_all TERM
    for ((t = 0; t < STOP_GRACE * 10; t++)); do
      ALIVE=0
      for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
        kill -0 "$pid" 2>/dev/null && ALIVE=1
      done
      [[ $ALIVE == 1 ]] || break
      sleep 0.1
    done
    stop_all KILL
  fi
done
wait  # the log prefixers
exit "$STATUS"
