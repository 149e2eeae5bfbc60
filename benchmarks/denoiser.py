# Denoiser speed, JAX vs the PyTorch reference reading of the spec, same machine, one run:
#   python benchmarks/denoiser.py                      # CPU: mid-size (4 blocks, width 512)
#   python benchmarks/denoiser.py --preset full --dtype bfloat16 --device cuda   # GPU: full model
"""Times forward and forward+backward of the Lens denoiser in JAX and in PyTorch; prints a table.

The PyTorch side is ``tests/reference/lens_torch.py`` (diffusers key names, SDPA attention, which
picks its fastest kernel on GPU). Both get the same random weights. Times are medians of
``--repeats`` runs after warm-up (JAX compile time is reported apart).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from lens_jax.convert.keymap import load_params  # noqa: E402,F401  (documents the shared path)
from lens_jax.convert.transformer import model_from_params, transformer_mappings  # noqa: E402
from lens_jax.models.config import transformer_config  # noqa: E402
from tests.reference.checkpoints import reference_from_config  # noqa: E402

PRESETS = {
    # 4 blocks of width 512 (8 x 64 heads), 32x32 latent grid = 1024 image tokens, 128 text tokens
    "mid": dict(model=dict(num_layers=4, num_attention_heads=8), hw=(32, 32), txt=128, batch=2),
    # the released model at 1024x1024: 4096 image tokens + 415 text tokens
    "full": dict(model=dict(), hw=(64, 64), txt=415, batch=1),
}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mid", help="model and input size")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype of both implementations")
    parser.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--remat", default="none", help="JAX remat policy for forward+backward")
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    cfg = transformer_config(**preset["model"], param_dtype=args.dtype, dtype=args.dtype, remat=args.remat)
    b, (h, w), n_txt = preset["batch"], preset["hw"], preset["txt"]
    tdtype = getattr(torch, args.dtype)

    ref = reference_from_config(cfg, seed=0).to(args.device, tdtype)
    mappings = transformer_mappings(cfg)
    state = {k: v.detach().float().cpu().numpy() for k, v in ref.state_dict().items()}
    params: dict = {}
    for m in mappings:  # the converter's key map, from the in-memory state dict
        array = m.to_jax(state[m.key])
        if m.index is None:
            params[m.path] = array
        else:
            params.setdefault(m.path, []).append(array)
    params = {p: (np.stack(v) if isinstance(v, list) else v).astype(jnp.dtype(args.dtype))
              for p, v in params.items()}
    model = model_from_params(cfg, params)

    g = np.random.default_rng(0)
    latents = g.standard_normal((b, h * w, 128)).astype(np.float32)
    feats = [g.standard_normal((b, n_txt, cfg.enc_hidden_dim)).astype(np.float32)
             for _ in cfg.selected_layer_index]
    sigmas = g.uniform(0.1, 1.0, (b,)).astype(np.float32)
    mask = np.ones((b, n_txt), bool)
    mask[-1, n_txt // 2:] = False

    jx = [jnp.asarray(latents, args.dtype), [jnp.asarray(f, args.dtype) for f in feats],
          jnp.asarray(sigmas), jnp.asarray(mask)]
    graphdef, jstate = nnx.split(model)

    @jax.jit
    def jax_fwd(state, lat, fts, t, m):
        return nnx.merge(graphdef, state)(lat, fts, t, (h, w), m)

    @jax.jit
    def jax_fwd_bwd(state, lat, fts, t, m):
        return jax.grad(lambda s: jnp.mean(
            nnx.merge(graphdef, s)(lat, fts, t, (h, w), m).astype(jnp.float32) ** 2))(state)

    results = {}
    for name, fn in (("forward", jax_fwd), ("forward+backward", jax_fwd_bwd)):
        start = time.perf_counter()
        compiled = fn.lower(jstate, *jx).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(jstate, *jx))
        results[(name, "jax")] = median_time(lambda: jax.block_until_ready(compiled(jstate, *jx)),
                                             args.repeats)
        results[(name, "compile")] = compile_s

    tx = [torch.from_numpy(latents).to(args.device, tdtype),
          [torch.from_numpy(f).to(args.device, tdtype) for f in feats],
          torch.from_numpy(mask).to(args.device), torch.from_numpy(sigmas).to(args.device, tdtype)]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def torch_fwd():
        with torch.no_grad():
            ref(tx[0], tx[1], tx[2], tx[3], (h, w))
        sync()

    def torch_fwd_bwd():
        ref.zero_grad(set_to_none=True)
        ref(tx[0], tx[1], tx[2], tx[3], (h, w)).float().pow(2).mean().backward()
        sync()

    for name, fn in (("forward", torch_fwd), ("forward+backward", torch_fwd_bwd)):
        fn()
        results[(name, "torch")] = median_time(fn, args.repeats)

    print(f"\nLens denoiser, preset {args.preset}: {cfg.num_layers} blocks, width "
          f"{cfg.num_attention_heads * cfg.attention_head_dim}, batch {b}, {h * w} image + {n_txt} "
          f"text tokens, {args.dtype}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({args.device}, {torch.get_num_threads()} threads)\n")
    print(f"| pass | JAX (s) | PyTorch (s) | PyTorch / JAX | JAX compile (s) |")
    print(f"|---|---|---|---|---|")
    for name in ("forward", "forward+backward"):
        j, t = results[(name, "jax")], results[(name, "torch")]
        print(f"| {name} | {j:.4f} | {t:.4f} | {t / j:.2f}x | {results[(name, 'compile')]:.1f} |")


if __name__ == "__main__":
    main()
