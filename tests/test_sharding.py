"""Logical-axis rules and the denoiser's forward on 8 fake CPU devices under several layouts."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from configs import tiny
from lens_jax import sharding
from lens_jax.models.transformer import LensTransformer
from tests.models.test_transformer import make_inputs

RULES = [("batch", ("fsdp", "data")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
         ("modulation", "tensor"), ("layers", None), ("length", None)]


def test_logical_to_spec_rules():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    assert sharding.logical_to_spec(("layers", "embed", "mlp"), RULES, mesh) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", "embed"), RULES, mesh) == P(("fsdp", "data"), None, None)
    # a mesh axis is used once per array; unknown names are replicated
    assert sharding.logical_to_spec(("embed", "embed", "nope"), RULES, mesh) == P("fsdp", None, None)
    one = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("fsdp", "tensor"))
    assert sharding.logical_to_spec(("embed", "heads"), RULES, one) == P(None, "tensor")  # size-1 axis


LAYOUTS = [((8,), ("data",)), ((1, 8), ("data", "fsdp")), ((4, 2), ("data", "tensor")),
           ((2, 2, 2), ("data", "fsdp", "tensor"))]


@pytest.mark.parametrize("shape,axes", LAYOUTS)
def test_sharded_forward_equals_single_device(shape, axes):
    _check_sharded_forward(shape, axes, RULES)


def test_production_rules_equal_single_device_on_a_2x2x2_mesh():
    """``DEFAULT_RULES`` (batch over ("slice", "fsdp", "data")) on the layout that breaks the other order."""
    from lens_jax.train.config import DEFAULT_RULES

    _check_sharded_forward((2, 2, 2), ("data", "fsdp", "tensor"), list(DEFAULT_RULES))


@pytest.mark.xfail(strict=True, reason=(
    "XLA:CPU (jax 0.10.2): with batch sharded over ('data', 'fsdp') in that order, embed over "
    "'fsdp' and activation constraints on, the rows on devices whose data and fsdp indices differ "
    "come out ~2e-4 off (all other orders and layouts agree to 5e-7): another row's data leaks in "
    "(identical rows agree), the collective at fault not yet isolated; docs/sharding.md, "
    "benchmarks/sharding_order.py"))
def test_batch_over_data_then_fsdp_on_a_2x2x2_mesh():
    rules = [("batch", ("data", "fsdp"))] + [r for r in RULES if r[0] != "batch"]
    _check_sharded_forward((2, 2, 2), ("data", "fsdp", "tensor"), rules)


def _check_sharded_forward(shape, axes, rules):
    cfg = tiny.get_model_config(zero_init_modulation=False)
    model = LensTransformer(cfg, rngs=nnx.Rngs(3))
    latents, feats, timesteps = make_inputs(cfg, 8, 4, 4, 6)
    mask = np.arange(6)[None] < np.arange(1, 9)[:, None] % 7
    expected = model(latents, feats, timesteps, (4, 4), mask)

    mesh = Mesh(np.array(jax.devices()).reshape(shape), axes)
    graphdef, state = nnx.split(model)
    state_shardings = sharding.tree_shardings(nnx.get_partition_spec(state), mesh, rules)
    state = jax.device_put(state, state_shardings)
    batch = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules, mesh))

    @jax.jit
    def forward(state, latents, feats, timesteps, mask):
        with sharding.use_rules(mesh, rules):
            return nnx.merge(graphdef, state)(latents, feats, timesteps, (4, 4), mask)

    args = jax.device_put((latents, feats, timesteps, mask), batch)
    actual = forward(state, *args)
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5 * float(np.abs(expected).max()))
    if "tensor" in axes:  # parameters really are split
        kernel = state["blocks"]["img_mlp_w1"]["kernel"]
        assert kernel.sharding.spec == sharding.logical_to_spec(("layers", "embed", "mlp"), rules, mesh)
        assert kernel.sharding.spec[2] == "tensor"
