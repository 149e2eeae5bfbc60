"""Classifier-free guidance as Lens does it (spec 2.5) and the text conditioning it needs (spec 2.1).

Per step the conditional and unconditional predictions come from ONE batched forward. Here the
2B rows are interleaved (``[c0, u0, c1, u1, ...]``) rather than stacked (``[c; u]`` as in the
reference): every row is independent, so the result is the same, and with the batch sharded over
devices each device keeps the conditional and unconditional rows of its own images (no
cross-device traffic to form the doubled batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

NORM_FLOOR = 1e-12


def guide(cond: jax.Array, uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
    """``uncond + g (cond - uncond)`` rescaled per token to the conditional prediction's norm.

    Norms are L2 over the last (channel) axis; a token whose guided prediction has zero norm is left
    unscaled. Computed in the predictions' dtype (norms accumulated in float32).
    """
    dtype = cond.dtype
    g = jnp.asarray(scale, jnp.float32).astype(dtype)
    combined = uncond + g * (cond - uncond)
    cond_norm = jnp.linalg.norm(cond.astype(jnp.float32), axis=-1, keepdims=True).astype(dtype)
    comb_norm = jnp.linalg.norm(combined.astype(jnp.float32), axis=-1, keepdims=True).astype(dtype)
    ratio = cond_norm / jnp.maximum(comb_norm, jnp.asarray(NORM_FLOOR, dtype))
    ratio = jnp.where(comb_norm > 0, ratio, jnp.ones_like(ratio))
    return combined * ratio


def empty_negative(features: Sequence[jax.Array], mask: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """The conditioning of an empty negative prompt: zero features and an all-false mask (spec 2.1.6)."""
    return [jnp.zeros_like(f) for f in features], jnp.zeros(mask.shape, bool)


def pad_text(features: Sequence[jax.Array], mask: jax.Array, length: int
             ) -> tuple[list[jax.Array], jax.Array]:
    """Right-pads features ``[B, L, D]`` with zeros and the mask with False to ``length`` tokens."""
    extra = length - mask.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {mask.shape[1]} text tokens down to {length}")
    if extra == 0:
        return list(features), mask
    features = [jnp.pad(f, ((0, 0), (0, extra), (0, 0))) for f in features]
    return features, jnp.pad(mask, ((0, 0), (0, extra)), constant_values=False)


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """``[B, ...]`` and ``[B, ...]`` -> ``[2B, ...]`` as ``a0, b0, a1, b1, ...``."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def split_interleaved(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of ``interleave``: ``[2B, ...]`` -> (even rows, odd rows)."""
    pairs = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def cfg_conditioning(features: Sequence[jax.Array], mask: jax.Array,
                     neg_features: Sequence[jax.Array], neg_mask: jax.Array
                     ) -> tuple[list[jax.Array], jax.Array]:
    """Positive and negative conditioning padded to one length and interleaved: ``[2B, L, D]``."""
    length = max(mask.shape[1], neg_mask.shape[1])
    features, mask = pad_text(features, mask, length)
    neg_features, neg_mask = pad_text(neg_features, neg_mask, length)
    if len(features) != len(neg_features):
        raise ValueError(f"{len(features)} positive vs {len(neg_features)} negative feature tensors")
    return ([interleave(f, n.astype(f.dtype)) for f, n in zip(features, neg_features)],
            interleave(mask.astype(bool), neg_mask.astype(bool)))
