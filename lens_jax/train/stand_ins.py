"""The frozen stand-in encoders of the tiny configs, as pure functions: a fixed DCT patch projection
instead of the VAE (``image_encoder.kind="dct"``) and a frozen random embedding table per selected
layer instead of GPT-OSS (``text_encoder.kind="embedding"``). Used inside the jitted step
(``lens_jax.train.encoders``) and by the sample grids."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.data.buckets import PATCH  # pixels per latent token side (8x VAE x 2x2 patchify)



def _frequencies(patch: int) -> list[tuple[int, int]]:
    """The 2-D DCT frequencies ``(u, v)`` of a patch in ``dct_basis``'s column order."""
    return sorted(((u, v) for u in range(patch) for v in range(patch)), key=lambda f: (f[0] + f[1], f))

def dct_basis(out_channels: int = 128, patch: int = PATCH) -> np.ndarray:
    """``[patch*patch*3, out_channels]`` orthonormal columns: the lowest-frequency 2-D DCT-II basis
    functions of a patch, per colour channel, ordered by (u + v, u, v, channel).

    Rows follow the pipeline's patch layout ``(py, px, c)``. A stand-in for the VAE encoder: flat
    colour is represented exactly (DC), edges are low-passed; ``basis.T`` inverts it on its span.
    """
    k = np.arange(patch)
    dct = np.sqrt(2.0 / patch) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * patch))
    dct[0] /= np.sqrt(2.0)  # [freq, pixel], orthonormal rows
    freqs = _frequencies(patch)
    columns = []
    for u, v in freqs:
        for c in range(3):
            basis = np.zeros((patch, patch, 3))
            basis[:, :, c] = np.outer(dct[u], dct[v])
            columns.append(basis.reshape(-1))
            if len(columns) == out_channels:
                return np.stack(columns, axis=1).astype(np.float32)
    raise ValueError(f"out_channels {out_channels} > {3 * patch * patch}")

def dct_frequency(out_channels: int, patch: int = PATCH) -> np.ndarray:
    """``[out_channels]`` ``u + v`` of each column of ``dct_basis`` (0 for the DC columns)."""
    freqs = _frequencies(patch)
    if out_channels > 3 * len(freqs):
        raise ValueError(f"out_channels {out_channels} > {3 * len(freqs)}")
    return np.asarray([u + v for u, v in freqs for _ in range(3)][:out_channels], np.float32)

def dct_scales(out_channels: int, scale: float, freq_exponent: float = 0.0) -> np.ndarray:
    """``[out_channels]`` multiplier of each DCT coefficient: ``scale * (1 + u + v) ** freq_exponent``.

    The coefficients of a shape's edges fall off roughly as ``(u + v) ** -1.15`` (measured on
    synth-shapes renders, docs/demo.md "Towards shapes"); with one scale for all, the higher
    frequencies sit far below the unit noise of flow matching, and the model's small errors on
    them decode to loud patch noise. ``freq_exponent`` lifts them towards unit variance, as the
    FLUX.2 VAE normalises its latents per channel (0: one scale for all).
    """
    return (float(scale) * (1.0 + dct_frequency(out_channels)) ** float(freq_exponent)).astype(np.float32)

def patches_to_latents(patches: jax.Array, basis: jax.Array, scale: float | jax.Array) -> jax.Array:
    """``[B, N, 768]`` pixel patches in [-1, 1] -> ``[B, N, C]`` stand-in latent tokens (``scale``:
    a float or the ``[C]`` of ``dct_scales``)."""
    return jnp.einsum("bnp,pc->bnc", patches.astype(jnp.float32), basis) * scale

def latents_to_patches(latents: jax.Array, basis: jax.Array, scale: float | jax.Array) -> jax.Array:
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

