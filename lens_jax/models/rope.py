"""3-axis rotary position embedding of the Lens denoiser (spec 1.6), as pure functions.

Positions are integer triples (frame, height, width), made by ``lens_jax.models.positions``
(numpy only, so that the data pipeline's worker processes never import jax). Angles are
computed in float32 on the fly; nothing is stored in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


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
