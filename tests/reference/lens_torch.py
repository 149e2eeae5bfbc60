"""An independent PyTorch reading of the Lens denoiser spec (LENS_SPEC.md section 1), test-only.

Module names follow diffusers' ``LensTransformer2DModel`` so that ``state_dict()`` keys are the
checkpoint keys (``load_state_dict(strict=True)`` proves the converter covers every tensor).
Written straight from the spec, deliberately in the reference's own style (complex RoPE tables,
additive ``-inf`` key mask, fused QKV viewed as ``[..., 3, heads, head_dim]``), not from the JAX code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)


class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)

    def forward(self, timestep, dtype):
        half = 128
        exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=timestep.device) / half
        emb = timestep[:, None].float() * torch.exp(exponent)[None, :]
        emb = 1000 * emb
        emb = torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)  # flip_sin_to_cos
        e = self.timestep_embedder
        return e.linear_2(F.silu(e.linear_1(emb.to(dtype))))


class GateMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_axis_table(d: int, positions: torch.Tensor) -> torch.Tensor:
    freqs = 1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d)
    angles = torch.outer(positions.to(torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)  # complex64 [N, d/2]


def image_rope(h: int, w: int, axes=(8, 28, 28), device=None) -> torch.Tensor:
    """Complex factors [h*w, head_dim/2]: frame 0, centred rows and columns."""
    rows = torch.arange(h, device=device) - (h - h // 2)
    cols = torch.arange(w, device=device) - (w - w // 2)
    f = rope_axis_table(axes[0], torch.zeros(1, device=device))[0]                      # [4]
    hr = rope_axis_table(axes[1], rows)                                   # [h, 14]
    wc = rope_axis_table(axes[2], cols)                                   # [w, 14]
    f = f[None, None].expand(h, w, -1)
    hr = hr[:, None].expand(h, w, -1)
    wc = wc[None, :].expand(h, w, -1)
    return torch.cat([f, hr, wc], dim=-1).reshape(h * w, -1)


def text_rope(h: int, w: int, n: int, axes=(8, 28, 28), device=None) -> torch.Tensor:
    start = max(h // 2, w // 2)
    pos = torch.arange(start, start + n, device=device)
    return torch.cat([rope_axis_table(d, pos) for d in axes], dim=-1)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, D]; freqs complex [N, D/2]; pairs (2i, 2i+1) as complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3)
    return out.type_as(x)


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.img_qkv = nn.Linear(dim, 3 * dim)
        self.txt_qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.norm_added_q = RMSNorm(head_dim, eps)
        self.norm_added_k = RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.to_add_out = nn.Linear(dim, dim)

    def forward(self, xa, ca, img_freqs, txt_freqs, mask):
        b, n_img, _ = xa.shape
        qi, ki, vi = self.img_qkv(xa).view(b, n_img, 3, self.heads, self.head_dim).unbind(2)
        qt, kt, vt = self.txt_qkv(ca).view(b, ca.shape[1], 3, self.heads, self.head_dim).unbind(2)
        qi, ki = self.norm_q(qi), self.norm_k(ki)
        qt, kt = self.norm_added_q(qt), self.norm_added_k(kt)
        qi, ki = apply_rotary(qi, img_freqs), apply_rotary(ki, img_freqs)
        if ca.shape[1] > 0:
            qt, kt = apply_rotary(qt, txt_freqs), apply_rotary(kt, txt_freqs)
        q = torch.cat([qi, qt], 1).transpose(1, 2)
        k = torch.cat([ki, kt], 1).transpose(1, 2)
        v = torch.cat([vi, vt], 1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim).to(q.dtype)
        return self.to_out[0](out[:, :n_img]), self.to_add_out(out[:, n_img:])


class Block(nn.Module):
    def __init__(self, dim, heads, head_dim, hidden, eps=1e-6):
        super().__init__()
        self.attn = JointAttention(dim, heads, head_dim, eps)
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1, self.img_norm2 = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.txt_norm1, self.txt_norm2 = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.img_mlp = GateMLP(dim, hidden)
        self.txt_mlp = GateMLP(dim, hidden)

    def forward(self, x, c, temb, img_freqs, txt_freqs, mask):
        mi = self.img_mod(temb)[:, None].chunk(6, dim=-1)
        mt = self.txt_mod(temb)[:, None].chunk(6, dim=-1)
        xa = self.img_norm1(x) * (1 + mi[1]) + mi[0]
        ca = self.txt_norm1(c) * (1 + mt[1]) + mt[0]
        ai, at = self.attn(xa, ca, img_freqs, txt_freqs, mask)
        x = x + mi[2] * ai
        c = c + mt[2] * at
        x = x + mi[5] * self.img_mlp(self.img_norm2(x) * (1 + mi[4]) + mi[3])
        c = c + mt[5] * self.txt_mlp(self.txt_norm2(c) * (1 + mt[4]) + mt[3])
        return c, x


class NormOut(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)


class LensTransformerReference(nn.Module):
    """Spec section 1 in PyTorch; ``forward(hidden_states, feats, mask, timestep, (h, w))``."""

    def __init__(self, num_layers=48, heads=24, head_dim=64, in_channels=128, out_channels=32,
                 patch_size=2, enc_hidden_dim=2880, num_features=4, axes_dims_rope=(8, 28, 28)):
        super().__init__()
        dim = heads * head_dim
        hidden = int(dim / 3 * 8)
        self.axes = tuple(axes_dims_rope)
        self.time_text_embed = TimeTextEmbed(dim)
        self.txt_norm = nn.ModuleList([RMSNorm(enc_hidden_dim, 1e-5) for _ in range(num_features)])
        self.txt_in = nn.Linear(num_features * enc_hidden_dim, dim)
        self.img_in = nn.Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [Block(dim, heads, head_dim, hidden) for _ in range(num_layers)])
        self.norm_out = NormOut(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                latent_hw):
        h, w = latent_hw
        b, n_img, _ = hidden_states.shape
        n_txt = encoder_hidden_states[0].shape[1]
        mask = None
        if encoder_hidden_states_mask is not None:
            valid = torch.cat([torch.ones(b, n_img, dtype=torch.bool, device=hidden_states.device),
                               encoder_hidden_states_mask], 1)
            mask = torch.zeros(b, 1, 1, n_img + n_txt, dtype=hidden_states.dtype, device=hidden_states.device)
            mask = mask.masked_fill(~valid[:, None, None, :], float("-inf"))
        x = self.img_in(hidden_states)
        timestep = timestep.to(hidden_states.dtype)
        c = self.txt_in(torch.cat([n(f) for n, f in zip(self.txt_norm, encoder_hidden_states)], -1)
                        .to(hidden_states.dtype))
        temb = self.time_text_embed(timestep, hidden_states.dtype)
        img_freqs = image_rope(h, w, self.axes, hidden_states.device)
        txt_freqs = text_rope(h, w, n_txt, self.axes, hidden_states.device)
        for block in self.transformer_blocks:
            c, x = block(x, c, temb, img_freqs, txt_freqs, mask)
        scale, shift = self.norm_out.linear(F.silu(temb)).chunk(2, dim=-1)
        x = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return self.proj_out(x)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every tensor random: weights ~ N(0, 1/fan_in)-ish, biases and norm scales ~ N(mean, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model
