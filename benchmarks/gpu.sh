#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run, each part under its own time limit (~9 min):
#   bash benchmarks/gpu.sh OUT_DIR DATA_DIR
# OUT_DIR gets one log per part (and the same on stdout); DATA_DIR holds synthetic-shapes records
# for the loop benchmark: DATA_DIR/tiny_data (`lens-data synth-shapes --num 400 --base-size 64`)
# and DATA_DIR/demo_data (`--num 400 --base-size 96 --groups 512`). Needs a CUDA jax and torch, and
# lens_jax installed (`pip install -e .`: configs/demo.py imports lens_jax.configs).
# Figures of the 2026-12-04 run (H200): docs/benchmarks.md "GPU", benchmarks/results/gpu_2026-12-04/.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR DATA_DIR}
data=${2:?usage: bash benchmarks/gpu.sh OUT_DIR DATA_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# JAX and torch share the GPU in the comparisons: JAX takes half of it, not its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $* (limit ${limit} s, start $(date -u +%H:%M:%S))"
  timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit $? at $(date -u +%H:%M:%S)"
  grep -v "^ *[0-9]*%|\|it/s\]$" "$out/$name.log" | tail -n 45
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"

part attention 90 python3 benchmarks/attention_gpu.py
part denoiser_full 240 python3 benchmarks/denoiser.py --preset full --dtype bfloat16 --device cuda \
  --rounds 2 --repeats 3
part denoiser_mid_wide 80 python3 benchmarks/denoiser.py --preset mid wide --dtype bfloat16 float32 \
  --device cuda --rounds 2 --repeats 5
part train_loop_tiny 45 python3 benchmarks/train_loop.py --data "$data/tiny_data" --config tiny --steps 150
part train_loop_demo 45 python3 benchmarks/train_loop.py --data "$data/demo_data" --config demo --steps 150
for layers in 4 8; do
  part train_step_$layers 60 python3 benchmarks/train_step.py --layers $layers --heads 24 --head-dim 64 \
    --rows 4 --grid 32 --images-per-row 4 --text 128 --dtype bfloat16 --steps 10
done
