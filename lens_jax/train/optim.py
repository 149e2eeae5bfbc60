"""AdamW with warmup + constant/cosine learning rate, global-norm clipping, weight-decay mask, EMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then constant or cosine decay."""
    warmup = max(int(opt.warmup_steps), 0)
    if opt.schedule == "constant":
        after = optax.constant_schedule(opt.lr)
    elif opt.schedule == "cosine":
        decay = int(opt.decay_steps) or max(int(num_steps) - warmup, 1)
        after = optax.cosine_decay_schedule(opt.lr, decay, alpha=float(opt.end_lr_factor))
    else:
        raise ValueError(f"config.optimizer.schedule={opt.schedule!r}: expected constant|cosine")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), after], [warmup])


def decay_mask(params) -> dict:
    """True for leaves that get weight decay: matmul kernels; not norm scales, not biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer (clip -> AdamW with decay mask) and its learning-rate schedule."""
    schedule = learning_rate_schedule(opt, num_steps)
    parts = []
    if opt.grad_clip and opt.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps),
                             weight_decay=float(opt.weight_decay), mask=decay_mask))
    return optax.chain(*parts), schedule


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """Decay for the EMA update after optimizer step ``step`` (0-based)."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    t = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def ema_update(ema, params, decay: jax.Array):
    """``ema <- decay * ema + (1 - decay) * params`` (float32)."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype),
                        ema, params)
