"""``cpu_matmul.dense_for_cpu``: the arithmetic of a bf16 dense layer (float32 accumulation, one
rounding to bf16), forward and gradients, in the form XLA:CPU runs natively on bf16 operands; in
float32, the same values as autodiff of ``tensordot``."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.models.cpu_matmul import dense_for_cpu
from tests.conftest import max_rel_err, rel_l2


def _inputs(x_shape, k_shape, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal(k_shape) * 0.1, jnp.bfloat16)
    return x, k


@pytest.mark.parametrize("x_shape,k_shape,n_in", [((2, 40, 24), (24, 56), 1),
                                                  ((2, 40, 3, 8), (3, 8, 56), 2)])
def test_forward_and_gradients_equal_float32_reference(x_shape, k_shape, n_in):
    x, k = _inputs(x_shape, k_shape)
    out_shape = x_shape[: len(x_shape) - n_in] + k_shape[n_in:]
    g = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape), jnp.bfloat16)

    def reference(x, k):  # float32 arithmetic on the same bf16 values, rounded once
        return jnp.tensordot(x.astype(jnp.float32), k.astype(jnp.float32), n_in)

    y, vjp = jax.vjp(lambda x, k: dense_for_cpu(x, k, n_in), x, k)
    y_ref, vjp_ref = jax.vjp(reference, x, k)
    assert y.dtype == jnp.bfloat16 and y.shape == out_shape
    dx, dk = vjp(g)
    dx_ref, dk_ref = vjp_ref(g.astype(jnp.float32))
    assert dx.shape == x.shape and dk.shape == k.shape and dx.dtype == dk.dtype == jnp.bfloat16
    # Each result is the float32 value rounded to bf16: within one bf16 ulp (2^-7 relative; XLA:CPU's
    # bf16 kernels may round once more than a plain float32 dot would).
    for got, want in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
        got = np.asarray(got, np.float32)
        want = np.asarray(want, np.float32)
        assert np.all(np.abs(got - want) <= np.abs(want) * 2.0 ** -7 + 1e-6)
        assert rel_l2(got, want) < 4e-3 and max_rel_err(got, want) < 4e-3


@pytest.mark.parametrize("x_shape,k_shape,n_in", [((2, 40, 24), (24, 56), 1),
                                                  ((2, 40, 3, 8), (3, 8, 56), 2)])
def test_float32_forward_and_gradients_equal_autodiff(x_shape, k_shape, n_in):
    """float32 takes the same written-out backward (``dw`` from the kept ``x^T``): the values of
    autodiff's ``tensordot`` to float32 rounding (the sums run in another order)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape) * 0.1, jnp.float32)
    g = jnp.asarray(rng.standard_normal(x_shape[: len(x_shape) - n_in] + k_shape[n_in:]), jnp.float32)
    y, vjp = jax.vjp(lambda x, k: dense_for_cpu(x, k, n_in), x, k)
    y_ref, vjp_ref = jax.vjp(lambda x, k: jnp.tensordot(x, k, n_in), x, k)
    for got, want in zip((y, *vjp(g)), (y_ref, *vjp_ref(g))):
        assert got.dtype == jnp.float32 and got.shape == want.shape
        assert max_rel_err(got, want) < 1e-5 and rel_l2(got, want) < 1e-6


def test_float32_dense_layers_of_the_denoiser_use_the_written_out_backward():
    """``transformer.dense`` traced for the CPU in float32 goes through ``dense_for_cpu`` (a
    ``custom_vjp``), and the training step's gradient equals plain autodiff's (issue 14: the
    speed-up is in docs/benchmarks.md, the values must not move)."""
    from flax import nnx

    from lens_jax.models import transformer
    from lens_jax.models.config import transformer_config

    cfg = transformer_config(num_layers=2, num_attention_heads=2, enc_hidden_dim=32, remat="none",
                             param_dtype="float32", dtype="float32")
    model = transformer.LensTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(3)
    b, (h, w), n_txt = 2, (4, 4), 8
    latents = jnp.asarray(rng.standard_normal((b, h * w, cfg.in_channels)), jnp.float32)
    feats = [jnp.asarray(rng.standard_normal((b, n_txt, cfg.enc_hidden_dim)), jnp.float32)
             for _ in cfg.selected_layer_index]
    sigmas = jnp.asarray([0.3, 0.8], jnp.float32)

    def loss(state):
        out = nnx.merge(graphdef, state)(latents, feats, sigmas, (h, w))
        return jnp.mean(out ** 2)

    assert "name=dense_for_cpu" in str(jax.make_jaxpr(loss)(state))
    grads = jax.tree.leaves(jax.grad(loss)(state))
    original = transformer._CPU_DENSE_DTYPES
    transformer._CPU_DENSE_DTYPES = (jnp.dtype(jnp.bfloat16),)  # float32 through plain tensordot
    jax.clear_caches()  # traces of the blocks are cached on the function, not on this global
    try:
        assert "name=dense_for_cpu" not in str(jax.make_jaxpr(loss)(state))
        reference = jax.tree.leaves(jax.grad(loss)(state))
    finally:
        transformer._CPU_DENSE_DTYPES = original
        jax.clear_caches()
    for got, want in zip(grads, reference):
        assert rel_l2(got, want) < 1e-5, (got.shape, rel_l2(got, want))


def test_denoiser_block_dots_take_bf16_operands_on_the_cpu():
    """The point of the module: in a bf16 training step of the denoiser on the CPU, every dot of the
    layer scan (forward and backward) reads bf16 operands, i.e. none is rewritten into a float32 dot
    of converted operands. Contractions over a handful of elements (the modulation's weight
    gradient sums over the batch's 2 timesteps) are left to XLA."""
    from flax import nnx

    from lens_jax.models.config import transformer_config
    from lens_jax.models.transformer import LensTransformer

    cfg = transformer_config(num_layers=2, num_attention_heads=2, enc_hidden_dim=32,
                             param_dtype="bfloat16", dtype="bfloat16", remat="none")
    model = LensTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    b, (h, w), n_txt = 2, (8, 8), 16
    latents = jnp.zeros((b, h * w, cfg.in_channels), jnp.bfloat16)
    feats = [jnp.zeros((b, n_txt, cfg.enc_hidden_dim), jnp.bfloat16) for _ in cfg.selected_layer_index]
    sigmas = jnp.full((b,), 0.5, jnp.float32)

    def loss(state):
        out = nnx.merge(graphdef, state)(latents, feats, sigmas, (h, w))
        return jnp.mean(out.astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    checked = 0
    for computation in re.split(r"\n(?=\S)", hlo):  # one HLO computation per block of text
        arrays = {name: (dtype, [int(d) for d in dims.split(",") if d])
                  for name, dtype, dims in re.findall(r"%(\S+) = (\w+)\[([\d,]*)\]", computation)}
        for line in computation.splitlines():
            dot = re.search(r" dot\(%([^,\s]+), %([^,\s)]+)\), lhs_contracting_dims=\{([\d,]*)\}", line)
            if not dot or "while/body" not in line:
                continue
            (lhs_type, lhs_dims), (rhs_type, _) = arrays[dot.group(1)], arrays[dot.group(2)]
            contracted = np.prod([lhs_dims[int(i)] for i in dot.group(3).split(",")])
            if contracted > 16:
                checked += 1
                assert (lhs_type, rhs_type) == ("bf16", "bf16"), line.strip()[:300]
    assert checked >= 20, hlo  # per block: 8 dense forward + 2 attention, and their backward
