"""Decode speed of the FLUX.2 VAE: lens_jax (JAX) vs diffusers (PyTorch) on the same CPU, same weights.

Builds diffusers' ``AutoencoderKLFlux2`` with the real architecture and random weights, saves it,
loads it with ``lens_jax.load_vae`` and times decoding one ``--size`` x ``--size`` image from the
same random latent with both, in fp32 (timed runs interleaved JAX, torch, JAX, ...). Prints a table with the ratio (JAX time / torch time) and
the speedup (torch time / JAX time). Needs the test extras (torch, diffusers).

    python benchmarks/vae.py --size 512 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512,
                   help="image height and width in pixels (multiple of 16; default 512)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed decodes per framework after one warm-up decode (default 3)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default 0: torch's own default, one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and latent")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.size % 16 or args.size <= 0:
        raise SystemExit(f"--size must be a positive multiple of 16, got {args.size}")
    import jax
    import numpy as np
    import torch
    from diffusers import AutoencoderKLFlux2

    from lens_jax.checkpoints.vae import load_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = AutoencoderKLFlux2().eval()  # real FLUX.2 architecture, torch's random init
    with torch.no_grad():  # make the norms and bn statistics random too
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        model.bn.running_mean.normal_(0.0, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        vae = load_vae(folder, dtype="float32")

    side = args.size // 8
    z = np.random.default_rng(args.seed).standard_normal((1, side, side, 32)).astype(np.float32)
    z_torch = torch.from_numpy(np.ascontiguousarray(z.transpose(0, 3, 1, 2)))

    def time_jax() -> float:
        start = time.perf_counter()
        vae.decode(z).block_until_ready()
        return time.perf_counter() - start

    @torch.no_grad()
    def time_torch() -> float:
        start = time.perf_counter()
        model.decode(z_torch)
        return time.perf_counter() - start

    first_jax = time_jax()  # includes compilation
    first_torch = time_torch()
    jax_times, torch_times = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same load on a shared machine
        jax_times.append(time_jax())
        torch_times.append(time_torch())
    out_jax = np.asarray(vae.decode(z))
    with torch.no_grad():
        out_torch = model.decode(z_torch).sample.permute(0, 2, 3, 1).numpy()
    err = float(np.abs(out_jax - out_torch).max() / np.abs(out_torch).max())

    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    print(f"FLUX.2 VAE decode, {args.size}x{args.size}, batch 1, fp32, random weights")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'framework':<22}{'first call s':>14}{'median s':>11}{'min s':>9}")
    print(f"{'lens_jax (JAX, NHWC)':<22}{first_jax:>14.2f}{jax_s:>11.2f}{min(jax_times):>9.2f}")
    print(f"{'diffusers (torch)':<22}{first_torch:>14.2f}{torch_s:>11.2f}{min(torch_times):>9.2f}")
    print(f"ratio JAX/torch (median): {jax_s / torch_s:.2f}   speedup torch/JAX: {torch_s / jax_s:.2f}x"
          f"   (min: {min(jax_times) / min(torch_times):.2f} / {min(torch_times) / min(jax_times):.2f}x)")
    print(f"max relative difference of the two decodes: {err:.2e}")


if __name__ == "__main__":
    main()
