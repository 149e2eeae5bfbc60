# The batch-order discrepancy of docs/sharding.md, reduced to one denoiser block:
#   python benchmarks/sharding_order.py          # 8 fake CPU devices, mesh (data 2, fsdp 2, tensor 2)
# Reduced further to five lines of pure JAX, with the cause: benchmarks/sharding_order_minimal.py.
"""Forward of a 1-block tiny denoiser on a (data, fsdp, tensor) = 2x2x2 CPU mesh, batch sharded over
("data", "fsdp") and over ("fsdp", "data"), embed over "fsdp"; prints each row's max error against
one device (relative to the output's max) and writes both optimized HLOs to --hlo-dir."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

from configs import tiny  # noqa: E402
from lens_jax import sharding  # noqa: E402
from lens_jax.models.transformer import LensTransformer  # noqa: E402
from tests.models.test_transformer import make_inputs  # noqa: E402

OTHER_RULES = [("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("modulation", "tensor"),
               ("layers", None), ("length", None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hlo-dir", default=None, help="write the optimized HLO of both orders here")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    cfg = tiny.get_model_config(zero_init_modulation=False, num_layers=1)
    model = LensTransformer(cfg, rngs=nnx.Rngs(3))
    latents, feats, timesteps = make_inputs(cfg, 8, 4, 4, 6)
    mask = np.arange(6)[None] < np.arange(1, 9)[:, None] % 7
    expected = np.asarray(model(latents, feats, timesteps, (4, 4), mask))
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    graphdef, state0 = nnx.split(model)
    print(f"jax {jax.__version__}, mesh {dict(mesh.shape)}; rows 2 per batch shard; error per row:")
    for order in (("data", "fsdp"), ("fsdp", "data")):
        rules = [("batch", order)] + OTHER_RULES
        state = jax.device_put(state0, sharding.tree_shardings(nnx.get_partition_spec(state0), mesh, rules))
        batch = NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules, mesh))

        @jax.jit
        def forward(state, latents, feats, timesteps, mask):
            with sharding.use_rules(mesh, rules):
                return nnx.merge(graphdef, state)(latents, feats, timesteps, (4, 4), mask)

        inputs = jax.device_put((latents, feats, timesteps, mask), batch)
        err = np.abs(np.asarray(forward(state, *inputs)) - expected).max(axis=(1, 2)) / np.abs(expected).max()
        print(f"  batch over {order}: {np.array2string(err, precision=1)}")
        if args.hlo_dir:
            Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.hlo_dir) / f"batch_{'_'.join(order)}.hlo").write_text(
                forward.lower(state, *inputs).compile().as_text())


if __name__ == "__main__":
    main()
