"""Held-out loss at fixed sigmas: ``python -m lens_jax.train.evaluate --workdir DIR --data PATH``.

For each checkpoint step (0 = the run's initial weights, rebuilt from its config and seed) and each
sigma in ``--sigmas``, the mean per-image flow-matching loss over the first ``--batches`` batches of
the held-out records (no shuffle, no caption dropout, fixed noise), with the raw or EMA weights.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def heldout_batches(config: ml_collections.ConfigDict, path: str, num_batches: int) -> list[dict]:
    from lens_jax.data.pipeline import make_pipeline

    data = ml_collections.ConfigDict(config.data.to_dict())
    data.path, data.shuffle, data.caption_dropout, data.num_epochs, data.worker_count = path, False, 0.0, 1, 0
    it = make_pipeline(data, mesh=None)
    out = []
    try:
        for _ in range(num_batches):
            try:
                out.append({k: np.asarray(v) for k, v in next(it).items()})
            except StopIteration:
                break
    finally:
        it.close()
    return out


def heldout_losses(trainer, params, batches: list[dict], sigmas, seed: int = 0) -> dict[float, float]:
    """``{sigma: mean per-image loss}`` (every image at that sigma; same noise for every call)."""
    from lens_jax.train import objective
    from lens_jax.train.encoders import encode_inputs

    config = trainer.config

    @jax.jit
    def losses(params, batch, sigma, key):
        latents, feats = encode_inputs(config, trainer.frozen, batch, trainer.preamble)
        fixed = jnp.full(batch["segment_valid"].shape, sigma, jnp.float32)
        total, m = objective.packed_loss(trainer.apply_fn, params, batch, latents, feats, key,
                                         sigma=fixed)
        return total, m["images"]

    batches = [trainer.prepare_batch(b) for b in batches]   # text_encoder.cache_features
    out = {}
    for sigma in sigmas:
        total, images = 0.0, 0.0
        for i, batch in enumerate(batches):
            key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            t, n = losses(params, batch, jnp.float32(sigma), key)
            total, images = total + float(t), images + float(n)
        out[float(sigma)] = total / max(images, 1.0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", required=True, help="training run directory")
    p.add_argument("--data", required=True, help="held-out records (folder / glob / tfds: spec)")
    p.add_argument("--steps", default="0,last", help="comma-separated steps; 0 = initial weights, 'last' = newest")
    p.add_argument("--sigmas", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--batches", type=int, default=8, help="held-out batches (rows_per_host rows each)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights instead of the raw ones")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    from lens_jax.train.export import restore_weights
    from lens_jax.train.run_files import run_config
    from lens_jax.train.trainer import Trainer

    config = run_config(args.workdir)
    config.mesh.num_devices = 1
    config.mesh.update(slice=1, data=1, fsdp=1, tensor=1)
    trainer = Trainer(config)
    batches = heldout_batches(config, args.data, args.batches)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    results = {}
    for token in args.steps.split(","):
        if token == "0":
            step, params = 0, jax.device_get(trainer.init_state()["params"])
        else:
            params, step, _ = restore_weights(args.workdir, -1 if token == "last" else int(token), args.ema)
        losses = heldout_losses(trainer, jax.device_put(params, trainer.replicated), batches, sigmas)
        results[step] = losses
        mean = float(np.mean(list(losses.values())))
        print(f"step {step:>6}: " + "  ".join(f"sigma {s:.1f}: {l:.4f}" for s, l in losses.items())
              + f"  mean {mean:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): {str(s): l for s, l in v.items()} for k, v in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
