"""The GPU attention paths on CPU: the Pallas segment-id kernel in interpret mode and the cuDNN
padding-only reordering through XLA, both against ``xla_attention`` (forward and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.models import attention as attention_lib
from tests.conftest import max_rel_err

TOL = 1e-5  # fp32, same math in a different order (measured ~1e-6)
B, N, H, D = 2, 80, 2, 16  # N is not a block multiple: the Pallas path pads to 128


def qkv(seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal((B, N, H, D)), jnp.float32) for _ in range(3))


def packed_segments():
    """Row 0: three segments then padding; row 1: padding in the middle (image part then text)."""
    seg = np.zeros((B, N), np.int32)
    seg[0, :30], seg[0, 30:55], seg[0, 55:70] = 1, 2, 3
    seg[1, :40], seg[1, 40:50], seg[1, 60:75] = 1, 0, 2
    return jnp.asarray(seg)


def single_segment():
    """One segment per row; padding inside the row and at its end (as image + caption tokens)."""
    seg = np.zeros((B, N), np.int32)
    seg[0, :50], seg[0, 64:72] = 1, 1
    seg[1, :N] = 1
    return jnp.asarray(seg)


def check_against_xla(fn, seg):
    """Forward on valid queries, and gradients of a loss over valid outputs (padding outputs are
    finite garbage that callers mask, in every implementation)."""
    q, k, v = qkv()
    valid = np.asarray(seg != 0)
    weight = jnp.asarray(np.random.default_rng(1).standard_normal((B, N, H, D)), jnp.float32)
    weight = weight * jnp.asarray(valid)[:, :, None, None]
    got, expected = fn(q, k, v, seg), attention_lib.xla_attention(q, k, v, seg)
    assert np.isfinite(np.asarray(got)).all()
    assert max_rel_err(np.asarray(got)[valid], np.asarray(expected)[valid]) <= TOL

    def loss(impl):
        return lambda q, k, v: jnp.sum(impl(q, k, v, seg) * weight)

    grads = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    expected_grads = jax.grad(loss(attention_lib.xla_attention), argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip("qkv", grads, expected_grads):
        assert max_rel_err(g, e) <= TOL, name


def test_pallas_gpu_kernel_with_segment_ids_matches_xla():
    pytest.importorskip("jax.experimental.pallas.ops.gpu.attention")
    check_against_xla(lambda q, k, v, s: attention_lib.pallas_gpu_attention(q, k, v, s, interpret=True),
                      packed_segments())


def test_pallas_gpu_kernel_runs_per_shard_under_a_mesh():
    """Under ``use_rules`` the kernel runs in shard_map (rows over data/fsdp, heads over tensor)."""
    pytest.importorskip("jax.experimental.pallas.ops.gpu.attention")
    from jax.sharding import Mesh

    from lens_jax.sharding import use_rules
    from lens_jax.train.config import DEFAULT_RULES, MESH_AXES

    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 1, 2, 2), MESH_AXES)  # fsdp 2 x tensor 2
    seg = packed_segments()
    q, k, v = qkv()

    def run(q, k, v, s):
        with use_rules(mesh, DEFAULT_RULES):
            return attention_lib.pallas_gpu_attention(q, k, v, s, interpret=True)

    assert "manual_computation" in jax.jit(run).lower(q, k, v, seg).as_text()
    check_against_xla(jax.jit(run), seg)


def test_cudnn_padding_path_matches_xla():
    """The reordering + sequence lengths of ``cudnn_attention``, run through XLA on CPU."""
    check_against_xla(lambda q, k, v, s: attention_lib.cudnn_attention(q, k, v, s, implementation="xla"),
                      single_segment())


def test_cudnn_sees_a_sequence_padded_to_its_multiple(monkeypatch):
    """cuDNN's flash backward rejected 4511 tokens on an H200 (jax 0.11.2, 2026-12-04); the path
    pads the sequence (segment 0) to ``CUDNN_SEQ_MULTIPLE`` and returns the caller's length."""
    lengths = []
    real = jax.nn.dot_product_attention

    def recording(q, *args, **kwargs):
        lengths.append(q.shape[1])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    q, k, v = qkv()
    out = attention_lib.cudnn_attention(q, k, v, single_segment(), implementation="xla")
    assert out.shape == q.shape
    assert lengths == [128] and N % attention_lib.CUDNN_SEQ_MULTIPLE != 0


def test_gpu_dispatch_by_packed_flag_and_dtype(monkeypatch):
    """Packed rows and float32 compute (which cuDNN's flash attention refuses) take the Pallas
    kernel; one segment per row in bf16 takes cuDNN."""
    calls = []
    monkeypatch.setattr(attention_lib, "pallas_gpu_attention", lambda *a: calls.append("pallas"))
    monkeypatch.setattr(attention_lib, "cudnn_attention", lambda *a: calls.append("cudnn"))
    monkeypatch.setattr(attention_lib, "resolve", lambda choice, backend=None: "cudnn")
    q, k, v = qkv()
    qb, kb, vb = (t.astype(jnp.bfloat16) for t in (q, k, v))
    attention_lib.attention(qb, kb, vb, single_segment(), "auto")
    attention_lib.attention(qb, kb, vb, single_segment(), "auto", packed=False)
    attention_lib.attention(q, k, v, single_segment(), "auto", packed=False)
    assert calls == ["pallas", "cudnn", "pallas"]
