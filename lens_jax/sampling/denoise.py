"""The whole denoising loop as one jitted computation (``lax.fori_loop`` over the steps).

``denoise(model, noise, features, mask, sigmas, guidance_scale, latent_hw)`` runs N Euler steps of
the Lens flow-matching sampler: per step one forward of the denoiser (a doubled, interleaved
[cond, uncond] batch when ``guidance_scale != 1``), guidance (spec 2.5) and the float32 Euler
update (spec 2.3). Step count, shapes, the CFG on/off choice and the mesh are compile-time
constants; the guidance scale and the sigmas are run-time values, so sweeping guidance or
changing the schedule does not recompile. ``initial_noise`` draws each image's starting noise
from its seed and global index only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lens_jax.models.transformer import LensTransformer
from lens_jax.sampling import guidance
from lens_jax.sampling.scheduler import euler_step, model_timestep
from lens_jax.sharding import use_rules

BATCH_AXIS = "data"
# Data parallelism only: every activation's batch axis on the mesh axis, parameters replicated.
SAMPLING_RULES = (("batch", BATCH_AXIS),)


def initial_noise(seed: int, indices: Sequence[int] | np.ndarray, num_tokens: int,
                  channels: int = 128, dtype=jnp.float32) -> jax.Array:
    """``[len(indices), num_tokens, channels]`` standard normal noise; row k depends only on
    ``(seed, indices[k])`` (key ``fold_in(key(seed), index)``), never on the rest of the batch."""
    seed = int(seed)
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    idx = jnp.asarray(np.asarray(indices, np.uint32))
    return _noise(jnp.asarray(seed, jnp.uint32), idx, int(num_tokens), int(channels),
                  jnp.dtype(dtype).name)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _noise(seed, indices, num_tokens, channels, dtype):
    key = jax.random.key(seed)
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), (num_tokens, channels), jnp.float32)
    return jax.vmap(draw)(indices).astype(dtype)


def _loop(graphdef, state, noise, features, mask, sigmas, guidance_scale, *, latent_hw, use_cfg,
          bf16_timesteps, num_train_timesteps):
    model = nnx.merge(graphdef, state)
    b = noise.shape[0]
    num_steps = sigmas.shape[0] - 1
    rows = 2 * b if use_cfg else b

    def step(i, x):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t = jnp.broadcast_to(model_timestep(sigma, num_train_timesteps, bf16_timesteps), (rows,))
        if use_cfg:
            v = model(guidance.interleave(x, x), features, t, latent_hw, mask)
            cond, uncond = guidance.split_interleaved(v)
            v = guidance.guide(cond, uncond, guidance_scale)
        else:
            v = model(x, features, t, latent_hw, mask)
        return euler_step(x, v, sigma, sigma_next).astype(x.dtype)

    return jax.lax.fori_loop(0, num_steps, step, noise)


@functools.partial(jax.jit, static_argnames=("graphdef", "latent_hw", "use_cfg", "bf16_timesteps",
                                             "num_train_timesteps", "mesh", "rules"))
def denoise_jit(graphdef, state, noise, features, mask, sigmas, guidance_scale, *, latent_hw,
                use_cfg, bf16_timesteps, num_train_timesteps, mesh, rules=SAMPLING_RULES):
    """The jitted loop ``denoise`` runs on ``nnx.split(model)`` (``sampling/compile.py`` lowers
    it ahead of time with the same arguments)."""
    kw = dict(latent_hw=latent_hw, use_cfg=use_cfg, bf16_timesteps=bf16_timesteps,
              num_train_timesteps=num_train_timesteps)
    if mesh is None:
        return _loop(graphdef, state, noise, features, mask, sigmas, guidance_scale, **kw)
    with use_rules(mesh, rules):
        out = _loop(graphdef, state, noise, features, mask, sigmas, guidance_scale, **kw)
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, PartitionSpec(BATCH_AXIS)))


def denoise(model: LensTransformer, noise: jax.Array, features: Sequence[jax.Array], mask: jax.Array,
            sigmas: np.ndarray | jax.Array, guidance_scale: float, latent_hw: tuple[int, int], *,
            neg_features: Sequence[jax.Array] | None = None, neg_mask: jax.Array | None = None,
            bf16_timesteps: bool = False, num_train_timesteps: int = 1000,
            mesh: Mesh | None = None, rules=SAMPLING_RULES) -> jax.Array:
    """Runs the sampler from ``noise [B, h*w, 128]`` to the final latents (same shape and dtype).

    ``features``: one ``[B, L, enc_dim]`` per selected encoder layer, ``mask [B, L]`` bool;
    ``sigmas``: N + 1 values ending in 0 (``scheduler.sigmas_for``). With ``guidance_scale != 1``
    the negative conditioning (``neg_features``/``neg_mask``, default: the empty negative prompt,
    zeros with an all-false mask) is used; at exactly 1 the unconditional half is skipped.
    ``bf16_timesteps``: feed the bf16-rounded time of the bf16 reference (spec 2.4).
    ``mesh``: a 1-D mesh whose axis ``"data"`` shards the batch (B a multiple of its size).
    ``rules``: logical axis -> mesh axis inside the loop (default: the batch only; the model's
    parameters then stay as they are placed, e.g. ``placement.SHARDED_RULES`` for FSDP weights).
    """
    features = [jnp.asarray(f) for f in features]
    mask = jnp.asarray(mask).astype(bool)
    noise = jnp.asarray(noise)
    h, w = (int(v) for v in latent_hw)
    if noise.ndim != 3 or noise.shape[1] != h * w:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match latent_hw {(h, w)}")
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D array of N + 1 >= 2 values, got shape {sigmas.shape}")
    use_cfg = float(guidance_scale) != 1.0
    if use_cfg:
        if neg_features is None:
            neg_features, neg_mask = guidance.empty_negative(features, mask)
        elif neg_mask is None:
            raise ValueError("neg_features given without neg_mask")
        features, mask = guidance.cfg_conditioning(features, mask, [jnp.asarray(f) for f in neg_features],
                                                   jnp.asarray(neg_mask))
    if mesh is not None:
        if mesh.axis_names != (BATCH_AXIS,):
            raise ValueError(f"mesh axes {mesh.axis_names}: expected one axis named {BATCH_AXIS!r}")
        if noise.shape[0] % mesh.size:
            raise ValueError(f"batch {noise.shape[0]} is not a multiple of the {mesh.size} devices")
        batch = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
        noise, mask = jax.device_put(noise, batch), jax.device_put(mask, batch)
        features = [jax.device_put(f, batch) for f in features]
    graphdef, state = nnx.split(model)
    return denoise_jit(graphdef, state, noise, features, mask, sigmas,
                       jnp.asarray(guidance_scale, jnp.float32), latent_hw=(h, w), use_cfg=use_cfg,
                       bf16_timesteps=bool(bf16_timesteps),
                       num_train_timesteps=int(num_train_timesteps), mesh=mesh,
                       rules=tuple(rules))
