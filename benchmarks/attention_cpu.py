# CPU attention, one process, the implementations alternating:
#   python benchmarks/attention_cpu.py                  # mid and wide shapes, float32 and bfloat16
#   python benchmarks/attention_cpu.py --shape mid --dtype float32 --query-chunk 64 128 256
"""Times the CPU attention paths of ``lens_jax.models.attention`` against PyTorch's (issue 14).

- ``xla``: ``xla_attention``, the whole ``[B, H, N, N]`` float32 softmax at once.
- ``chunked``: ``chunked_attention``, the same arithmetic in blocks of ``--query-chunk`` queries
  (the CPU default, ``attention="auto"``).
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask, as the
  PyTorch reference (``tests/reference/lens_torch.py``) calls it, on ``[B, H, N, D]`` tensors.

Shapes are one block's attention in ``benchmarks/denoiser.py``: ``mid`` (batch 2, 8 heads) and
``wide`` (batch 1, 24 heads), 1024 image + 128 caption tokens, head dim 64, the last row's last 64
caption tokens padding. Forward and forward+backward (the gradients of a weighted sum), median of
``--repeats`` calls after a warm-up, each implementation in turn within a round. ``chunked`` is
checked against ``xla`` on the same inputs first (max relative error over output and gradients).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lens_jax.models import attention as attention_lib  # noqa: E402
from tests.conftest import max_rel_err  # noqa: E402

SHAPES = {"mid": (2, 8), "wide": (1, 24)}  # batch, heads
N_IMG, N_TXT, HEAD_DIM, PAD = 1024, 128, 64, 64


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def inputs(batch: int, heads: int, seed: int = 0):
    g = np.random.default_rng(seed)
    n = N_IMG + N_TXT
    q, k, v, d_out = (g.standard_normal((batch, n, heads, HEAD_DIM)).astype(np.float32) for _ in range(4))
    segments = np.ones((batch, n), np.int32)
    segments[-1, n - PAD:] = 0
    return q, k, v, d_out, segments


def jax_fns(fn, segments, dtype):
    seg = jnp.asarray(segments)
    forward = jax.jit(lambda q, k, v: fn(q, k, v, seg))
    backward = jax.jit(lambda q, k, v, d: jax.vjp(lambda *a: fn(*a, seg), q, k, v)[1](d.astype(dtype)))
    return forward, backward


def torch_fns(q, k, v, d_out, segments, dtype):
    to = lambda a: torch.from_numpy(a).to(getattr(torch, dtype)).transpose(1, 2).contiguous()
    tq, tk, tv, td = (to(a) for a in (q, k, v, d_out))
    seg = torch.from_numpy(segments)
    mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))[:, None]
    scale = HEAD_DIM ** -0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward():
        with torch.no_grad():
            sdpa(tq, tk, tv, attn_mask=mask, scale=scale)

    leaves = [t.clone().requires_grad_() for t in (tq, tk, tv)]

    def forward_backward():
        sdpa(*leaves, attn_mask=mask, scale=scale).backward(td)

    return forward, forward_backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["mid", "wide"])
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--query-chunk", nargs="+", type=int, default=[128],
                        help="queries per block of chunked_attention (one column each)")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per case")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation per round")
    args = parser.parse_args()
    print(f"CPU attention, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); milliseconds per call")
    print("| shape | dtype | pass | round | torch | xla | " +
          " | ".join(f"chunked {c}" for c in args.query_chunk) + " | torch / best chunked |")
    for shape in args.shape:
        q, k, v, d_out, segments = inputs(*SHAPES[shape])
        for dtype in args.dtype:
            jq, jk, jv, jd = (jnp.asarray(a, dtype) for a in (q, k, v, d_out))
            impls = {"xla": jax_fns(attention_lib.xla_attention, segments, dtype)}
            for c in args.query_chunk:
                impls[f"chunked {c}"] = jax_fns(
                    lambda a, b, e, s, c=c: attention_lib.chunked_attention(a, b, e, s, c), segments, dtype)
            reference = (impls["xla"][0](jq, jk, jv),) + tuple(impls["xla"][1](jq, jk, jv, jd))
            for name, (fwd, bwd) in impls.items():
                if name != "xla":
                    got = (fwd(jq, jk, jv),) + tuple(bwd(jq, jk, jv, jd))
                    err = max(max_rel_err(np.asarray(a, np.float32), np.asarray(b, np.float32))
                              for a, b in zip(got, reference))
                    print(f"  {shape} {dtype} {name} vs xla: max relative error {err:.2e} (output, dq, dk, dv)")
            t_fwd, t_fb = torch_fns(q, k, v, d_out, segments, dtype)
            for pass_index, pass_name in enumerate(("forward", "forward+backward")):
                for r in range(args.rounds):
                    ms = {"torch": median_ms(t_fwd if pass_index == 0 else t_fb, args.repeats)}
                    for name, fns in impls.items():
                        call = ((lambda f=fns[0]: jax.block_until_ready(f(jq, jk, jv))) if pass_index == 0
                                else (lambda f=fns[1]: jax.block_until_ready(f(jq, jk, jv, jd))))
                        ms[name] = median_ms(call, args.repeats)
                    best = min(ms[f"chunked {c}"] for c in args.query_chunk)
                    print(f"| {shape} | {dtype} | {pass_name} | {r + 1} | " +
                          " | ".join(f"{ms[k_]:.1f}" for k_ in ms) + f" | {ms['torch'] / best:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
