"""``xla_attention``'s written-out backward pass against autodiff of the plain softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.models import attention as attention_lib
from tests.conftest import max_rel_err, rel_l2


def autodiff_attention(q, k, v, segment_ids):
    """The textbook formula, differentiated by JAX (what ``xla_attention`` computed before)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(attention_lib.segment_mask(segment_ids), logits * q.shape[-1] ** -0.5, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


# float32: same formula, rounding only; bfloat16: the written-out backward keeps dP and dS in float32
# where autodiff rounds them to bf16, so the two differ by bf16 rounding (~2^-8).
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_xla_attention_gradients_match_autodiff(dtype, tol):
    g = np.random.default_rng(0)
    q, k, v, d_out = (jnp.asarray(g.standard_normal((2, 40, 3, 16)), dtype) for _ in range(4))
    # two segments and padding in row 0 (padding queries see a uniform softmax), one segment in row 1
    segments = jnp.asarray([[1] * 20 + [2] * 15 + [0] * 5, [1] * 40], jnp.int32)

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, segments).astype(jnp.float32) * d_out)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    out, expected_out = (f(q, k, v, segments) for f in (attention_lib.xla_attention, autodiff_attention))
    assert max_rel_err(np.asarray(out, np.float32), np.asarray(expected_out, np.float32)) < 1e-6
    for name, a, b in zip("qkv", grads(attention_lib.xla_attention), grads(autodiff_attention)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert rel_l2(a, b) < tol, name
        assert max_rel_err(a, b) < tol, name


# float32: the same arithmetic in another summation order; bfloat16: dq is rounded per block and
# the blocks' dk, dv sums round once, as xla_attention's do, but P and dS round differently
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("query_chunk", [16, 40, 128])
def test_chunked_attention_matches_xla_attention(dtype, tol, query_chunk):
    g = np.random.default_rng(1)
    q, k, v, d_out = (jnp.asarray(g.standard_normal((2, 40, 3, 16)), dtype) for _ in range(4))
    # 40 tokens in blocks of 16: three blocks, the last one padded; two segments and padding in
    # row 0, one segment in row 1
    segments = jnp.asarray([[1] * 20 + [2] * 15 + [0] * 5, [1] * 40], jnp.int32)
    chunked = lambda q, k, v, s: attention_lib.chunked_attention(q, k, v, s, query_chunk)

    def out_and_grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, segments).astype(jnp.float32) * d_out)
        return (fn(q, k, v, segments),) + jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    got, want = out_and_grads(jax.jit(chunked)), out_and_grads(attention_lib.xla_attention)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert rel_l2(a, b) < tol, name
        assert max_rel_err(a, b) < tol, name
