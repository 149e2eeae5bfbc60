"""A PyTorch reading of the Lens sampler (LENS_SPEC.md 2.3-2.5), test-only.

Written from the spec's formulas in the reference pipeline's own shape: a Python loop of steps,
the CFG batch stacked as ``[cond; uncond]`` (``torch.cat``) and split with ``chunk(2)``, float64
Python arithmetic for mu, float32 numpy sigmas, the Euler update in float32. Not derived from
the JAX code.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def reference_mu(image_seq_len: int, num_steps: int) -> float:
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return a2 * image_seq_len + b2
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return a * num_steps + b


def reference_sigmas(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """N + 1 sigmas: linspace(1, 1/N, N) in float32, exponential shift, then a terminal zero."""
    mu = reference_mu(image_seq_len, num_steps)
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0) ** 1.0)
    sigmas = torch.from_numpy(np.asarray(shifted, np.float32))
    return torch.cat([sigmas, torch.zeros(1)])


def reference_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    comb = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    comb_norm = torch.norm(comb, dim=-1, keepdim=True)
    factor = torch.where(comb_norm > 0, cond_norm / comb_norm.clamp_min(1e-12),
                         torch.ones_like(comb_norm))
    return comb * factor


@torch.no_grad()
def reference_sample(model, noise: torch.Tensor, feats, mask: torch.Tensor, neg_feats, neg_mask,
                     guidance_scale: float, latent_hw, num_steps: int) -> torch.Tensor:
    """The reference loop: ``model(x, feats, mask, timestep, latent_hw)`` -> velocity."""
    h, w = latent_hw
    sigmas = reference_sigmas(num_steps, h * w)
    timesteps = sigmas[:-1] * 1000.0
    # Positive and negative conditioning right-padded to one length, stacked [positive; negative].
    length = max(mask.shape[1], neg_mask.shape[1])

    def pad(fs, m):
        extra = length - m.shape[1]
        fs = [torch.nn.functional.pad(f, (0, 0, 0, extra)) for f in fs]
        return fs, torch.nn.functional.pad(m, (0, extra), value=False)

    pf, pm = pad(feats, mask)
    nf, nm = pad(neg_feats, neg_mask)
    cfg_feats = [torch.cat([p, n], 0) for p, n in zip(pf, nf)]
    cfg_mask = torch.cat([pm, nm], 0)
    latents = noise.clone()
    for i, t in enumerate(timesteps):
        batch = torch.cat([latents, latents], 0)
        timestep = (t / 1000.0).expand(batch.shape[0])
        out = model(batch, cfg_feats, cfg_mask, timestep, (h, w))
        cond, uncond = out.chunk(2)
        v = reference_guidance(cond, uncond, guidance_scale)
        latents = (latents.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
    return latents
