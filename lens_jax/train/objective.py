"""The training objective as pure functions: flow matching on packed rows (spec 5).

``x_sigma = (1 - sigma) x0 + sigma * noise``, target velocity ``noise - x0``, sigma per image drawn
logit-normal with a location linear in the image's token count. The loss is a mean over images:
each image's squared error is averaged over its own tokens and channels first, so an image counts
once whatever its size. Also here: the frozen stand-in encoders of the tiny config (a fixed DCT
patch projection instead of the VAE, a frozen random embedding table instead of GPT-OSS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PATCH = 16          # pixels per latent token side (8x VAE x 2x2 patchify)
PATCH_DIM = PATCH * PATCH * 3


# ----------------------------------------------------------------------------- timesteps

def sigma_location(num_image_tokens: jax.Array, loc: Sequence[float] = (1.0, 1.3),
                   tokens: Sequence[int] = (256, 4096)) -> jax.Array:
    """Logit-normal location, linear in the token count: ``loc[0]`` at ``tokens[0]``, ``loc[1]`` at
    ``tokens[1]`` (spec 5: ``1.0 + 0.3 (n - 256) / 3840``; 1.06 at 512^2 = 1024 tokens)."""
    n = num_image_tokens.astype(jnp.float32)
    return loc[0] + (loc[1] - loc[0]) * (n - tokens[0]) / (tokens[1] - tokens[0])


def sample_sigmas(key: jax.Array, num_image_tokens: jax.Array, valid: jax.Array,
                  loc: Sequence[float] = (1.0, 1.3), tokens: Sequence[int] = (256, 4096),
                  scale: float = 1.0) -> jax.Array:
    """``[B, K]`` sigmas ``sigmoid(mu(n) + scale z)``, 0 for empty slots."""
    z = jax.random.normal(key, num_image_tokens.shape, jnp.float32)
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


# ----------------------------------------------------------------------------- stand-in encoders

def dct_basis(out_channels: int = 128, patch: int = PATCH) -> np.ndarray:
    """``[patch*patch*3, out_channels]`` orthonormal columns: the lowest-frequency 2-D DCT-II basis
    functions of a patch, per colour channel, ordered by (u + v, u, v, channel).

    Rows follow the pipeline's patch layout ``(py, px, c)``. A stand-in for the VAE encoder: flat
    colour is represented exactly (DC), edges are low-passed; ``basis.T`` inverts it on its span.
    """
    k = np.arange(patch)
    dct = np.sqrt(2.0 / patch) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * patch))
    dct[0] /= np.sqrt(2.0)  # [freq, pixel], orthonormal rows
    freqs = sorted(((u, v) for u in range(patch) for v in range(patch)), key=lambda f: (f[0] + f[1], f))
    columns = []
    for u, v in freqs:
        for c in range(3):
            basis = np.zeros((patch, patch, 3))
            basis[:, :, c] = np.outer(dct[u], dct[v])
            columns.append(basis.reshape(-1))
            if len(columns) == out_channels:
                return np.stack(columns, axis=1).astype(np.float32)
    raise ValueError(f"out_channels {out_channels} > {3 * patch * patch}")


def patches_to_latents(patches: jax.Array, basis: jax.Array, scale: float) -> jax.Array:
    """``[B, N, 768]`` pixel patches in [-1, 1] -> ``[B, N, 128]`` stand-in latent tokens."""
    return jnp.einsum("bnp,pc->bnc", patches.astype(jnp.float32), basis) * scale


def latents_to_patches(latents: jax.Array, basis: jax.Array, scale: float) -> jax.Array:
    """Inverse of ``patches_to_latents`` on the basis' span (low-passed pixels)."""
    return jnp.einsum("bnc,pc->bnp", latents.astype(jnp.float32) / scale, basis)


def denoiser_text_ids(caption_ids: jax.Array, text_index: jax.Array, preamble: int) -> jax.Array:
    """``[B, Nt]`` ids of the packed text tokens: ``caption_ids[b, slot, preamble + j]``."""
    b, _, length = caption_ids.shape
    slot, j = text_index[..., 0], jnp.clip(text_index[..., 1] + preamble, 0, length - 1)
    return caption_ids[jnp.arange(b)[:, None], slot, j]


def embedding_features(tables: jax.Array, ids: jax.Array, text_segment_ids: jax.Array) -> list[jax.Array]:
    """Frozen random embedding stand-in for GPT-OSS: one ``[B, Nt, E]`` per table (zero at padding)."""
    ids = jnp.clip(ids, 0, tables.shape[1] - 1)
    keep = (text_segment_ids > 0)[..., None]
    return [jnp.where(keep, tables[i][ids], 0.0) for i in range(tables.shape[0])]


def gather_text_features(features: Sequence[jax.Array], text_index: jax.Array,
                         text_segment_ids: jax.Array, preamble: int, num_segments: int
                         ) -> list[jax.Array]:
    """Encoder features of every segment ``[B*K, L, E]`` -> packed text stream ``[B, Nt, E]``."""
    out = []
    for f in features:
        bk, length, e = f.shape
        f = f.reshape(bk // num_segments, num_segments, length, e)
        b = f.shape[0]
        j = jnp.clip(text_index[..., 1] + preamble, 0, length - 1)
        g = f[jnp.arange(b)[:, None], text_index[..., 0], j]
        out.append(jnp.where((text_segment_ids > 0)[..., None], g, 0.0))
    return out


# ----------------------------------------------------------------------------- the loss

def packed_loss(apply_fn: Callable, params, batch: dict, latents: jax.Array,
                text_features: Sequence[jax.Array], key: jax.Array, *,
                sigma_loc=(1.0, 1.3), sigma_tokens=(256, 4096), sigma_scale: float = 1.0,
                sigma_source: str = "device", sigma_buckets: Sequence[float] = (0.25, 0.5, 0.75)
                ) -> tuple[jax.Array, dict]:
    """Sum over valid images of the per-image flow-matching loss, and metrics sums.

    ``apply_fn(params, x_sigma, img_positions, img_segment_ids, text_features, text_positions,
    text_segment_ids, sigma [B, K]) -> velocity``. The caller divides by the global image count
    (so gradient accumulation and any sharding give the same mean over images).
    """
    valid = batch["segment_valid"]
    b, k = valid.shape
    # Randomness per row, keyed by the row's index in the global step batch: the same numbers
    # whatever the sharding and however the rows are split into accumulation micro-batches.
    rows = batch["row_index"] if "row_index" in batch else jnp.arange(b)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)
    key_sigma, key_noise = jax.vmap(jax.random.split, out_axes=1)(row_keys)
    if sigma_source == "pipeline":
        sigma = jnp.where(valid, batch["sigma"].astype(jnp.float32), 0.0)
    else:
        z = jax.vmap(lambda kk: jax.random.normal(kk, (k,), jnp.float32))(key_sigma)
        mu = sigma_location(batch["num_image_tokens"], sigma_loc, sigma_tokens)
        sigma = jnp.where(valid, jax.nn.sigmoid(mu + sigma_scale * z), 0.0)
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
