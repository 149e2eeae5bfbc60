"""Splash attention (Pallas, interpret mode on CPU) against the XLA path: packed segments, padding,
forward and gradients, alone and partitioned in ``shard_map`` over a (fsdp, tensor) mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from lens_jax.models import attention as attention_lib
from lens_jax.sharding import use_rules
from lens_jax.train.config import DEFAULT_RULES
from tests.conftest import max_rel_err, rel_l2

# float32 inputs; the kernel and XLA differ only in summation order and the online softmax.
TOL_MAX_REL = 2e-5
TOL_REL_L2 = 1e-5
BLOCK = 128


def _inputs(b=2, n=200, h=4, d=64, seed=0):
    """Row 0: segments 1 (80 tokens) and 2 (90), then padding; row 1: one segment of 151 tokens."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for _ in range(3))
    seg = np.zeros((b, n), np.int32)
    seg[0, :80], seg[0, 80:170] = 1, 2
    seg[1, :151] = 1
    return q, k, v, jnp.asarray(seg)


def _splash(q, k, v, seg):
    return attention_lib.splash_attention(q, k, v, seg, BLOCK, interpret=True)


def _loss(fn, valid):
    def loss(q, k, v, seg):
        out = fn(q, k, v, seg)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(jnp.where(valid[:, :, None, None], out * weights, 0.0))
    return loss


def _check(fn, q, k, v, seg):
    valid = np.asarray(seg) > 0
    got, want = fn(q, k, v, seg), attention_lib.xla_attention(q, k, v, seg)
    assert max_rel_err(np.asarray(got)[valid], np.asarray(want)[valid]) < TOL_MAX_REL
    assert rel_l2(np.asarray(got)[valid], np.asarray(want)[valid]) < TOL_REL_L2
    grads = jax.grad(_loss(fn, jnp.asarray(valid)), argnums=(0, 1, 2))(q, k, v, seg)
    ref = jax.grad(_loss(attention_lib.xla_attention, jnp.asarray(valid)), argnums=(0, 1, 2))(
        q, k, v, seg)
    for name, g, r in zip("qkv", grads, ref):
        assert max_rel_err(g, r) < TOL_MAX_REL, name
        assert rel_l2(g, r) < TOL_REL_L2, name


def test_splash_matches_xla_forward_and_gradients():
    _check(jax.jit(_splash), *_inputs())


def test_splash_in_shard_map_matches_xla():
    """Rows over fsdp (2), heads over tensor (2): each device runs the kernel on its block."""
    mesh = jax.make_mesh((1, 1, 2, 2), ("slice", "data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 4, devices=jax.devices()[:4])

    def sharded(q, k, v, seg):
        with use_rules(mesh, DEFAULT_RULES):
            return _splash(q, k, v, seg)

    jaxpr = str(jax.make_jaxpr(sharded)(*_inputs()))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    _check(jax.jit(sharded), *_inputs())


@pytest.mark.parametrize("backend,want", [("tpu", "splash"), ("cpu", "chunked")])
def test_dispatch_follows_the_mesh_platform(backend, want):
    """``auto`` picks splash for a mesh of TPU devices (an AOT compile from a CPU host)."""
    assert attention_lib.resolve("auto", backend) == want
    mesh = jax.make_mesh((1, 1, 1, 1), ("slice", "data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 4, devices=jax.devices()[:1])
    with use_rules(mesh, DEFAULT_RULES):
        assert attention_lib.target_backend() == "cpu"
    assert attention_lib.target_backend() == jax.default_backend()
