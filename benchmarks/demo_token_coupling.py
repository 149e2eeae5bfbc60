# How much a trained denoiser's output at one image token depends on the other tokens' inputs:
#   python benchmarks/demo_token_coupling.py DEMO_OUT/export/transformer [--grid 8 8] [--sigmas 0.9 0.5 0.2]
"""Token coupling of a denoiser (docs/demo.md "Towards shapes", issue 18).

Runs the denoiser on random latents and text features of a ``--grid`` image, then again with one
token's input moved by ``--delta`` on every channel, and prints, per sigma, the mean absolute change
of the output at that token, at its four neighbours, and at all other tokens. A model that draws
coherent shapes must let a token's prediction depend on its neighbours at mid sigma; uniform
attention over N tokens gives other tokens roughly 1/N of the token's own change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("transformer", help="a diffusers-format denoiser folder (demo: OUT/export/transformer)")
    parser.add_argument("--grid", type=int, nargs=2, default=(8, 8), metavar=("H", "W"),
                        help="latent grid in tokens (default 8 8: a 128x128 demo image)")
    parser.add_argument("--text-tokens", type=int, default=12, help="caption tokens (default 12)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=(0.9, 0.5, 0.2), help="noise levels")
    parser.add_argument("--delta", type=float, default=3.0, help="change of the probed token's input")
    args = parser.parse_args()

    import lens_jax

    model = lens_jax.load_transformer(args.transformer)
    cfg = model.config
    h, w = args.grid
    probe = (h // 2) * w + w // 2 - 1  # a token away from the border
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((1, h * w, cfg.in_channels)), jnp.float32)
    feats = [jnp.asarray(rng.standard_normal((1, args.text_tokens, cfg.enc_hidden_dim)), jnp.float32)
             for _ in cfg.selected_layer_index]
    moved = latents.at[0, probe].add(args.delta)
    print(f"{args.transformer}: {cfg.num_layers} blocks, width {cfg.num_attention_heads * cfg.attention_head_dim}, "
          f"rope_theta {cfg.rope_theta}; grid {h}x{w}, token {probe} moved by {args.delta} on all "
          f"{cfg.in_channels} channels\n")
    print("| sigma | own change | neighbours (mean of 4) | other tokens (mean) | other / own |")
    print("|---|---|---|---|---|")
    row, col = divmod(probe, w)
    neighbours = [(row - 1) * w + col, (row + 1) * w + col, row * w + col - 1, row * w + col + 1]
    for sigma in args.sigmas:
        t = jnp.asarray([sigma], jnp.float32)
        change = np.abs(np.asarray(model(moved, feats, t, (h, w))) - np.asarray(model(latents, feats, t, (h, w))))
        change = change.mean(-1)[0]  # [h*w]
        own, near = change[probe], change[neighbours].mean()
        other = np.delete(change, probe).mean()
        print(f"| {sigma} | {own:.3f} | {near:.4f} | {other:.4f} | {other / own:.4f} |")


if __name__ == "__main__":
    main()
