"""The GPT-OSS MoE partitioned over a mesh (``moe_partitioned`` in ``shard_map``) equals the
unsharded one; ``text_encoder_shardings`` places the experts by the ``experts`` rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from lens_jax.models.text_encoder import (GptOssConfig, abstract_params, encode, moe_layout,
                                          random_params, text_encoder_shardings)
from lens_jax.sharding import use_rules
from lens_jax.train.config import DEFAULT_RULES, MESH_AXES
from tests.conftest import max_rel_err

SELECTED = (0, 2)
# Tiny GPT-OSS with 8 experts, top-4, 3 layers (sliding, full, sliding).
TINY = GptOssConfig(vocab_size=64, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, intermediate_size=64, num_local_experts=8,
                    num_experts_per_tok=4, sliding_window=4, swiglu_limit=0.75)
TOL = 1e-5  # fp32: sharded vs unsharded differ only in summation order (measured <= 3e-7)


def mesh_of(**sizes) -> Mesh:
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return Mesh(np.asarray(jax.devices()).reshape(shape), MESH_AXES)


def inputs(rng, rows=8, length=6):
    ids = rng.integers(0, TINY.vocab_size, size=(rows, length)).astype(np.int32)
    mask = np.arange(length)[None, :] < rng.integers(1, length + 1, size=(rows, 1))
    return jnp.asarray(ids), jnp.asarray(mask)


def placed_params(mxfp4, mesh, rules):
    host = random_params(TINY, 3, mxfp4, np.float32, seed=2, scale=0.1)
    shardings = text_encoder_shardings(TINY, 3, mxfp4, mesh, rules)
    return ({"embed": host[("embed",)], "layers": {p[1]: v for p, v in host.items() if p[0] == "layers"}},
            shardings)


# (mesh sizes, rules, expected expert axes, expected token axes)
LAYOUTS = {
    "fsdp4-data2": (dict(data=2, fsdp=4), DEFAULT_RULES, ("fsdp",), ("fsdp", "data")),
    "fsdp2-tensor4": (dict(fsdp=2, tensor=4), DEFAULT_RULES, ("fsdp", "tensor"), ("fsdp",)),
    # experts over fsdp only, their mlp dim over tensor (gathered per layer inside the shard)
    "mlp-over-tensor": (dict(fsdp=4, tensor=2), (("batch", ("data", "fsdp")), ("experts", "fsdp"),
                                                  ("mlp", "tensor"), ("embed", "fsdp")),
                        ("fsdp",), ("fsdp",)),
    # experts over an axis that splits tokens but is not the FSDP one
    "experts-over-data": (dict(data=2, fsdp=4), (("batch", ("data", "fsdp")), ("experts", "data"),
                                                  ("embed", "fsdp")), ("data",), ("data", "fsdp")),
    # no experts rule: every shard holds every expert and runs its own tokens (data parallel)
    "experts-replicated": (dict(data=2, fsdp=4), (("batch", ("data", "fsdp")), ("embed", "fsdp")),
                           (), ("data", "fsdp")),
}


@pytest.mark.parametrize("name,mxfp4,moe_impl", [("fsdp4-data2", True, "ragged"),
                                                 ("fsdp4-data2", False, "dense"),
                                                 ("fsdp2-tensor4", True, "dense"),
                                                 ("mlp-over-tensor", True, "ragged"),
                                                 ("experts-over-data", False, "ragged"),
                                                 ("experts-replicated", True, "dense")])
def test_partitioned_moe_equals_unsharded(rng, name, mxfp4, moe_impl):
    sizes, rules, expert_axes, token_axes = LAYOUTS[name]
    mesh = mesh_of(**sizes)
    params, shardings = placed_params(mxfp4, mesh, rules)
    ids, mask = inputs(rng)
    expected = encode(jax.tree.map(jnp.asarray, params), ids, mask, config=TINY, selected=SELECTED,
                      moe_impl=moe_impl)
    layout = moe_layout(TINY, 3, mxfp4, ids.shape[0], mesh, rules)
    assert (layout.expert_axes, layout.token_axes) == (expert_axes, token_axes)
    sharded = jax.device_put(params, shardings)
    expert_name = "gate_up_blocks" if mxfp4 else "gate_up"
    expert_spec = sharded["layers"][expert_name].sharding.spec
    assert expert_spec[1] == (None if not expert_axes else expert_axes[0] if len(expert_axes) == 1
                              else expert_axes)
    got = encode(sharded, ids, mask, config=TINY, selected=SELECTED, moe_impl=moe_impl,
                 mesh=mesh, rules=rules)
    for a, e in zip(got, expected):
        assert max_rel_err(a, e) <= TOL


def test_encode_partitions_under_active_rules(rng):
    """Inside ``use_rules`` (as in the train step) encode lowers to a shard_map over the mesh."""
    mesh = mesh_of(data=2, fsdp=4)
    params, shardings = placed_params(True, mesh, DEFAULT_RULES)
    ids, mask = inputs(rng)
    sharded = jax.device_put(params, shardings)

    def run(p, i, m):
        with use_rules(mesh, DEFAULT_RULES):
            return encode(p, i, m, config=TINY, selected=SELECTED, moe_impl="ragged")

    text = jax.jit(run).lower(sharded, ids, mask).as_text()
    assert "manual_computation" in text or "SPMDFullToShardShape" in text
    plain = jax.jit(lambda p, i, m: encode(p, i, m, config=TINY, selected=SELECTED,
                                           moe_impl="ragged")).lower(sharded, ids, mask).as_text()
    assert "manual_computation" not in plain and "SPMDFullToShardShape" not in plain
    expected = encode(jax.tree.map(jnp.asarray, params), ids, mask, config=TINY, selected=SELECTED,
                      moe_impl="ragged")
    for a, e in zip(jax.jit(run)(sharded, ids, mask), expected):
        assert max_rel_err(a, e) <= TOL


def test_gpt_oss_20b_expert_bytes_per_device():
    """The real 20B layout on 8 devices (fsdp=8): MXFP4 experts split 8 ways along the experts dim."""
    config = GptOssConfig()
    mesh = mesh_of(fsdp=8)
    shardings = text_encoder_shardings(config, 24, True, mesh, DEFAULT_RULES)
    tree = abstract_params(config, 24, True, jnp.bfloat16, mesh, DEFAULT_RULES)
    assert shardings["layers"]["gate_up_blocks"].spec == PartitionSpec(None, "fsdp", None, None, None)
    assert shardings["embed"].spec == PartitionSpec(None, "fsdp")
    leaves = jax.tree.leaves(tree)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves)
    experts = sum(x.size * x.dtype.itemsize for n, x in tree["layers"].items()
                  if n.startswith(("gate_up", "down")))
    assert experts > 0.8 * total  # the experts are most of the 20B model's bytes
    assert per_device == pytest.approx(total / 8, rel=0.02)  # only norms/sinks/biases stay whole


def test_partitioned_encode_compiles_for_a_tpu_topology(monkeypatch, no_persistent_compilation_cache):
    """The shard_map MoE (ragged_dot per shard, MXFP4 decoded per shard) compiles with libtpu for
    v5p-8 (4 chips, fsdp=4) from abstract weights; no TPU needed."""
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is not installed")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lock
    from jax.experimental import topologies
    from jax.sharding import NamedSharding

    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1",
                                            chip_config_name="default",
                                            chips_per_host_bounds=(2, 2, 1), num_slices=1)
    mesh = Mesh(np.asarray(topology.devices).reshape(1, 1, 4, 1), MESH_AXES)
    params = abstract_params(TINY, 3, True, jnp.bfloat16, mesh, DEFAULT_RULES)
    rows = NamedSharding(mesh, PartitionSpec("fsdp"))
    ids = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct((8, 16), jnp.bool_, sharding=rows)
    lowered = jax.jit(lambda p, i, m: encode(p, i, m, config=TINY, selected=SELECTED, moe_impl="ragged",
                                             mesh=mesh, rules=DEFAULT_RULES)).lower(params, ids, mask)
    assert "manual_computation" in lowered.as_text() or "SPMDFullToShardShape" in lowered.as_text()
    compiled = lowered.compile()
    # the per-chip program holds 2 of the 8 experts' MXFP4 blocks: [layers, 8/4, 2I, D/32, 16]
    assert "u8[3,2,128,2,16]" in compiled.as_text()
    assert compiled.memory_analysis().argument_size_in_bytes > 0
