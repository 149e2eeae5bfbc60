"""Test-only peer for the VAE: diffusers' ``AutoencoderKLFlux2`` with every tensor random.

Also the reference Lens latent math written with torch on NCHW tensors, following the spec
(2.2, 2.6, 3.4) and diffusers' FLUX.2 pipeline helpers.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

TINY_CONFIG = dict(
    block_out_channels=(16, 32, 32, 32),  # four stages: downsample factor 8, like FLUX.2
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=8,
)
NUM_BATCHES_TRACKED = 12345


def random_diffusers_vae(seed: int = 0, **config) -> AutoencoderKLFlux2:
    """A diffusers VAE in eval mode with every tensor random (no zeros, no identity).

    Convs and linears keep torch's random default init; GroupNorm weights are ``1 + 0.1 N``,
    biases ``0.1 N``; bn mean ``0.5 N``, bn var ``U(0.5, 2)``; num_batches_tracked a fixed int.
    """
    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(**config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
        n = model.bn.running_mean.shape[0]
        model.bn.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
        model.bn.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
        model.bn.num_batches_tracked.fill_(NUM_BATCHES_TRACKED)
    return model


def nhwc_to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).float().numpy()


def _bn_std(model: AutoencoderKLFlux2) -> tuple[torch.Tensor, torch.Tensor]:
    mean = model.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
    return mean, std


@torch.no_grad()
def reference_image_to_latents(model: AutoencoderKLFlux2, images_nhwc: np.ndarray) -> np.ndarray:
    """Images -> posterior mean -> patchify -> bn-normalize -> pack ``[B, h*w, 128]``."""
    z = model.encode(nhwc_to_nchw(images_nhwc)).latent_dist.mode()
    x = Flux2Pipeline._patchify_latents(z)
    mean, std = _bn_std(model)
    x = (x - mean) / std
    return Flux2Pipeline._pack_latents(x).numpy()


@torch.no_grad()
def reference_latents_to_image(model: AutoencoderKLFlux2, tokens: np.ndarray,
                               latent_hw: tuple[int, int]) -> np.ndarray:
    """Tokens -> unpack -> de-normalize -> unpatchify -> decode, NHWC in ~[-1, 1]."""
    h, w = latent_hw
    t = torch.from_numpy(np.asarray(tokens, np.float32))
    b, _, c = t.shape
    x = t.permute(0, 2, 1).reshape(b, c, h, w)
    mean, std = _bn_std(model)
    z = Flux2Pipeline._unpatchify_latents(x * std + mean)
    return nchw_to_nhwc(model.decode(z).sample)
