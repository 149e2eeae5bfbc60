#!/usr/bin/env bash
# Train lens_jax on several GPU hosts: one lens-train process per host, joined by the JAX
# distributed coordinator. SLURM (srun inside an allocation) or plain ssh to a list of hosts.
# Run with --help for the usage; --dry-run prints every command without running any.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source-path=SCRIPTDIR
source "$SCRIPT_DIR/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG (--slurm | --hosts H1,H2,... | --hostfile FILE) --workdir DIR [options]
             [-- extra lens-train flags]

One lens-train process per host, each using all of its GPUs; the processes find each other
through the JAX distributed coordinator, configured by these environment variables:
  JAX_COORDINATOR_ADDRESS  host:port of process 0 (the first host), read by
                           jax.distributed.initialize()
  JAX_NUM_PROCESSES        number of processes (= hosts)
  JAX_PROCESS_ID           this process's index, 0 .. JAX_NUM_PROCESSES-1 (host order)
Each process also gets them as trainer flags: --config.distributed=yes
--config.coordinator_address=... --config.num_processes=... --config.process_id=...
(lens-train then calls jax.distributed.initialize with them). Under SLURM they come from
SLURM_JOB_NODELIST, SLURM_NTASKS and SLURM_PROCID.

Modes:
  --slurm                 run with srun inside a SLURM allocation (salloc or an sbatch
                          script): one task per node
  --hosts H1,H2,...       ssh to these hosts (process i runs on the i-th host, H1 is the
                          coordinator); user@host works; outputs stream prefixed by host
  --hostfile FILE         the same, one host per line (# comments and blank lines skipped)

Options:
  --workdir DIR           training workdir, shared by all hosts: a shared filesystem path or
                          gs://BUCKET/PATH (required)
  --config PATH           trainer config, relative to the repository
                          (default configs/lens_3p8b_stage1_512.py)
  --port PORT             coordinator port on the first host (default 12355)
  --remote-dir DIR        repository folder on every host (default: this checkout's path,
                          i.e. a shared filesystem)
  --venv DIR              Python environment on every host, relative to --remote-dir or
                          absolute (default .venv; made with 'make venv' / pip install -e '.[gpu]')
  --nodes N               --slurm: number of nodes (default: \$SLURM_JOB_NUM_NODES)
  --gpus-per-node N       --slurm: GPUs per node requested from srun (default 8)
  --ssh-opt OPT           extra ssh option, e.g. --ssh-opt=-p2222 (repeatable)
  --env KEY=VALUE         environment variable for lens-train (repeatable), e.g.
                          --env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
  --dry-run               print every command, run none
  -h, --help              this help

Anything after -- goes to lens-train.

Examples:
  salloc -N 2 --gpus-per-node=8 $PROG --slurm --workdir /shared/runs/lens1
  $PROG --hosts gpu-a,gpu-b --workdir gs://my-bucket/runs/lens1 \\
      --config configs/lens_3p8b_stage1_512.py
EOF
}

MODE=""
HOSTS_ARG=""
HOSTFILE=""
WORKDIR=""
CONFIG="configs/lens_3p8b_stage1_512.py"
PORT=12355
REMOTE_DIR="$REPO_ROOT"
VENV=".venv"
NODES="${SLURM_JOB_NUM_NODES:-}"
GPUS_PER_NODE=8
SSH_OPTS=()
ENVS=()
DRY_RUN=0
TRAIN_ARGS=()

set_mode() {
  [[ -z $MODE || $MODE == "$1" ]] || die "--slurm, --hosts and --hostfile exclude each other"
  MODE=$1
}

split_flag_values "$@"
set -- "${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --slurm) set_mode slurm; shift ;;
    --hosts) needs_value "$1" $# "${2:-}"; set_mode hosts; HOSTS_ARG=$2; shift 2 ;;
    --hostfile) needs_value "$1" $# "${2:-}"; set_mode hostfile; HOSTFILE=$2; shift 2 ;;
    --workdir) needs_value "$1" $# "${2:-}"; WORKDIR=$2; shift 2 ;;
    --config) needs_value "$1" $# "${2:-}"; CONFIG=$2; shift 2 ;;
    --port) needs_value "$1" $# "${2:-}"; positive_int "$1" "$2"; PORT=$2; shift 2 ;;
    --remote-dir) needs_value "$1" $# "${2:-}"; REMOTE_DIR=$2; shift 2 ;;
    --venv) needs_value "$1" $# "${2:-}"; VENV=$2; shift 2 ;;
    --nodes) needs_value "$1" $# "${2:-}"; positive_int "$1" "$2"; NODES=$2; shift 2 ;;
    --gpus-per-node) needs_value "$1" $# "${2:-}"; positive_int "$1" "$2"; GPUS_PER_NODE=$2; shift 2 ;;
    --ssh-opt) needs_value "$1" $# "${2:-}"; SSH_OPTS+=("$2"); shift 2 ;;
    --env) needs_value "$1" $# "${2:-}"; env_assignment "$1" "$2"; ENVS+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done

