"""3-axis rotary position embedding of the Lens denoiser (spec 1.6), as pure functions.

Positions are integer triples (frame, height, width). An image of ``h x w`` latent tokens has
its rows and columns centred: row r sits at ``r - (h - h//2)``, column q at ``q - (w - w//2)``,
frame 0. Its caption token j sits at ``m + j`` on all three axes, ``m = max(h//2, w//2)``.
Angles are computed in float32 on the fly; nothing is stored in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def image_positions(h: int, w: int) -> np.ndarray:
    """``[h*w, 3]`` int32 (frame, row, column) positions of an ``h x w`` latent grid, row-major."""
    rows = np.arange(h, dtype=np.int32) - (h - h // 2)
    cols = np.arange(w, dtype=np.int32) - (w - w // 2)
    grid_r, grid_c = np.meshgrid(rows, cols, indexing="ij")
    frame = np.zeros_like(grid_r)
    return np.stack([frame, grid_r, grid_c], axis=-1).reshape(h * w, 3)


def text_positions(h: int, w: int, num_text: int) -> np.ndarray:
    """``[num_text, 3]`` int32 positions of the caption tokens of an ``h x w`` image."""
    start = max(h // 2, w // 2)
    pos = np.arange(start, start + num_text, dtype=np.int32)
    return np.repeat(pos[:, None], 3, axis=1)


def axis_frequencies(axes_dims: Sequence[int], theta: float) -> list[np.ndarray]:
    """Per axis of size d: ``1 / theta^(2k/d)``, k = 0..d/2-1 (float64, cast by the caller)."""
    return [1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in axes_dims]


def rope_angles(positions: jnp.ndarray, axes_dims: Sequence[int], theta: float) -> jnp.ndarray:
    """``[..., 3]`` integer positions -> ``[..., sum(axes_dims)/2]`` float32 angles."""
    parts = []
    for axis, freqs in enumerate(axis_frequencies(axes_dims, theta)):
        pos = positions[..., axis].astype(jnp.float32)[..., None]
        parts.append(pos * jnp.asarray(freqs, jnp.float32))
    return jnp.concatenate(parts, axis=-1)


def apply_rope(x: jnp.ndarray, angles: jnp.ndarray) -> jnp.ndarray:
    """Rotates channel pairs (2i, 2i+1) of ``x [B, N, H, D]`` by ``angles [B, N, D/2]``.

    ``out[2i] = x[2i] cos - x[2i+1] sin``, ``out[2i+1] = x[2i] sin + x[2i+1] cos``, in float32,
    cast back to the input dtype.
    """
    xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    even, odd = xf[..., 0], xf[..., 1]
    out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
