# The batch-order discrepancy of docs/sharding.md as a five-line pure-JAX program (no flax, no model):
#   python benchmarks/sharding_order_minimal.py             # 8 fake CPU devices, (data 2, fsdp 2, tensor 2)
#   python benchmarks/sharding_order_minimal.py --slices 2  # 16: (slice 2, data 2, fsdp 2, tensor 2)
#   python benchmarks/sharding_order_minimal.py --tpu       # also compile (not run) for TPU v5p:2x2x2
#       (libtpu refuses to load while another process holds /tmp/libtpu_lockfile; set
#        ALLOW_MULTIPLE_LIBTPU_LOAD=1 for this compile-only use if that process is yours to share)
"""``y = x @ w_rep; out = y + y @ w`` with x [8, 16, 64] batch-sharded, w_rep replicated and w [64, 64]
sharded ("tensor", "fsdp"). On XLA:CPU (jax/jaxlib 0.10.2) the SPMD partitioner's dot handling
collective-permutes y's batch shards into the other device order for ``y @ w`` and never permutes the
product back, so the ``add`` pairs one batch shard's ``y`` with another's ``y @ w``. Prints each row's
max error against one device (relative to the output's max) for every batch order, the error against
that swapped-shard prediction, and the compiled program's collectives."""

from __future__ import annotations

import argparse
import os
import re

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--slices", type=int, default=1, choices=(1, 2),
                    help="2: a 16-device (slice, data, fsdp, tensor) mesh, the production rules' orders")
parser.add_argument("--tpu", action="store_true", help="also compile for a TPU v5p:2x2x2 topology")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={8 * args.slices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

COLLECTIVE = re.compile(r"= (\S+) (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)"
                        r"(?:-start)?\(.*?((?:replica_groups|source_target_pairs)=.*?)"
                        r"(?=, (?:dimensions|use_global_device_ids|to_apply|metadata|backend_config)=|$)")


def f(x, w_rep, w):
    """x [B, N, D], w_rep [D, D] (replicated), w [D, D] (rows over "tensor", columns over "fsdp")."""
    y = x @ w_rep
    return y + y @ w


def collectives(hlo_text: str) -> list[str]:
    return [" ".join(m.groups()) for m in map(COLLECTIVE.search, hlo_text.splitlines()) if m]


def main() -> None:
    jax.config.update("jax_platforms", "cpu")
    g = np.random.default_rng(0)
    b = 8 * args.slices
    x = g.standard_normal((b, 16, 64), np.float32)
    w_rep = g.standard_normal((64, 64), np.float32) / 8
    w = g.standard_normal((64, 64), np.float32) / 8
    expected = np.asarray(jax.jit(f)(x, w_rep, w))
    y = x @ w_rep
    if args.slices == 1:
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
        orders = (("data", "fsdp"), ("fsdp", "data"))
    else:
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2, 2), ("slice", "data", "fsdp", "tensor"))
        orders = (("slice", "fsdp", "data"), ("slice", "data", "fsdp"), ("fsdp", "slice", "data"))
    print(f"jax {jax.__version__}, XLA:CPU, mesh {dict(mesh.shape)}, w sharded ('tensor', 'fsdp'); "
          f"rows {b // (4 * args.slices)} per batch shard")
    for order in orders:
        inputs = (jax.device_put(x, NamedSharding(mesh, P(order))), w_rep,
                  jax.device_put(w, NamedSharding(mesh, P("tensor", "fsdp"))))
        compiled = jax.jit(f).lower(*inputs).compile()
        out = np.asarray(compiled(*inputs))
        err = np.abs(out - expected).max(axis=(1, 2)) / np.abs(expected).max()
        print(f"  batch over {order}: error per row {np.array2string(err, precision=1)}")
        if args.slices == 1:  # batch shards 1 and 2 (rows 2-5) exchanged in the y @ w term only
            swapped = y + (y @ w)[[0, 1, 4, 5, 2, 3, 6, 7]]
            print(f"    vs y + (y @ w)[rows of shards 1 and 2 exchanged]: "
                  f"{np.abs(out - swapped).max() / np.abs(out).max():.1e}")
        for line in collectives(compiled.as_text()):
            print(f"    {line}")
    if args.tpu:
        compile_for_tpu()


def compile_for_tpu() -> None:
    """The same program for a v5p:2x2x2 topology (8 chips, no TPU needed): collectives only."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2",
                                        chip_config_name="default", chips_per_host_bounds=(2, 2, 2),
                                        num_slices=1)
    mesh = Mesh(np.array(topo.devices).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    print("TPU v5p:2x2x2, compiled only (not run):")
    for order in (("data", "fsdp"), ("fsdp", "data")):
        shapes = (jax.ShapeDtypeStruct((8, 16, 64), jnp.float32, sharding=NamedSharding(mesh, P(order))),
                  jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=NamedSharding(mesh, P())),
                  jax.ShapeDtypeStruct((64, 64), jnp.float32,
                                       sharding=NamedSharding(mesh, P("tensor", "fsdp"))))
        text = jax.jit(f).lower(*shapes).compile().as_text()
        print(f"  batch over {order}:")
        for line in collectives(text):
            print(f"    {line}")


if __name__ == "__main__":
    main()
