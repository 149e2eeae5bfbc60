# The dense layers' matmuls alone, XLA:CPU against PyTorch, one process:
#   python benchmarks/matmul_cpu.py            # the mid preset's shapes, float32
#   python benchmarks/matmul_cpu.py --tokens 1024 --width 1536 --hidden 4096
"""Times the matmuls of one dense layer's forward and backward pass, jitted JAX against PyTorch
(issue 14: is XLA:CPU's GEMM the reason a training step is slower than the reference's?).

The layer is ``y = x @ w`` with ``x [tokens, width]`` and ``w [width, hidden]``; its backward pass
is ``dx = g @ w^T`` and ``dw = x^T g``, where ``dw`` is timed in the three forms XLA may get it:
from a kept ``x^T`` (``models/cpu_matmul.py``, a plain dot), as autodiff writes it (a contraction
over the token axis of both operands), and transposed (``dw^T = g^T x``). Float32 or bfloat16
operands; the median of ``--repeats`` calls after a warm-up, JAX and PyTorch alternating per shape.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

import jax
import jax.numpy as jnp
import numpy as np
import torch

from attention_cpu import median_ms  # benchmarks/ is the script's folder: on sys.path
from tests.conftest import max_rel_err  # attention_cpu put the repository root on sys.path


def contract(lhs_axis: int, rhs_axis: int):
    """The dot as the model writes it: float32 accumulation, one rounding to the operands' dtype
    (for bf16 the form XLA:CPU runs on bf16 operands, ``models/cpu_matmul.py``)."""
    dims = (((lhs_axis,), (rhs_axis,)), ((), ()))
    return lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(a.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of x (mid: batch 2 x 1024)")
    parser.add_argument("--width", type=int, default=512, help="model width (mid: 512)")
    parser.add_argument("--hidden", type=int, default=1365, help="layer output (mid's MLP: 1365)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="operand dtype (bfloat16: PyTorch's oneDNN bf16 GEMM against XLA's)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    m, k, n = args.tokens, args.width, args.hidden
    cases = [  # name, shapes of the two operands, the JAX form, the PyTorch form, FLOPs
        ("forward y = x w", (m, k), (k, n), contract(1, 0), lambda a, b: a @ b, 2 * m * k * n),
        ("dx = g w^T", (m, n), (k, n), contract(1, 1), lambda a, b: a @ b.T, 2 * m * k * n),
        ("dw = (x^T) g, x^T kept", (k, m), (m, n), contract(1, 0), lambda a, b: a @ b, 2 * m * k * n),
        ("dw = x^T g, autodiff's form", (m, k), (m, n), contract(0, 0), lambda a, b: a.T @ b, 2 * m * k * n),
        ("dw^T = g^T x", (n, m), (m, k), contract(1, 0), lambda a, b: a @ b, 2 * m * k * n),
        ("square 2048 x 2048", (2048, 2048), (2048, 2048), contract(1, 0), lambda a, b: a @ b, 2 * 2048 ** 3),
    ]
    print(f"dense-layer matmuls, {args.dtype}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, jax "
          f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"x [{m}, {k}], w [{k}, {n}]")
    print("| matmul | JAX (ms) | PyTorch (ms) | PyTorch / JAX | JAX GFLOP/s |")
    g = np.random.default_rng(0)
    for name, shape_a, shape_b, jax_form, torch_form, flops in cases:
        a, b = g.standard_normal(shape_a).astype(np.float32), g.standard_normal(shape_b).astype(np.float32)
        ja, jb = jnp.asarray(a, args.dtype), jnp.asarray(b, args.dtype)
        ta, tb = (torch.from_numpy(t).to(getattr(torch, args.dtype)) for t in (a, b))
        compiled = jax.jit(jax_form)
        got, want = np.asarray(compiled(ja, jb), np.float32), torch_form(ta, tb).float().numpy()
        err = max_rel_err(got, want)  # the same product, or it stops here
        assert err < (1e-5 if args.dtype == "float32" else 1e-2), (name, err)
        t_jax = median_ms(lambda: compiled(ja, jb).block_until_ready(), args.repeats)
        t_torch = median_ms(lambda: torch_form(ta, tb), args.repeats)
        print(f"| {name} | {t_jax:.1f} | {t_torch:.1f} | {t_torch / t_jax:.2f}x | {flops / t_jax / 1e6:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
