"""Compiles GPT-OSS-20B's ``encode`` (abstract weights, experts sharded) for a TPU topology on a
CPU host with libtpu, and prints ``compiled.memory_analysis()`` per chip. No TPU needed.

    JAX_PLATFORMS=cpu python benchmarks/text_encoder_tpu_compile.py \
        --topology v5p:4x4x4 --chips-per-host 2,2,1 --data 2 --fsdp 32 [--captions-per-chip 8]

``--topology`` is libtpu's name (``v5p:4x4x4`` = v5p-128, 64 chips; ``v6e:16x16`` = v6e-256);
the mesh is (slice=1, data, fsdp, tensor) over its devices with ``DEFAULT_RULES`` (experts over
fsdp where 32 experts divide). ``--moe global`` compiles the MoE without a mesh layout (params
still sharded; XLA partitions the global sort itself) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

GIB = 1024 ** 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default="v5p:4x4x4")
    parser.add_argument("--chips-per-host", default="2,2,1")
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--fsdp", type=int, default=32)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--captions-per-chip", type=int, default=8, help="stage 1: 8 per packed row")
    parser.add_argument("--length", type=int, default=512, help="caption_length (data config)")
    parser.add_argument("--layers", default="5,11,17,23")
    parser.add_argument("--moe", choices=("partitioned", "global"), default="partitioned")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    parser.add_argument("--dump-hlo", default="", help="write the optimized HLO text to this file")
    parser.add_argument("--dense-experts", action="store_true",
                        help="bf16 experts (dequantized at load) instead of MXFP4")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from lens_jax.models.text_encoder import GptOssConfig, abstract_params, encode
    from lens_jax.train.config import DEFAULT_RULES, MESH_AXES

    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=args.topology, chip_config_name="default",
        chips_per_host_bounds=tuple(int(x) for x in args.chips_per_host.split(",")), num_slices=1)
    devices = topo.devices
    shape = (1, args.data, args.fsdp, args.tensor)
    if int(np.prod(shape)) != len(devices):
        raise SystemExit(f"mesh {shape} needs {int(np.prod(shape))} chips; {args.topology} has {len(devices)}")
    mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
    config = GptOssConfig()
    selected = tuple(int(x) for x in args.layers.split(","))
    params = abstract_params(config, max(selected) + 1, not args.dense_experts, jnp.bfloat16, mesh,
                             DEFAULT_RULES)
    rows = args.captions_per_chip * len(devices) // args.tensor
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    ids = jax.ShapeDtypeStruct((rows, args.length), jnp.int32, sharding=batch)
    mask = jax.ShapeDtypeStruct((rows, args.length), jnp.bool_, sharding=batch)
    kwargs = dict(mesh=mesh, rules=DEFAULT_RULES) if args.moe == "partitioned" else {}

    def run(p, i, m):
        return encode(p, i, m, config=config, selected=selected, moe_impl="ragged", **kwargs)

    start = time.time()
    compiled = jax.jit(run).lower(params, ids, mask).compile()
    seconds = time.time() - start
    mem = compiled.memory_analysis()
    if args.dump_hlo:
        with open(args.dump_hlo, "w") as f:
            f.write(compiled.as_text())
    out = {"topology": args.topology, "chips": len(devices), "mesh": dict(zip(MESH_AXES, shape)),
           "moe": args.moe, "mxfp4": not args.dense_experts, "captions": rows, "length": args.length,
           "argument_gib": mem.argument_size_in_bytes / GIB, "output_gib": mem.output_size_in_bytes / GIB,
           "temp_gib": mem.temp_size_in_bytes / GIB,
           "generated_code_gib": mem.generated_code_size_in_bytes / GIB, "compile_s": seconds}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
