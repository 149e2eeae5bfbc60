"""Can the demo's denoiser attend to its neighbours? Trained on a purely spatial task, it must.

    .venv/bin/python benchmarks/demo_spatial_task.py [--task neighbours|right|own] [--steps 1500] \
        [--set FIELD=VALUE ...]

The denoiser of ``configs/demo.py`` (with ``--set``, any ``model`` field, e.g.
``--set in_channels=24 --set out_channels=6``) is trained with Adam to map random ``[B, h*w, C]``
inputs (an 8x8 grid, sigma 0.5, random caption features) to:
- ``neighbours``: each token's output = the mean of its 4 neighbours' inputs (zero outside the grid);
- ``right``: the input of the token to its right;
- ``own``: its own input (a per-token control).
A token's own input says nothing of its neighbours', so a model that predicts each token from
itself and the caption (what the demo's trained models do: docs/demo.md "Towards shapes", trial 6)
cannot beat predicting 0 on the first two tasks. Prints the loss against that baseline; loss /
baseline near 0 means the blocks' attention and RoPE positions let a token read its neighbours.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GRID = 8


def shifted(grid, task: str):
    """``[B, h, w, C]`` -> the task's target, same shape."""
    import jax.numpy as jnp

    padded = jnp.pad(grid, ((0, 0), (1, 1), (1, 1), (0, 0)))
    up, down = padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]
    left, right = padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]
    if task == "neighbours":
        return (up + down + left + right) / 4
    if task == "right":
        return right
    return grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("neighbours", "right", "own"), default="neighbours",
                   help="target at each token: the mean of its 4 neighbours' inputs (default), the "
                   "right neighbour's input, or its own input (a per-token control)")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps (default 1500)")
    p.add_argument("--batch", type=int, default=16, help="grids per step (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model field of configs/demo.py, e.g. --set num_attention_heads=2 "
                   "(repeatable; default in_channels=24, out_channels=6 as docs/demo.md's trials)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from lens_jax.models.transformer import LensTransformer
    from lens_jax.train import config_files

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    demo_config = os.path.join(repo, "configs", "demo.py")
    overrides = ["--config.model.in_channels=24", "--config.model.out_channels=6"]
    try:  # lens-train's own --config.FIELD=VALUE parsing (types, a typo named with its nearest fields)
        cfg = config_files.load(demo_config,
                                overrides + [f"--config.model.{item}" for item in args.set]).model
    except ValueError as e:
        p.error(str(e))
    channels = cfg.in_channels
    if cfg.patch_size ** 2 * cfg.out_channels != channels:
        p.error(f"output width patch_size^2 * out_channels = {cfg.patch_size ** 2 * cfg.out_channels} "
                f"must equal in_channels = {channels} for these tasks")

    graph, params = nnx.split(LensTransformer(cfg, rngs=nnx.Rngs(0)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 50, args.steps, args.lr / 10)
    opt = optax.adam(schedule)
    opt_state = opt.init(params)

    def target(x):
        return shifted(x.reshape(-1, GRID, GRID, channels), args.task).reshape(x.shape)

    def loss_fn(params, x, feats):
        out = nnx.merge(graph, params)(x, feats, jnp.full((x.shape[0],), 0.5), (GRID, GRID))
        return jnp.mean((out - target(x)) ** 2)

    @jax.jit
    def step(params, opt_state, key):
        k_x, k_t = jax.random.split(key)
        x = jax.random.normal(k_x, (args.batch, GRID * GRID, channels))
        feats = [jax.random.normal(jax.random.fold_in(k_t, j), (args.batch, 4, cfg.enc_hidden_dim))
                 for j in range(len(cfg.selected_layer_index))]
        loss, grads = jax.value_and_grad(loss_fn)(params, x, feats)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    probe = jax.random.normal(jax.random.PRNGKey(9), (256, GRID * GRID, channels))
    baseline = float(jnp.mean(target(probe) ** 2))  # the loss of predicting 0
    print(f"task {args.task}: {cfg.num_layers} blocks, {cfg.num_attention_heads} heads of "
          f"{cfg.attention_head_dim}, {channels} channels, {GRID}x{GRID} grid; predict-0 loss {baseline:.4f}")
    key, start, recent = jax.random.PRNGKey(0), time.perf_counter(), []
    for i in range(args.steps):
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, sub)
        recent = (recent + [float(loss)])[-50:]
        if (i + 1) % 250 == 0 or i + 1 == args.steps:
            mean = float(np.mean(recent))
            print(f"step {i + 1}: loss {mean:.4f} (mean of the last {len(recent)}), loss / predict-0 "
                  f"{mean / baseline:.3f}, {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
