"""Peak host memory of a FLUX.2 VAE decode on CPU, untiled and tiled, each in its own process.

Every mode runs in a fresh subprocess (real architecture config, random weights, fp32) that
reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident memory of the process:
Python, JAX, the weights, compilation and the decode itself) before and after the decode.

    python benchmarks/vae_memory.py --size 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024,
                   help="image height and width in pixels (multiple of 16; default 1024)")
    p.add_argument("--modes", default="untiled,tiled",
                   help="comma-separated modes to measure: untiled, tiled (default both)")
    p.add_argument("--tile", type=int, default=64,
                   help="tile size in VAE-latent pixels for the tiled mode (default 64 = 512 px)")
    p.add_argument("--overlap", type=int, default=16,
                   help="tile overlap in VAE-latent pixels (default 16 = 128 px)")
    p.add_argument("--dtype", default="float32", help="compute and parameter dtype (default float32)")
    p.add_argument("--estimate", default="",
                   help="instead of running, compile the untiled decode for these sizes (e.g. "
                        "'1440x1440,2080x1040') and print XLA's memory analysis of the compiled "
                        "program (weights + temporaries + output): a device-independent estimate "
                        "of the accelerator memory an untiled decode needs")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(args: argparse.Namespace) -> None:
    import jax.numpy as jnp
    import numpy as np

    from lens_jax.checkpoints.vae import random_vae
    from lens_jax.models.vae import VAEConfig

    vae = random_vae(VAEConfig(), seed=0, dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.dtype))
    side = args.size // 8
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, side, side, 32)), args.dtype)
    before = peak_rss_mib()
    start = time.perf_counter()
    if args.child == "tiled":
        image = vae.decode_tiled(z, tile=args.tile, overlap=args.overlap)
    else:
        image = vae.decode(z)
    image.block_until_ready()
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": args.child, "peak_rss_before_decode_mib": before,
                      "peak_rss_mib": peak_rss_mib(), "seconds_with_compile": seconds,
                      "image_shape": list(image.shape)}))


def estimate(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lens_jax.models.vae import _JIT
    from lens_jax.models.vae import AutoencoderKLFlux2, VAEConfig

    dtype = jnp.dtype(args.dtype)
    model = nnx.eval_shape(lambda: AutoencoderKLFlux2(VAEConfig(), rngs=nnx.Rngs(0), dtype=dtype,
                                                      param_dtype=dtype))
    graphdef, state = nnx.split(model)
    print(f"XLA memory analysis of the compiled untiled decode ({args.dtype}, "
          f"{jax.devices()[0].platform} backend), GiB")
    print(f"{'image':<12}{'weights':>9}{'temporaries':>13}{'output':>8}{'total':>8}")
    for size in args.estimate.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        z = jax.ShapeDtypeStruct((1, h // 8, w // 8, 32), dtype)
        m = _JIT.lower(graphdef, "decode", state, z).compile().memory_analysis()
        gib = 1 / 2**30
        total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
        print(f"{f'{h}x{w}':<12}{m.argument_size_in_bytes * gib:>9.2f}{m.temp_size_in_bytes * gib:>13.2f}"
              f"{m.output_size_in_bytes * gib:>8.2f}{total * gib:>8.2f}")


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    if args.estimate:
        estimate(args)
        return
    if args.size % 16 or args.size <= 0:
        raise SystemExit(f"--size must be a positive multiple of 16, got {args.size}")
    print(f"FLUX.2 VAE decode of one {args.size}x{args.size} image on CPU, {args.dtype}, "
          f"random weights (tiled: {args.tile}-latent tiles = {8 * args.tile} px, "
          f"overlap {args.overlap} = {8 * args.overlap} px)")
    print(f"{'mode':<10}{'peak RSS MiB':>14}{'before decode MiB':>19}{'decode s':>10}")
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ("untiled", "tiled"):
            raise SystemExit(f"unknown mode {mode!r} in --modes (use untiled, tiled)")
        cmd = [sys.executable, __file__, "--child", mode, "--size", str(args.size), "--tile",
               str(args.tile), "--overlap", str(args.overlap), "--dtype", args.dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:<10}{r['peak_rss_mib']:>14.0f}{r['peak_rss_before_decode_mib']:>19.0f}"
              f"{r['seconds_with_compile']:>10.1f}")


if __name__ == "__main__":
    main()
