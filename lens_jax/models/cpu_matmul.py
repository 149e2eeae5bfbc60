"""Dense layers on XLA:CPU with the backward pass written out: bf16 operands in bfloat16, and a
weight gradient that reads a kept ``x^T`` in both bfloat16 and float32.

bfloat16: XLA:CPU (jaxlib 0.10.2) has no dot with a bf16 result: a bf16 ``x @ w`` is rewritten into
convert-to-f32, an f32 dot and a convert back (docs/benchmarks.md). Asked for a float32 result
(``preferred_element_type``), the same dot runs on the bf16 operands themselves (its YNNPACK
kernels, which use AVX512-BF16 / AMX where the CPU has them): 4-5x faster on this project's CPU
host, and the same arithmetic (float32 accumulation, then one rounding to bf16, as the TPU's MXU
and the GPU's tensor cores do). Autodiff of that form would give float32 x bf16 dots in the
backward pass, which take the slow path again, so the backward pass is written out: ``dx = g w^T``
and ``dw = x^T g`` as bf16 x bf16 -> f32 dots.

Both dtypes: XLA:CPU's dots take a contraction over the minor axis of the left operand only. The
weight gradient contracts the token axis; left to autodiff, XLA transposes one operand for it
inside the backward pass, and where that operand is an elementwise result (SwiGLU's gate, whose
gradient is ``[tokens, mlp_hidden]``) the transpose is fused into the elementwise loop, which then
walks memory with a stride: ~16 ns an element, 45-55 ms per block of the ``mid`` benchmark
(docs/benchmarks.md, issue 14). So the forward pass keeps ``x^T`` (``[in, tokens]``, the same bytes
as ``x``, a plain transpose of an array that exists anyway) and ``dw = x^T g`` is a canonical dot;
across the layer scan's boundary XLA cannot fold that transpose back into the dot.

``dense_for_cpu(x, kernel, n_in)`` is ``tensordot(x, kernel, n_in)`` for ``x`` and ``kernel`` of one
dtype (bfloat16 or float32); ``lens_jax.models.transformer.dense`` uses it when tracing for the CPU.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

_F32 = dict(preferred_element_type=jnp.float32)


def _flat(x: jax.Array, kernel: jax.Array, n_in: int):
    """``x [..., *in] -> [M, K]`` and ``kernel [*in, *out] -> [K, N]``."""
    k = math.prod(kernel.shape[:n_in])
    return x.reshape(-1, k), kernel.reshape(k, -1)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_for_cpu(x: jax.Array, kernel: jax.Array, n_in: int = 1) -> jax.Array:
    return _forward(x, kernel, n_in)[0]


def _forward(x, kernel, n_in):
    x2, k2 = _flat(x, kernel, n_in)
    y = jnp.dot(x2, k2, **_F32).astype(x.dtype)  # [M, N]
    out_shape = x.shape[: x.ndim - n_in] + kernel.shape[n_in:]
    return y.reshape(out_shape), (jnp.transpose(x2), kernel)  # x^T [K, M]


def _backward(n_in, residuals, g):
    x_t, kernel = residuals
    k2 = kernel.reshape(x_t.shape[0], -1)
    g2 = g.reshape(-1, k2.shape[1])  # [M, N]
    dx = jax.lax.dot_general(g2, k2, (((1,), (1,)), ((), ())), **_F32)  # g w^T: [M, K]
    dw = jnp.dot(x_t, g2, **_F32)  # x^T g: [K, N]
    x_shape = g.shape[: g.ndim - (kernel.ndim - n_in)] + kernel.shape[:n_in]
    return dx.astype(g.dtype).reshape(x_shape), dw.astype(kernel.dtype).reshape(kernel.shape)


dense_for_cpu.defvjp(_forward, _backward)