required "$MODE" "one of --slurm, --hosts or --hostfile"
required "$WORKDIR" "--workdir (a folder every host can write: shared filesystem or gs://)"
[[ -f $REPO_ROOT/$CONFIG ]] || die "--config $CONFIG: no such file in $REPO_ROOT"
(( PORT <= 65535 )) || die "--port must be at most 65535, got $PORT"

HOSTS=()
case $MODE in
  hosts)
    IFS=, read -r -a HOSTS <<<"$HOSTS_ARG" ;;
  hostfile)
    [[ -f $HOSTFILE ]] || die "--hostfile $HOSTFILE: no such file"
    while IFS= read -r line || [[ -n $line ]]; do
      line=${line%%#*}
      line=${line//[[:space:]]/}
      if [[ -n $line ]]; then
        HOSTS+=("$line")
      fi
    done <"$HOSTFILE" ;;
  slurm)
    required "$NODES" "--nodes (or run inside a SLURM allocation, which sets SLURM_JOB_NUM_NODES)"
    positive_int --nodes "$NODES" ;;
esac
if [[ $MODE != slurm ]]; then
  [[ ${#HOSTS[@]} -ge 1 ]] || die "no hosts given"
  for host in "${HOSTS[@]}"; do
    [[ $host =~ ^[A-Za-z0-9_.@:-]+$ ]] || die "bad host name '$host'"
  done
fi

VENV_PATH=$VENV
if [[ $VENV_PATH != /* ]]; then
  VENV_PATH="$REMOTE_DIR/$VENV"
fi

# The command one process runs: exports the JAX_* variables ($1, shell text), then runs
# lens-train with the same values as trainer flags (config.distributed, coordinator_address,
# num_processes, process_id; $2, shell text) and the user's flags.
process_command() {
  local exports=$1 distributed_flags=$2 cmd assignment
  local args=("$VENV_PATH/bin/lens-train" --config "$CONFIG" --workdir "$WORKDIR")
  cmd="cd $(quote "$REMOTE_DIR") && export $exports"
  for assignment in "${ENVS[@]+"${ENVS[@]}"}"; do
    cmd+=" && export $(quote "$assignment")"
  done
  cmd+=" && exec $(quote_all "${args[@]}") $distributed_flags"
  if [[ ${#TRAIN_ARGS[@]} -gt 0 ]]; then
    cmd+=" $(quote_all "${TRAIN_ARGS[@]}")"
  fi
  printf '%s' "$cmd"
}

# Trainer flags of the distributed set-up, from the exported variables (expanded on the host).
# shellcheck disable=SC2016  # expanded by the shell of each process
DISTRIBUTED_FLAGS='--config.distributed=yes --config.coordinator_address="$JAX_COORDINATOR_ADDRESS"'
# shellcheck disable=SC2016
DISTRIBUTED_FLAGS+=' --config.num_processes="$JAX_NUM_PROCESSES" --config.process_id="$JAX_PROCESS_ID"'

if [[ $DRY_RUN == 1 ]]; then
  echo "# dry run: commands are printed, not run"
fi

if [[ $MODE == slurm ]]; then
  # Evaluated by each task: the first node of the allocation is the coordinator.
  # shellcheck disable=SC2016  # expanded inside the srun tasks
  exports='JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)":'
  exports+="$PORT"
  # shellcheck disable=SC2016
  exports+=' JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID"'
  run srun "--nodes=$NODES" --ntasks-per-node=1 "--gpus-per-node=$GPUS_PER_NODE" \
    --kill-on-bad-exit=1 bash -c "$(process_command "$exports" "$DISTRIBUTED_FLAGS")"
  exit 0
fi

NUM=${#HOSTS[@]}
COORDINATOR="${HOSTS[0]#*@}:$PORT"
echo "# $NUM processes, coordinator $COORDINATOR"
PIDS=()
for ((i = 0; i < NUM; i++)); do
  host=${HOSTS[$i]}
  exports="JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM JAX_PROCESS_ID=$i"
  command=$(process_command "$exports" "$DISTRIBUTED_FLAGS")
  line="ssh ${SSH_OPTS[*]+$(quote_all "${SSH_OPTS[@]}") }$(quote "$host") $(quote "$command")"
  line+=" 2>&1 | sed -u $(quote "s/^/[$i $host] /")"
  printf '+ %s &\n' "$line"
  if [[ $DRY_RUN == 0 ]]; then
    bash -o pipefail -c "$line" &
    PIDS+=("$!")
  fi
done
status=0
for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
  wait "$pid" || status=1
done
exit "$status"
