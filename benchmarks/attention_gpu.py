# GPU attention: correctness against xla_attention on the device, then speed, one process:
#   python benchmarks/attention_gpu.py                         # on a GPU: Lens shapes, bf16
#   python benchmarks/attention_gpu.py --interpret --tiny      # any backend: a self-check of the script
"""Checks and times the GPU attention paths of ``lens_jax.models.attention`` (issue 12, point 5).

- ``pallas``: ``pallas_gpu_attention``, the Pallas (Triton) flash kernel with segment ids, for
  packed rows (several images per row); the training default on GPU.
- ``cudnn``: ``cudnn_attention``, cuDNN flash attention through ``jax.nn.dot_product_attention``
  with sequence lengths, for rows of one image plus padding (bucketed batches, the sampler).
- ``xla``: ``xla_attention``, the reference path (an additive ``[B, 1, N, N]`` segment bias, the
  float32 softmax, its written-out backward).

Correctness: forward on valid queries and the gradients of a weighted sum over valid outputs,
each against ``xla_attention`` in float32 on the same inputs (max relative error, relative L2).
Speed: milliseconds per call (median of ``--repeats`` after a warm-up), forward and
forward+backward, at the shapes of a Lens training row: 1024x1024 (4096 image + 415 caption tokens,
one segment) and a packed row of four 512x512 images (4 x (1024 + 128) tokens), 24 heads x 64.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lens_jax.models import attention as attention_lib  # noqa: E402


def single_segment(batch: int, n_img: int, n_txt: int, pad: int) -> np.ndarray:
    """One image + caption per row, ``pad`` padding tokens after the caption: ``[B, N]``."""
    seg = np.zeros((batch, n_img + n_txt + pad), np.int32)
    seg[:, :n_img + n_txt] = 1
    return seg


def packed_segments(batch: int, n_img: int, n_txt: int, per_row: int) -> np.ndarray:
    """``per_row`` images per row, image tokens first then captions, as the data packer lays them."""
    ids = np.arange(1, per_row + 1)
    row = np.concatenate([np.repeat(ids, n_img), np.repeat(ids, n_txt)])
    return np.tile(row, (batch, 1)).astype(np.int32)


def impls(interpret: bool):
    pallas = lambda q, k, v, s: attention_lib.pallas_gpu_attention(q, k, v, s, interpret=interpret)  # noqa: E731
    cudnn = lambda q, k, v, s: attention_lib.cudnn_attention(  # noqa: E731
        q, k, v, s, implementation="xla" if interpret else "cudnn")
    return {"xla": attention_lib.xla_attention, "pallas": pallas, "cudnn": cudnn}


def errors(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    max_rel = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    rel_l2 = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return max_rel, rel_l2


def check(name, fn, seg, heads, head_dim, dtype, seed=0):
    """Forward and q/k/v gradients of ``fn`` in ``dtype`` against ``xla_attention`` in float32."""
    b, n = seg.shape
    rng = np.random.default_rng(seed)
    q, k, v, w = (rng.standard_normal((b, n, heads, head_dim)).astype(np.float32) for _ in range(4))
    valid = seg != 0
    w = w * valid[:, :, None, None]
    seg_j = jnp.asarray(seg)

    def loss(impl, dt):
        return lambda q, k, v: jnp.sum(impl(q.astype(dt), k.astype(dt), v.astype(dt), seg_j)
                                       .astype(jnp.float32) * w)

    fwd = jax.jit(lambda q, k, v: fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), seg_j))
    ref_fwd = jax.jit(lambda q, k, v: attention_lib.xla_attention(q, k, v, seg_j))
    got, ref = np.asarray(fwd(q, k, v).astype(jnp.float32)), np.asarray(ref_fwd(q, k, v))
    rows = [(name, jnp.dtype(dtype).name, "output", *errors(got[valid], ref[valid]))]
    grads = jax.jit(jax.grad(loss(fn, dtype), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(loss(attention_lib.xla_attention, jnp.float32), argnums=(0, 1, 2)))(q, k, v)
    for g_name, g, r in zip(("d_q", "d_k", "d_v"), grads, ref_grads):
        rows.append((name, jnp.dtype(dtype).name, g_name, *errors(np.asarray(g), np.asarray(r))))
    return rows


def timed_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def speed(name, fn, seg, heads, head_dim, dtype, repeats):
    b, n = seg.shape
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, heads, head_dim)), dtype) for _ in range(3))
    seg_j = jnp.asarray(seg)
    fwd = jax.jit(lambda q, k, v: fn(q, k, v, seg_j))
    bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg_j).astype(jnp.float32) ** 2),
                           argnums=(0, 1, 2)))
    return timed_ms(fwd, (q, k, v), repeats), timed_ms(bwd, (q, k, v), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="rows per call (default 4)")
    parser.add_argument("--heads", type=int, default=24, help="attention heads (Lens: 24)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension (Lens: 64)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per case (median)")
    parser.add_argument("--interpret", action="store_true",
                        help="Pallas interpret mode and cuDNN's reordering through XLA (no GPU needed)")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a self-check of this script)")
    args = parser.parse_args()
    if not args.interpret and jax.default_backend() != "gpu":
        sys.exit(f"benchmarks/attention_gpu.py: needs a GPU backend, this is {jax.default_backend()!r} "
                 "(--interpret --tiny checks the script anywhere)")

    if args.tiny:
        shapes = {"one segment": single_segment(2, 48, 12, 20), "packed x4": packed_segments(2, 16, 4, 4)}
        heads, head_dim, repeats = 2, 16, 2
    else:
        shapes = {"1024px: 4096 + 415 tokens, one segment": single_segment(args.batch, 4096, 415, 0),
                  "512px x4 packed: 4 x (1024 + 128) tokens": packed_segments(args.batch, 1024, 128, 4)}
        heads, head_dim, repeats = args.heads, args.head_dim, args.repeats
    fns = impls(args.interpret)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = jax.devices()[0]
    print(f"GPU attention paths, {started}; jax {jax.__version__}, {device.platform}: {device.device_kind}"
          f"{' (interpret mode)' if args.interpret else ''}\n")

    print("Correctness against xla_attention in float32 (valid queries; gradients of a weighted sum):\n")
    print("| path | segments | dtype | tensor | max rel err | rel L2 |")
    print("|---|---|---|---|---|---|")
    check_seg = {"one segment": single_segment(2, 200, 40, 16),
                 "packed x3": packed_segments(2, 64, 16, 3)}
    for seg_name, seg in check_seg.items():
        for name in ("pallas", "cudnn", "xla"):
            if name == "cudnn" and seg_name != "one segment":
                continue  # cuDNN's path is for one segment per row
            for dtype in (jnp.float32, jnp.bfloat16):
                if name == "cudnn" and dtype == jnp.float32 and not args.interpret:
                    continue  # cuDNN flash attention: bf16/fp16 only
                for row in check(name, fns[name], seg, 4, 64, dtype):
                    print(f"| {row[0]} | {seg_name} | {row[1]} | {row[2]} | {row[3]:.2e} | {row[4]:.2e} |",
                          flush=True)

    dtype = jnp.float32 if args.interpret else jnp.bfloat16
    print(f"\nSpeed, {jnp.dtype(dtype).name}, batch {next(iter(shapes.values())).shape[0]}, {heads} heads x "
          f"{head_dim}, ms per call (median of {repeats}):\n")
    print("| shape | path | forward (ms) | forward+backward (ms) |")
    print("|---|---|---|---|")
    for shape_name, seg in shapes.items():
        for name in ("xla", "pallas", "cudnn"):
            if name == "cudnn" and "packed" in shape_name:
                continue
            fwd_ms, bwd_ms = speed(name, fns[name], seg, heads, head_dim, dtype, repeats)
            print(f"| {shape_name} | {name} | {fwd_ms:.3f} | {bwd_ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
