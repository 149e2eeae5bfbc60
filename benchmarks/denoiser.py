# Denoiser speed, JAX vs the PyTorch reference reading of the spec, same machine, one process:
#   python benchmarks/denoiser.py              # CPU: presets mid and wide, float32 and bfloat16, 2 rounds
#   python benchmarks/denoiser.py --preset mid --dtype float32 --rounds 1      # one quick comparison
#   python benchmarks/denoiser.py --preset full --dtype bfloat16 --device cuda  # GPU: full model
"""Times forward and forward+backward of the Lens denoiser in JAX and in PyTorch; prints a table.

The PyTorch side is ``tests/reference/lens_torch.py`` (diffusers key names, SDPA attention, which
picks its fastest kernel). Both get the same random weights and inputs. JAX and PyTorch runs
alternate (JAX, PyTorch, JAX, ...) so that load from other processes falls on both alike; each
comparison is measured ``--rounds`` times and every round gets its own row, so a noisy machine shows
as rounds that disagree. Times are medians of ``--repeats`` runs per round after one warm-up run
(JAX compile time is reported apart). ``PyTorch / JAX`` above 1 means JAX is faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from lens_jax.checkpoints.transformer import model_from_params, transformer_mappings  # noqa: E402
from lens_jax.models.config import transformer_config  # noqa: E402
from tests.reference.checkpoints import reference_from_config  # noqa: E402

PRESETS = {
    # 4 blocks of width 512 (8 x 64 heads), 32x32 latent grid = 1024 image tokens, 128 text tokens
    "mid": dict(model=dict(num_layers=4, num_attention_heads=8), hw=(32, 32), txt=128, batch=2),
    # 2 blocks of the released width 1536 (24 x 64 heads): the real block's matmul shapes
    "wide": dict(model=dict(num_layers=2), hw=(32, 32), txt=128, batch=1),
    # the released model at 1024x1024: 4096 image tokens + 415 text tokens
    "full": dict(model=dict(), hw=(64, 64), txt=415, batch=1),
}
PASSES = ("forward", "forward+backward")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build(preset_name: str, dtype: str, device: str, remat: str):
    """Both models with the same weights and inputs; returns ``{pass: (jax_fn, torch_fn)}``, compile s."""
    preset = PRESETS[preset_name]
    cfg = transformer_config(**preset["model"], param_dtype=dtype, dtype=dtype, remat=remat)
    b, (h, w), n_txt = preset["batch"], preset["hw"], preset["txt"]
    tdtype = getattr(torch, dtype)

    ref = reference_from_config(cfg, seed=0).to(device, tdtype)
    state = {k: v.detach().float().cpu().numpy() for k, v in ref.state_dict().items()}
    params: dict = {}
    for m in transformer_mappings(cfg):  # the converter's key map, from the in-memory state dict
        array = m.to_jax(state[m.key])
        if m.index is None:
            params[m.path] = array
        else:
            params.setdefault(m.path, []).append(array)
    params = {p: (np.stack(v) if isinstance(v, list) else v).astype(jnp.dtype(dtype))
              for p, v in params.items()}
    model = model_from_params(cfg, params)

    g = np.random.default_rng(0)
    latents = g.standard_normal((b, h * w, 128)).astype(np.float32)
    feats = [g.standard_normal((b, n_txt, cfg.enc_hidden_dim)).astype(np.float32)
             for _ in cfg.selected_layer_index]
    sigmas = g.uniform(0.1, 1.0, (b,)).astype(np.float32)
    mask = np.ones((b, n_txt), bool)
    mask[-1, n_txt // 2:] = False

    jx = [jnp.asarray(latents, dtype), [jnp.asarray(f, dtype) for f in feats],
          jnp.asarray(sigmas), jnp.asarray(mask)]
    graphdef, jstate = nnx.split(model)

    def jax_fwd(state, lat, fts, t, m):
        return nnx.merge(graphdef, state)(lat, fts, t, (h, w), m)

    def jax_fwd_bwd(state, lat, fts, t, m):
        return jax.grad(lambda s: jnp.mean(jax_fwd(s, lat, fts, t, m).astype(jnp.float32) ** 2))(state)

    tx = [torch.from_numpy(latents).to(device, tdtype),
          [torch.from_numpy(f).to(device, tdtype) for f in feats],
          torch.from_numpy(mask).to(device), torch.from_numpy(sigmas).to(device, tdtype)]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def torch_fwd():
        with torch.no_grad():
            ref(tx[0], tx[1], tx[2], tx[3], (h, w))
        sync()

    def torch_fwd_bwd():
        ref.zero_grad(set_to_none=True)
        ref(tx[0], tx[1], tx[2], tx[3], (h, w)).float().pow(2).mean().backward()
        sync()

    fns, compile_s = {}, {}
    for name, jfn, tfn in (("forward", jax_fwd, torch_fwd), ("forward+backward", jax_fwd_bwd, torch_fwd_bwd)):
        start = time.perf_counter()
        compiled = jax.jit(jfn).lower(jstate, *jx).compile()
        compile_s[name] = time.perf_counter() - start
        run_jax = (lambda c: lambda: jax.block_until_ready(c(jstate, *jx)))(compiled)
        run_jax(), tfn()  # warm-up
        fns[name] = (run_jax, tfn)
    title = (f"{preset_name}: {cfg.num_layers} blocks, width {cfg.num_attention_heads * cfg.attention_head_dim}, "
             f"batch {b}, {h * w} image + {n_txt} text tokens")
    return fns, compile_s, title


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["mid", "wide"],
                        help="model and input sizes (default: mid wide)")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"],
                        default=["float32", "bfloat16"], help="compute dtypes of both implementations")
    parser.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    parser.add_argument("--rounds", type=int, default=2, help="independent measurements per comparison")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation per round")
    parser.add_argument("--remat", default="none", help="JAX remat policy (the benchmark default: none)")
    args = parser.parse_args()
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")

    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for preset_name in args.preset:
        for dtype in args.dtype:
            fns, compile_s, title = build(preset_name, dtype, args.device, args.remat)
            for r in range(args.rounds):
                for name in PASSES:
                    run_jax, run_torch = fns[name]
                    tj, tt = [], []
                    for _ in range(args.repeats):  # alternate, so both see the same background load
                        tj.append(timed(run_jax))
                        tt.append(timed(run_torch))
                    j, t = statistics.median(tj), statistics.median(tt)
                    rows.append((title, dtype, name, r + 1, j, t, compile_s[name]))
                    print(f"  {preset_name} {dtype} {name} round {r + 1}: JAX {j:.3f} s, PyTorch {t:.3f} s",
                          file=sys.stderr, flush=True)

    print(f"\nLens denoiser forward and forward+backward, JAX vs the PyTorch reference "
          f"(tests/reference/lens_torch.py), same weights and inputs, one process, {started}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end; jax {jax.__version__} ({jax.default_backend()}), torch "
          f"{torch.__version__} ({args.device}, {torch.get_num_threads()} threads); remat {args.remat}")
    print(f"each time: median of {args.repeats} runs, JAX and PyTorch runs alternating; "
          f"PyTorch / JAX > 1 means JAX is faster\n")
    print("| preset | dtype | pass | round | JAX (s) | PyTorch (s) | PyTorch / JAX | JAX compile (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for title, dtype, name, r, j, t, c in rows:
        print(f"| {title} | {dtype} | {name} | {r} | {j:.3f} | {t:.3f} | {t / j:.2f}x | {c:.1f} |")


if __name__ == "__main__":
    main()
