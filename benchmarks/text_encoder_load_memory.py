"""Peak host memory of ``load_text_encoder`` on a full-size (random) GPT-OSS-20B checkpoint.

Writes a random checkpoint with the gpt-oss-20b tensor names, shapes and dtypes (MXFP4 experts,
bf16 elsewhere, ~13 GB at ``--fraction 1``; sharded like the real one) into a temporary folder,
then loads it in a fresh subprocess and reports that process's peak RSS. On the CPU backend the
loaded "device" arrays live in host memory too, so the loader's transient overhead is
``peak RSS - RSS after imports - bytes of the loaded arrays``; the target is
``overhead < largest shard file + 2 GB``. The checkpoint is deleted afterwards unless ``--keep``.

    python benchmarks/text_encoder_load_memory.py            # full size (needs ~14 GB of disk)
    python benchmarks/text_encoder_load_memory.py --fraction 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9


def generate(folder: Path, fraction: float, shard_bytes: int, seed: int = 0) -> None:
    """Random gpt-oss-20b checkpoint: ``round(24 * fraction)`` layers, real per-tensor shapes."""
    import ml_dtypes
    import numpy as np
    from tqdm import tqdm

    from lens_jax.checkpoints.safetensors_io import ShardedWriter, write_json
    from lens_jax.checkpoints.text_encoder import text_encoder_mappings
    from lens_jax.models.text_encoder import GptOssConfig

    num_layers = max(1, round(24 * fraction))
    config = GptOssConfig(num_hidden_layers=num_layers)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    hf = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "num_hidden_layers": num_layers,
          "hidden_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
          "intermediate_size": 2880, "num_local_experts": 32, "num_experts_per_tok": 4,
          "vocab_size": 201088, "sliding_window": 128, "rms_norm_eps": 1e-5, "swiglu_limit": 7.0,
          "attention_bias": True, "pad_token_id": 199999, "eos_token_id": 200002,
          "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000, "factor": 32.0,
                              "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                              "beta_slow": 1.0, "truncate": False},
          "quantization_config": {"quant_method": "mxfp4"}}
    write_json(folder / "config.json", hf)
    mappings = text_encoder_mappings(config, num_layers, packed=True)
    extra = [("model.norm.weight", (2880,)), ("lm_head.weight", (201088, 2880))]
    writer = ShardedWriter(folder, "model", max_shard_bytes=shard_bytes)
    items = [(m.key, m.torch_shape) for m in mappings] + extra
    for key, shape in tqdm(items, desc="writing random checkpoint", unit="tensor"):
        if key.endswith("_blocks"):
            array = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif key.endswith("_scales"):
            array = rng.integers(118, 124, size=shape, dtype=np.uint8)
        else:
            array = rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)
        writer.add(key, array)
        del array
    writer.finish()


def measure(folder: Path, mxfp4: bool) -> dict:
    """Runs in the child process: load, then report memory figures as JSON."""
    import resource
    import threading

    import psutil

    import jax
    import jax.numpy as jnp

    from lens_jax.checkpoints.text_encoder import load_text_encoder

    jax.devices()
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    samples = {"peak": baseline}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples["peak"] = max(samples["peak"], proc.memory_info().rss)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    layers = tuple(i for i in (5, 11, 17, 23) if i < json.loads((folder / "config.json").read_text())[
        "num_hidden_layers"]) or (0,)
    encoder = load_text_encoder(folder, layers=layers, dtype=jnp.bfloat16, mxfp4=mxfp4, progress=False)
    params = jax.tree_util.tree_leaves(encoder.params())
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    peak_kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    loaded = sum(p.nbytes for p in params)
    peak = max(samples["peak"], peak_kernel)
    return {"baseline_rss": baseline, "peak_rss": peak, "loaded_bytes": loaded,
            "overhead": peak - baseline - loaded, "seconds": seconds, "layers": list(layers)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="fraction of the 24 layers to generate (1.0 = full size, ~13 GB)")
    parser.add_argument("--shard-gb", type=float, default=4.6,
                        help="max shard size in GB (gpt-oss-20b ships ~4-4.6 GB shards)")
    parser.add_argument("--dir", default=None,
                        help="where to write the temporary checkpoint (default: a temp dir under /tmp)")
    parser.add_argument("--dense", action="store_true",
                        help="load with mxfp4=False (experts dequantized at load time to bf16)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        print("RESULT " + json.dumps(measure(Path(args._child), mxfp4=not args.dense)))
        return 0

    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    need = 13.8e9 * args.fraction * 1.05
    free = shutil.disk_usage(base).free
    if free < need:
        print(f"not enough disk in {base}: {free / GB:.1f} GB free, ~{need / GB:.1f} GB needed; "
              "use a smaller --fraction", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="lens_te_mem_", dir=base))
    folder = work / "text_encoder"
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c",
                        "import sys; sys.argv = sys.argv[:1]; from pathlib import Path; "
                        "import benchmarks.text_encoder_load_memory as b; "
                        f"b.generate(Path({str(folder)!r}), {args.fraction!r}, {int(args.shard_gb * GB)!r})"],
                       check=True, cwd=Path(__file__).resolve().parents[1])
        gen_s = time.perf_counter() - t0
        shards = sorted(folder.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards)
        total = sum(p.stat().st_size for p in shards)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                    if "force_host_platform_device_count" not in f)
        child = [sys.executable, str(Path(__file__).resolve()), "--_child", str(folder)]
        if args.dense:
            child.append("--dense")
        out = subprocess.run(child, check=True, capture_output=True, text=True, env=env,
                             cwd=Path(__file__).resolve().parents[1])
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
        r = json.loads(line[len("RESULT "):])
        limit = largest + 2 * GB
        print(f"checkpoint: {len(shards)} shards, {total / GB:.2f} GB ({args.fraction:.2f} of full size, "
              f"generated in {gen_s:.0f} s), largest shard {largest / GB:.2f} GB")
        print(f"load ({'dense bf16' if args.dense else 'MXFP4 kept packed'}, layers {r['layers']}): "
              f"{r['seconds']:.1f} s")
        print("| figure | GB |\n|---|---|")
        print(f"| RSS after imports | {r['baseline_rss'] / GB:.2f} |")
        print(f"| peak RSS while loading | {r['peak_rss'] / GB:.2f} |")
        print(f"| loaded arrays (host memory on the CPU backend) | {r['loaded_bytes'] / GB:.2f} |")
        print(f"| transient overhead = peak - after imports - loaded | {r['overhead'] / GB:.2f} |")
        print(f"| limit = largest shard + 2 GB | {limit / GB:.2f} |")
        print("PASS" if r["overhead"] < limit else "FAIL", "(overhead < largest shard + 2 GB)")
        return 0 if r["overhead"] < limit else 2
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
