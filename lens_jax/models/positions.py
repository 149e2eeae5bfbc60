"""Token positions of the Lens denoiser's 3-axis RoPE (spec 1.6), in numpy only.

Positions are integer triples (frame, height, width). An image of ``h x w`` latent tokens has
its rows and columns centred: row r sits at ``r - (h - h//2)``, column q at ``q - (w - w//2)``,
frame 0. Its caption token j sits at ``m + j`` on all three axes, ``m = max(h//2, w//2)``.
The data pipeline packs these (``lens_jax.data.packing``, in grain worker processes without
jax); the denoiser turns them into angles (``lens_jax.models.rope``).
"""

from __future__ import annotations

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
