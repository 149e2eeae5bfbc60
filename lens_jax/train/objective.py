"""The training objective as pure functions: flow matching on packed rows (spec 5).

``x_sigma = (1 - sigma) x0 + sigma * noise``, target velocity ``noise - x0``, sigma per image drawn
logit-normal with a location linear in the image's token count. The loss is a mean over images:
each image's squared error is averaged over its own tokens and channels first, so an image counts
once whatever its size. The sigma sampler here is the project's only one (config section
``objective``); the stand-in encoders are in ``lens_jax.train.stand_ins``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------- timesteps

def sigma_location(num_image_tokens: jax.Array, loc: Sequence[float] = (1.0, 1.3),
                   tokens: Sequence[int] = (256, 4096)) -> jax.Array:
    """Logit-normal location, linear in the token count: ``loc[0]`` at ``tokens[0]``, ``loc[1]`` at
    ``tokens[1]`` (spec 5: ``1.0 + 0.3 (n - 256) / 3840``; 1.06 at 512^2 = 1024 tokens)."""
    n = num_image_tokens.astype(jnp.float32)
    return loc[0] + (loc[1] - loc[0]) * (n - tokens[0]) / (tokens[1] - tokens[0])


def sample_sigmas(row_keys: jax.Array, num_image_tokens: jax.Array, valid: jax.Array,
                  loc: Sequence[float] = (1.0, 1.3), tokens: Sequence[int] = (256, 4096),
                  scale: float = 1.0) -> jax.Array:
    """``[B, K]`` sigmas ``sigmoid(mu(n) + scale z)``, z standard normal drawn from each row's key
    (``row_keys [B]``, so a row's sigmas do not depend on the batch around it), 0 for empty slots."""
    k = num_image_tokens.shape[1]
    z = jax.vmap(lambda key: jax.random.normal(key, (k,), jnp.float32))(row_keys)
    sigma = jax.nn.sigmoid(sigma_location(num_image_tokens, loc, tokens) + scale * z)
    return jnp.where(valid, sigma, 0.0)


def per_token(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``[B, K]`` per-segment values -> ``[B, N]`` per token (0 at padding)."""
    index = jnp.clip(segment_ids - 1, 0, values.shape[1] - 1)
    out = jnp.take_along_axis(values, index, axis=1)
    return jnp.where(segment_ids > 0, out, 0.0)


def noised(x0: jax.Array, noise: jax.Array, sigma_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x_sigma, target)``: ``(1 - s) x0 + s noise`` and ``noise - x0``; sigma_tokens ``[B, N]``."""
    s = sigma_tokens[..., None]
    return (1.0 - s) * x0 + s * noise, noise - x0


def per_image_losses(pred: jax.Array, target: jax.Array, segment_ids: jax.Array,
                     num_segments: int) -> tuple[jax.Array, jax.Array]:
    """``([B, K] mean squared error of each image over its tokens and channels, [B, K] tokens)``."""
    err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    onehot = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)
    sums = jnp.einsum("bn,bnk->bk", err, onehot)
    counts = jnp.sum(onehot, axis=1)
    return sums / jnp.maximum(counts, 1.0), counts


# ----------------------------------------------------------------------------- the loss

def packed_loss(apply_fn: Callable, params, batch: dict, latents: jax.Array,
                text_features: Sequence[jax.Array], key: jax.Array, *,
                sigma_loc=(1.0, 1.3), sigma_tokens=(256, 4096), sigma_scale: float = 1.0,
                sigma_buckets: Sequence[float] = (0.25, 0.5, 0.75), sigma: jax.Array | None = None
                ) -> tuple[jax.Array, dict]:
    """Sum over valid images of the per-image flow-matching loss, and metrics sums.

    ``apply_fn(params, x_sigma, img_positions, img_segment_ids, text_features, text_positions,
    text_segment_ids, sigma [B, K]) -> velocity``. ``sigma`` ``[B, K]`` fixes the timesteps (held-out
    evaluation); by default they are drawn by ``sample_sigmas``. The caller divides by the global image count
    (so gradient accumulation and any sharding give the same mean over images).
    """
    valid = batch["segment_valid"]
    b, k = valid.shape
    # Randomness per row, keyed by the row's index in the global step batch: the same numbers
    # whatever the sharding and however the rows are split into accumulation micro-batches.
    rows = batch["row_index"] if "row_index" in batch else jnp.arange(b)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)
    key_sigma, key_noise = jax.vmap(jax.random.split, out_axes=1)(row_keys)
    if sigma is None:
        sigma = sample_sigmas(key_sigma, batch["num_image_tokens"], valid, sigma_loc, sigma_tokens,
                              sigma_scale)
    else:
        sigma = jnp.where(valid, sigma.astype(jnp.float32), 0.0)
    seg = batch["image_segment_ids"]
    x0 = latents.astype(jnp.float32)
    noise = jax.vmap(lambda kk: jax.random.normal(kk, x0.shape[1:], jnp.float32))(key_noise)
    x_sigma, target = noised(x0, noise, per_token(sigma, seg))
    pred = apply_fn(params, x_sigma, batch["image_positions"], seg, text_features,
                    batch["text_positions"], batch["text_segment_ids"], sigma)
    losses, _ = per_image_losses(pred, target, seg, k)
    losses = jnp.where(valid, losses, 0.0)
    validf = valid.astype(jnp.float32)
    edges = jnp.asarray((0.0,) + tuple(sigma_buckets) + (1.0 + 1e-6,), jnp.float32)
    in_bucket = ((sigma[..., None] >= edges[:-1]) & (sigma[..., None] < edges[1:])) & valid[..., None]
    metrics = {
        "loss_sum": jnp.sum(losses),
        "images": jnp.sum(validf),
        "bucket_loss_sum": jnp.sum(jnp.where(in_bucket, losses[..., None], 0.0), axis=(0, 1)),
        "bucket_images": jnp.sum(in_bucket.astype(jnp.float32), axis=(0, 1)),
        "image_tokens": jnp.sum((seg > 0).astype(jnp.float32)),
        "text_tokens": jnp.sum((batch["text_segment_ids"] > 0).astype(jnp.float32)),
    }
    return jnp.sum(losses), metrics
