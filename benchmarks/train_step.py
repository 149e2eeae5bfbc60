"""Training-step benchmark: step time, tokens/s, analytic model TFLOP/s and MFU.

    .venv/bin/python benchmarks/train_step.py [--layers 4 --heads 4 --head-dim 64 --rows 4 ...] [--json out.json]

A mid-size denoiser (default: 4 blocks, width 256) on synthetic packed rows (2 images of 12x12
latent tokens + 48 caption tokens each per row), the real jitted train step (stand-in encoders,
AdamW, EMA). Model FLOPs are counted analytically (lens_jax.train.metrics.StepFlops,
docs/training.md); the "peak" on CPU is the measured float32 matmul rate of this machine (no
published peak), on accelerators the device table, unless --peak-tflops is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def synthetic_batch(rows: int, h: int, w: int, n_txt: int, per_row: int, channels: int, seed: int = 0) -> dict:
    from lens_jax.models.positions import image_positions, text_positions

    rng = np.random.default_rng(seed)
    k, n_img, n_text = per_row, per_row * h * w, per_row * n_txt
    b = {
        "image_patches": rng.uniform(-1, 1, (rows, n_img, 768)).astype(np.float32),
        "image_segment_ids": np.repeat(np.arange(1, k + 1), h * w)[None].repeat(rows, 0).astype(np.int32),
        "image_positions": np.tile(image_positions(h, w), (k, 1))[None].repeat(rows, 0),
        "text_segment_ids": np.repeat(np.arange(1, k + 1), n_txt)[None].repeat(rows, 0).astype(np.int32),
        "text_positions": np.tile(text_positions(h, w, n_txt), (k, 1))[None].repeat(rows, 0),
        "text_index": np.stack([np.repeat(np.arange(k), n_txt), np.tile(np.arange(n_txt), k)], -1)[None]
        .repeat(rows, 0).astype(np.int32),
        "caption_ids": rng.integers(0, 256, (rows, k, n_txt)).astype(np.int32),
        "caption_mask": np.ones((rows, k, n_txt), bool),
        "segment_valid": np.ones((rows, k), bool),
        "latent_hw": np.tile([h, w], (rows, k, 1)).astype(np.int32),
        "token_offset": (np.arange(k) * h * w)[None].repeat(rows, 0).astype(np.int32),
        "num_image_tokens": np.full((rows, k), h * w, np.int32),
        "text_offset": (np.arange(k) * n_txt)[None].repeat(rows, 0).astype(np.int32),
        "text_length": np.full((rows, k), n_txt, np.int32),
    }
    del channels
    return b


def matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n matmul on the first device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--grid", type=int, default=12, help="latent grid side of each image (tokens = grid^2)")
    p.add_argument("--images-per-row", type=int, default=2)
    p.add_argument("--text", type=int, default=48, help="caption tokens per image")
    p.add_argument("--dtype", default="float32", help="compute dtype (param dtype is float32)")
    p.add_argument("--remat", default="none")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--json", default="")
    args = p.parse_args()

    from configs import tiny
    from lens_jax.train.metrics import StepFlops, device_peak_flops
    from lens_jax.train.trainer import Trainer

    config = tiny.get_config()
    hd = args.head_dim
    third = (hd // 3) // 2 * 2
    config.model = tiny.get_model_config(num_layers=args.layers, num_attention_heads=args.heads,
                                         attention_head_dim=hd, axes_dims_rope=(hd - 2 * third, third, third),
                                         enc_hidden_dim=256, dtype=args.dtype, remat=args.remat,
                                         zero_init_modulation=False)
    config.data.path = "unused"
    config.logging.progress = False
    trainer = Trainer(config)
    host = synthetic_batch(args.rows, args.grid, args.grid, args.text, args.images_per_row,
                           config.model.in_channels)
    batch = trainer.put_batch(host)
    state = trainer.init_state()
    t = time.perf_counter()
    compiled = trainer.step_fn(batch).lower(state, batch, trainer.frozen).compile()
    compile_s = time.perf_counter() - t
    state, m = compiled(state, batch, trainer.frozen)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch, trainer.frozen)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    m = jax.device_get(m)
    flops = StepFlops(config.model).train_flops(m["image_tokens"], m["text_tokens"], m["images"],
                                                m["attention_pairs"])
    device = jax.devices()[0]
    if args.peak_tflops > 0:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    elif device_peak_flops(device) > 0:
        peak, peak_source = device_peak_flops(device), f"table ({device.device_kind})"
    else:
        peak, peak_source = matmul_peak(), "measured float32 2048^2 matmul on this CPU"
    tokens = float(m["image_tokens"] + m["text_tokens"])
    result = {
        "device": f"{device.platform}: {device.device_kind}", "devices": 1,
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"]))),
        "layers": args.layers, "width": args.heads * hd, "rows": args.rows,
        "tokens_per_step": tokens, "images_per_step": float(m["images"]),
        "compile_s": round(compile_s, 2), "step_s_median": round(step_s, 4),
        "step_s_all": [round(x, 4) for x in times],
        "tokens_per_s": round(tokens / step_s, 1), "images_per_s": round(float(m["images"]) / step_s, 2),
        "model_tflop_per_step": flops / 1e12, "tflops_per_device": flops / step_s / 1e12,
        "peak_tflops": peak / 1e12, "peak_source": peak_source, "mfu": flops / step_s / peak,
    }
    for k, v in result.items():
        print(f"{k:>22}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
