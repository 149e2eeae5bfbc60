"""The Lens latent space (spec 2.2, 2.6, 3.4) as pure functions, channels-last.

A VAE latent ``z [B, 2h, 2w, 32]`` (1/8 of the image size) is patchified 2x2 into
``[B, h, w, 128]`` with channel ``c*4 + p1*2 + p2`` (pixel ``(2r + p1, 2q + p2)`` of channel c),
normalized per channel with the VAE batch-norm running statistics
``(x - mean) / sqrt(var + eps)``, and packed row-major into tokens ``[B, h*w, 128]``
(token ``r*w + q``). This normalized packed tensor is the denoiser's x0 space.
Every function here has its exact inverse.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PATCH = 2


def patchify(z: jax.Array) -> jax.Array:
    """``[B, 2h, 2w, C]`` -> ``[B, h, w, 4C]``, channel ``c*4 + p1*2 + p2``."""
    b, hh, ww, c = z.shape
    if hh % PATCH or ww % PATCH:
        raise ValueError(f"patchify needs an even latent height and width, got shape {tuple(z.shape)}")
    h, w = hh // PATCH, ww // PATCH
    x = z.reshape(b, h, PATCH, w, PATCH, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # [B, h, w, C, p1, p2]
    return x.reshape(b, h, w, c * PATCH * PATCH)


def unpatchify(x: jax.Array) -> jax.Array:
    """``[B, h, w, 4C]`` -> ``[B, 2h, 2w, C]`` (inverse of ``patchify``)."""
    b, h, w, cp = x.shape
    if cp % (PATCH * PATCH):
        raise ValueError(f"unpatchify needs channels divisible by 4, got shape {tuple(x.shape)}")
    c = cp // (PATCH * PATCH)
    z = x.reshape(b, h, w, c, PATCH, PATCH).transpose(0, 1, 4, 2, 5, 3)  # [B, h, p1, w, p2, C]
    return z.reshape(b, h * PATCH, w * PATCH, c)


def _std(var: jax.Array, eps: float) -> jax.Array:
    return jnp.sqrt(var.astype(jnp.float32) + eps)


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` per last-axis channel, in float32, cast back to ``x.dtype``."""
    y = (x.astype(jnp.float32) - mean.astype(jnp.float32)) / _std(var, eps)
    return y.astype(x.dtype)


def denormalize(x: jax.Array, mean: jax.Array, var: jax.Array, eps: float) -> jax.Array:
    """``x * sqrt(var + eps) + mean`` (inverse of ``normalize``)."""
    y = x.astype(jnp.float32) * _std(var, eps) + mean.astype(jnp.float32)
    return y.astype(x.dtype)


def pack(x: jax.Array) -> jax.Array:
    """``[B, h, w, C]`` -> tokens ``[B, h*w, C]`` (row-major, token ``r*w + q``)."""
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


def unpack(tokens: jax.Array, latent_hw: Sequence[int]) -> jax.Array:
    """Tokens ``[B, h*w, C]`` -> ``[B, h, w, C]`` (inverse of ``pack``)."""
    h, w = (int(v) for v in latent_hw)
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} latent tokens (tokens shape {tuple(tokens.shape)}) do not fill a "
                         f"latent grid of latent_hw=({h}, {w}) = {h * w} tokens")
    return tokens.reshape(b, h, w, c)


def latents_to_tokens(z: jax.Array, mean: jax.Array, var: jax.Array, eps: float) -> jax.Array:
    """VAE latent ``[B, 2h, 2w, C]`` -> normalized packed tokens ``[B, h*w, 4C]``."""
    return pack(normalize(patchify(z), mean, var, eps))


def tokens_to_latents(tokens: jax.Array, latent_hw: Sequence[int], mean: jax.Array,
                      var: jax.Array, eps: float) -> jax.Array:
    """Normalized packed tokens ``[B, h*w, 4C]`` -> VAE latent ``[B, 2h, 2w, C]``."""
    return unpatchify(denormalize(unpack(tokens, latent_hw), mean, var, eps))


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8, exactly as the Lens pipeline: clamp, ``(x + 1) * 127.5``, truncate.

    Computed in float32 (like the reference, which converts a float32 tensor with ``.to(uint8)``).
    """
    x = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    return ((x + np.float32(1.0)) * np.float32(127.5)).astype(np.uint8)
