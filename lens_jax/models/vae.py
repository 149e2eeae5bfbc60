"""The FLUX.2 VAE (diffusers ``AutoencoderKLFlux2``, spec 3.1-3.2) in Flax NNX, NHWC inside.

Modules hold parameters only; the math lives in pure functions (``group_norm``, ``conv``,
``resnet_block``, ...). Parameter dtype (storage) and compute dtype are independent: every
parameter is cast to the compute dtype where it is used, and GroupNorm statistics and the
attention softmax are computed in float32.

Logical axis names of the parameters: ``kernel_h``, ``kernel_w`` (conv window), ``conv_in``,
``conv_out`` (conv channels), ``norm`` (GroupNorm affine), ``attn_in``, ``attn_out`` (mid-block
attention projections), ``latent_channels`` (the batch-norm running statistics, stored as
``nnx.BatchStat``, not trained).

``FluxVAE`` wraps the module with the Lens latent space (spec 2.2 / 3.4) and tiled decoding, every
method jit-compiled; ``lens_jax.checkpoints.vae`` loads and saves it (``load_vae``, ``save_vae``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lens_jax.models import latents as latent_ops

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
RESNET_EPS = 1e-6  # every GroupNorm of the VAE (fixed in diffusers' Encoder/Decoder)
ATTENTION_QUERY_CHUNK = 4096  # mid-block attention is computed this many queries at a time


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an ``AutoencoderKLFlux2``; field names follow diffusers' ``vae/config.json``.

    Defaults are the Lens / FLUX.2 VAE (spec 3.1).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,) * 4
    up_block_types: tuple[str, ...] = (UP_BLOCK,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: same as block_out_channels
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 32
    norm_num_groups: int = 32
    sample_size: int = 1024
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, int] = (2, 2)
    force_upcast: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels",
                     "decoder_block_out_channels", "patch_size"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        n = len(self.block_out_channels)
        problems = []
        if any(t != DOWN_BLOCK for t in self.down_block_types) or len(self.down_block_types) != n:
            problems.append(f"down_block_types must be {n} x {DOWN_BLOCK!r}, got {self.down_block_types}")
        if any(t != UP_BLOCK for t in self.up_block_types) or len(self.up_block_types) != n:
            problems.append(f"up_block_types must be {n} x {UP_BLOCK!r}, got {self.up_block_types}")
        if len(self.decoder_channels) != n:
            problems.append(f"decoder_block_out_channels {self.decoder_block_out_channels} must have "
                            f"{n} entries like block_out_channels {self.block_out_channels}")
        if self.act_fn != "silu":
            problems.append(f"act_fn {self.act_fn!r} is not supported (only 'silu')")
        if self.patch_size != (2, 2):
            problems.append(f"patch_size {self.patch_size} is not supported (only (2, 2))")
        bad = [c for c in self.block_out_channels + self.decoder_channels if c % self.norm_num_groups]
        if bad:
            problems.append(f"channel counts {bad} are not multiples of norm_num_groups "
                            f"{self.norm_num_groups}")
        if problems:
            raise ValueError("unsupported VAE config: " + "; ".join(problems))

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def downsample_factor(self) -> int:
        """Image pixels per VAE-latent pixel (8 for FLUX.2)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def packed_channels(self) -> int:
        """Channels of a packed latent token (latent_channels x 2 x 2 = 128 for FLUX.2)."""
        return self.latent_channels * math.prod(self.patch_size)

    @classmethod
    def from_diffusers(cls, config_json: Mapping[str, Any]) -> "VAEConfig":
        """A diffusers ``vae/config.json`` dict -> VAEConfig (``_*`` keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config_json if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"VAE config.json has fields this implementation does not know: {unknown}")
        fields = {k: v for k, v in config_json.items() if k in names}
        if isinstance(fields.get("sample_size"), (list, tuple)):
            fields["sample_size"] = tuple(fields["sample_size"])
        return cls(**fields)

    def to_diffusers(self) -> dict[str, Any]:
        """The ``config.json`` dict of a diffusers ``AutoencoderKLFlux2`` folder."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKLFlux2", "_diffusers_version": "0.42.1"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------

def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
               eps: float = RESNET_EPS) -> jax.Array:
    """GroupNorm over NHWC ``x``; statistics in float32, result in ``x.dtype``."""
    b, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int = 1,
         padding: Sequence[tuple[int, int]] | None = None) -> jax.Array:
    """2-D convolution, NHWC x HWIO; default padding keeps the size at stride 1 (k // 2 per side)."""
    kh, kw = kernel.shape[:2]
    if kh == kw == 1 and stride == 1:
        y = jnp.einsum("bhwi,io->bhwo", x, kernel.reshape(kernel.shape[2:]))
    else:
        if padding is None:
            padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling of NHWC ``x``."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def single_head_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          query_chunk: int = ATTENTION_QUERY_CHUNK) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for ``[B, N, d]`` inputs; softmax in float32.

    Queries are processed ``query_chunk`` at a time so the score matrix never exceeds
    ``[B, query_chunk, N]`` (the mid block of a 1440^2 decode has N = 32,400).
    """
    b, n, d = q.shape
    scale = 1.0 / math.sqrt(d)

    def attend(q_chunk: jax.Array) -> jax.Array:
        scores = jnp.einsum("bqd,bkd->bqk", q_chunk, k, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bqk,bkd->bqd", probs, v)

    if n <= query_chunk:
        return attend(q)
    n_chunks = -(-n // query_chunk)
    q_padded = jnp.pad(q, ((0, 0), (0, n_chunks * query_chunk - n), (0, 0)))
    chunks = q_padded.reshape(b, n_chunks, query_chunk, d).swapaxes(0, 1)
    out = jax.lax.map(attend, chunks)  # [n_chunks, B, chunk, d]
    return out.swapaxes(0, 1).reshape(b, n_chunks * query_chunk, d)[:, :n]


# ------------------------------------------------------------------------------------------------
# Modules (parameter holders)
# ------------------------------------------------------------------------------------------------

def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float, dtype) -> jax.Array:
    return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound).astype(dtype)


class Conv2d(nnx.Module):
    """Conv weights: kernel ``[kh, kw, in, out]`` (HWIO) and bias ``[out]``; torch-style init."""

    def __init__(self, in_ch: int, out_ch: int, size: int, *, rngs: nnx.Rngs, param_dtype):
        bound = 1.0 / math.sqrt(in_ch * size * size)
        self.kernel = nnx.Param(_uniform(rngs, (size, size, in_ch, out_ch), bound, param_dtype),
                                out_sharding=("kernel_h", "kernel_w", "conv_in", "conv_out"),
                                eager_sharding=False)
        self.bias = nnx.Param(_uniform(rngs, (out_ch,), bound, param_dtype),
                              out_sharding=("conv_out",), eager_sharding=False)

    def __call__(self, x: jax.Array, stride: int = 1, padding=None) -> jax.Array:
        return conv(x, self.kernel[...].astype(x.dtype), self.bias[...].astype(x.dtype), stride,
                    padding)


class GroupNorm(nnx.Module):
    def __init__(self, channels: int, groups: int, *, param_dtype):
        self.groups = groups
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=("norm",),
                               eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), out_sharding=("norm",),
                              eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return group_norm(x, self.scale[...], self.bias[...], self.groups)


class Linear(nnx.Module):
    """Dense weights: kernel ``[in, out]`` and bias ``[out]``."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, param_dtype):
        bound = 1.0 / math.sqrt(in_dim)
        self.kernel = nnx.Param(_uniform(rngs, (in_dim, out_dim), bound, param_dtype),
                                out_sharding=("attn_in", "attn_out"), eager_sharding=False)
        self.bias = nnx.Param(_uniform(rngs, (out_dim,), bound, param_dtype),
                              out_sharding=("attn_out",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class ResnetBlock(nnx.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(param_dtype=param_dtype)
        self.norm1 = GroupNorm(in_ch, groups, **kw)
        self.conv1 = Conv2d(in_ch, out_ch, 3, rngs=rngs, **kw)
        self.norm2 = GroupNorm(out_ch, groups, **kw)
        self.conv2 = Conv2d(out_ch, out_ch, 3, rngs=rngs, **kw)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1, rngs=rngs, **kw) if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample(nnx.Module):
    """Zero-pad right/bottom by 1, then 3x3 conv, stride 2, no padding."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype):
        self.conv = Conv2d(channels, channels, 3, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x, stride=2, padding=((0, 1), (0, 1)))


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then 3x3 conv (padding 1)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype):
        self.conv = Conv2d(channels, channels, 3, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest_2x(x))


class MidAttention(nnx.Module):
    """Single-head self-attention over the h*w positions, GroupNorm first, residual added."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.group_norm = GroupNorm(channels, groups, param_dtype=param_dtype)
        self.to_q = Linear(channels, channels, **kw)
        self.to_k = Linear(channels, channels, **kw)
        self.to_v = Linear(channels, channels, **kw)
        self.to_out = Linear(channels, channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        out = single_head_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))
        return x + self.to_out(out).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """resnet -> attention -> resnet at constant width."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, rngs: nnx.Rngs,
                 param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
        self.attention = MidAttention(channels, groups, **kw) if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool, *,
                 rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, **kw)
                                 for i in range(layers)])
        self.downsampler = Downsample(out_ch, **kw) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsampler(x) if self.downsampler is not None else x


class UpBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool, *,
                 rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, **kw)
                                 for i in range(layers)])
        self.upsampler = Upsample(out_ch, **kw) if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsampler(x) if self.upsampler is not None else x


class Encoder(nnx.Module):
    """Image ``[B, H, W, in]`` -> moments ``[B, H/8, W/8, 2 * latent]`` (before quant_conv)."""

    def __init__(self, c: VAEConfig, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        chans, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = Conv2d(c.in_channels, chans[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownBlock(chans[max(i - 1, 0)], chans[i], c.layers_per_block, groups,
                      downsample=i < len(chans) - 1, **kw) for i in range(len(chans))])
        self.mid_block = MidBlock(chans[-1], groups, c.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(chans[-1], groups, param_dtype=param_dtype)
        self.conv_out = Conv2d(chans[-1], 2 * c.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent ``[B, h, w, latent]`` (after post_quant_conv) -> image ``[B, 8h, 8w, out]``."""

    def __init__(self, c: VAEConfig, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        chans, groups = tuple(reversed(c.decoder_channels)), c.norm_num_groups
        self.conv_in = Conv2d(c.latent_channels, chans[0], 3, **kw)
        self.mid_block = MidBlock(chans[0], groups, c.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            UpBlock(chans[max(i - 1, 0)], chans[i], c.layers_per_block + 1, groups,
                    upsample=i < len(chans) - 1, **kw) for i in range(len(chans))])
        self.conv_norm_out = GroupNorm(chans[-1], groups, param_dtype=param_dtype)
        self.conv_out = Conv2d(chans[-1], c.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKLFlux2(nnx.Module):
    """The FLUX.2 VAE: encoder + quant_conv, post_quant_conv + decoder, batch-norm statistics.

    ``bn_mean`` / ``bn_var`` are the running statistics of the 128 patchified latent channels
    (channel ``c*4 + p1*2 + p2``), used only to normalize latents (``lens_jax.models.latents``).
    """

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        c = config
        self.config = c
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        kw = dict(rngs=rngs, param_dtype=self.param_dtype)
        self.encoder = Encoder(c, **kw)
        self.decoder = Decoder(c, **kw)
        n = 2 * c.latent_channels
        self.quant_conv = Conv2d(n, n, 1, **kw) if c.use_quant_conv else None
        self.post_quant_conv = (Conv2d(c.latent_channels, c.latent_channels, 1, **kw)
                                if c.use_post_quant_conv else None)
        self.bn_mean = nnx.BatchStat(jnp.zeros((c.packed_channels,), self.param_dtype),
                                     out_sharding=("latent_channels",), eager_sharding=False)
        self.bn_var = nnx.BatchStat(jnp.ones((c.packed_channels,), self.param_dtype),
                                    out_sharding=("latent_channels",), eager_sharding=False)

    def encode_moments(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` in [-1, 1] -> posterior moments ``[B, H/8, W/8, 2*latent]`` (mean, logvar)."""
        moments = self.encoder(images.astype(self.dtype))
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def encode(self, images: jax.Array) -> jax.Array:
        """Posterior mode (= mean) ``[B, H/8, W/8, latent]``, as FLUX.2 / Lens use it."""
        return self.encode_moments(images)[..., :self.config.latent_channels]

    def decode(self, z: jax.Array) -> jax.Array:
        """VAE latent ``[B, h, w, latent]`` -> image ``[B, 8h, 8w, 3]`` in ~[-1, 1]."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# ------------------------------------------------------------------------------------------------
# The public VAE object
# ------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, donate_argnums=(0, 1))
def _add_tile(acc: jax.Array, weight_sum: jax.Array, tile: jax.Array, weight: jax.Array,
              y0: jax.Array, x0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adds ``tile * weight`` into ``acc`` (and ``weight`` into ``weight_sum``) at ``(y0, x0)``."""
    start = (0, y0, x0, 0)
    acc = jax.lax.dynamic_update_slice(
        acc, jax.lax.dynamic_slice(acc, start, tile.shape) + tile.astype(acc.dtype) * weight, start)
    w_shape = (1,) + tile.shape[1:3] + (1,)
    weight_sum = jax.lax.dynamic_update_slice(
        weight_sum, jax.lax.dynamic_slice(weight_sum, start, w_shape) + weight, start)
    return acc, weight_sum


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest tiles of length ``tile`` covering ``[0, size)`` with overlaps
    of at least ``overlap``, spread evenly (first at 0, last ending at ``size``).

    Every tile has the same length, so one compiled decode serves them all.
    """
    if size <= tile:
        return [0]
    n = -(-(size - overlap) // (tile - overlap))  # ceil: fewest tiles with overlap >= overlap
    n = max(n, 2)
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def blend_ramp(length: int, ramp_in: int, ramp_out: int) -> np.ndarray:
    """1-D weights: linear ramps ``(i + 0.5) / ramp`` over the first ``ramp_in`` / last ``ramp_out``."""
    w = np.ones(length, np.float32)
    if ramp_in:
        w[:ramp_in] = (np.arange(ramp_in, dtype=np.float32) + 0.5) / ramp_in
    if ramp_out:
        w[length - ramp_out:] = np.minimum(
            w[length - ramp_out:], (np.arange(ramp_out, dtype=np.float32)[::-1] + 0.5) / ramp_out)
    return w


class FluxVAE:
    """The FLUX.2 VAE with the Lens latent space; every method is jit-compiled (cached per shape).

    Images are NHWC floats in [-1, 1] with H, W multiples of 16; latent tokens are
    ``[B, h*w, 128]`` with ``h = H/16``, ``w = W/16``.
    """

    def __init__(self, model: AutoencoderKLFlux2, num_batches_tracked: int = 0):
        self.model = model
        self.num_batches_tracked = int(num_batches_tracked)
        self._graphdef = nnx.graphdef(model)

    @property
    def config(self) -> VAEConfig:
        return self.model.config

    @property
    def dtype(self) -> jnp.dtype:
        return self.model.dtype

    @property
    def param_dtype(self) -> jnp.dtype:
        return self.model.param_dtype

    # --- compiled entry points ------------------------------------------------------------------

    def _call(self, method: str, *args):
        return _JIT(self._graphdef, method, nnx.state(self.model), *args)

    # --- input checks ---------------------------------------------------------------------------

    def _check_images(self, images, multiple: int) -> jax.Array:
        images = jnp.asarray(images)
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.in_channels:
            raise ValueError(f"images must be NHWC [B, H, W, {c.in_channels}], got shape "
                             f"{tuple(images.shape)}")
        h, w = images.shape[1:3]
        if h % multiple or w % multiple or h == 0 or w == 0:
            raise ValueError(f"image height and width must be positive multiples of {multiple}, "
                             f"got {h} x {w} (images shape {tuple(images.shape)})")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be floats in [-1, 1], got dtype {images.dtype}")
        return images

    def _check_latents(self, z) -> jax.Array:
        z = jnp.asarray(z)
        c = self.config
        if z.ndim != 4 or z.shape[-1] != c.latent_channels:
            raise ValueError(f"VAE latents must be NHWC [B, h, w, {c.latent_channels}], got shape "
                             f"{tuple(z.shape)}")
        return z

    def _check_tokens(self, tokens, latent_hw: Sequence[int]) -> tuple[jax.Array, tuple[int, int]]:
        tokens = jnp.asarray(tokens)
        c = self.config
        if len(latent_hw) != 2:
            raise ValueError(f"latent_hw must be (h, w), got {latent_hw!r}")
        h, w = (int(v) for v in latent_hw)
        if tokens.ndim != 3 or tokens.shape[-1] != c.packed_channels:
            raise ValueError(f"latent tokens must be [B, h*w, {c.packed_channels}], got shape "
                             f"{tuple(tokens.shape)}")
        if h <= 0 or w <= 0 or tokens.shape[1] != h * w:
            raise ValueError(f"latent tokens of shape {tuple(tokens.shape)} hold {tokens.shape[1]} "
                             f"tokens, but latent_hw=({h}, {w}) needs {h * w}")
        return tokens, (h, w)

    # --- plain VAE -----------------------------------------------------------------------------

    def encode_moments(self, images) -> jax.Array:
        """Images ``[B, H, W, 3]`` -> posterior moments ``[B, H/8, W/8, 64]`` (mean, logvar)."""
        images = self._check_images(images, self.config.downsample_factor)
        return self._call("encode_moments", images)

    def encode(self, images) -> jax.Array:
        """Images ``[B, H, W, 3]`` -> posterior mean ``[B, H/8, W/8, 32]`` (H, W multiples of 8)."""
        return self.encode_moments(images)[..., :self.config.latent_channels]

    def decode(self, z) -> jax.Array:
        """VAE latents ``[B, h, w, 32]`` -> images ``[B, 8h, 8w, 3]``, untiled (exact)."""
        return self._call("decode", self._check_latents(z))

    def _decode_tile(self, z: jax.Array) -> jax.Array:
        return self._call("decode", z)

    def decode_tiled(self, z, tile: int = 64, overlap: int = 16) -> jax.Array:
        """VAE latents -> images, decoding ``tile x tile`` latent tiles that overlap by ``overlap``.

        Peak memory is that of one tile's decode. Tiles are blended in pixel space with linear
        ramps over the overlaps. Not exact: GroupNorm statistics and the mid-block attention see
        one tile at a time (diffusers' tiled decode has the same property).
        """
        z = self._check_latents(z)
        if tile <= 0 or not 0 <= overlap < tile:
            raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        b, h, w, _ = z.shape
        if h <= tile and w <= tile:
            return self.decode(z)
        f = self.config.downsample_factor
        th, tw = min(tile, h), min(tile, w)
        ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
        acc = jnp.zeros((b, h * f, w * f, self.config.out_channels), jnp.float32)
        weight_sum = jnp.zeros((1, h * f, w * f, 1), jnp.float32)
        for iy, y in enumerate(ys):
            # Ramp over the actual overlap with the neighbour (>= overlap; more for the last tile).
            top = (ys[iy - 1] + th - y) * f if iy > 0 else 0
            bottom = (y + th - ys[iy + 1]) * f if iy + 1 < len(ys) else 0
            wy = blend_ramp(th * f, top, bottom)
            for ix, x in enumerate(xs):
                left = (xs[ix - 1] + tw - x) * f if ix > 0 else 0
                right = (x + tw - xs[ix + 1]) * f if ix + 1 < len(xs) else 0
                wx = blend_ramp(tw * f, left, right)
                weight = jnp.asarray((wy[:, None] * wx[None, :])[None, :, :, None])
                tile_img = self._decode_tile(z[:, y:y + th, x:x + tw])
                acc, weight_sum = _add_tile(acc, weight_sum, tile_img, weight,
                                            jnp.int32(y * f), jnp.int32(x * f))
        return (acc / weight_sum).astype(self.dtype)

    # --- Lens latent space --------------------------------------------------------------------

    def image_to_latents(self, images) -> jax.Array:
        """Images ``[B, H, W, 3]`` in [-1, 1] -> normalized packed tokens ``[B, H/16 * W/16, 128]``."""
        images = self._check_images(images, 2 * self.config.downsample_factor)
        moments = self._call("encode_moments", images)
        return self._call("vae_latents_to_tokens", moments[..., :self.config.latent_channels])

    def latents_to_image(self, tokens, latent_hw: Sequence[int], tiled: bool = False,
                         tile: int = 64, overlap: int = 16) -> jax.Array:
        """Normalized packed tokens ``[B, h*w, 128]`` -> images ``[B, 16h, 16w, 3]`` in ~[-1, 1].

        ``tiled=True`` decodes in overlapping tiles (``decode_tiled``; ``tile``/``overlap`` in
        VAE-latent pixels, 1/8 of the image) to bound memory on large images.
        """
        z = self.tokens_to_vae_latents(tokens, latent_hw)
        return self.decode_tiled(z, tile, overlap) if tiled else self._call("decode", z)

    def tokens_to_vae_latents(self, tokens, latent_hw: Sequence[int]) -> jax.Array:
        """Normalized packed tokens -> VAE latents ``[B, 2h, 2w, 32]`` (de-normalized, unpatchified)."""
        tokens, latent_hw = self._check_tokens(tokens, latent_hw)
        return _tokens_to_vae_latents(tokens, latent_hw, *self._bn())

    def vae_latents_to_tokens(self, z) -> jax.Array:
        """VAE latents ``[B, 2h, 2w, 32]`` -> normalized packed tokens ``[B, h*w, 128]``."""
        z = self._check_latents(z)
        if z.shape[1] % 2 or z.shape[2] % 2:
            raise ValueError(f"VAE latents need an even height and width, got shape {tuple(z.shape)}")
        return self._call("vae_latents_to_tokens", z)

    def _bn(self) -> tuple[jax.Array, jax.Array, float, jnp.dtype]:
        m = self.model
        return m.bn_mean[...], m.bn_var[...], m.config.batch_norm_eps, m.dtype


@functools.partial(jax.jit, static_argnums=(1, 4, 5))
def _tokens_to_vae_latents(tokens, latent_hw, mean, var, eps, dtype):
    return latent_ops.tokens_to_latents(tokens.astype(jnp.float32), latent_hw, mean, var,
                                        eps).astype(dtype)


def vae_method(m: AutoencoderKLFlux2, name: str, *args):
    """``encode_moments`` / ``decode`` / ``vae_latents_to_tokens`` of a merged VAE module (inside jit)."""
    if name == "encode_moments":
        return m.encode_moments(*args)
    if name == "decode":
        return m.decode(*args)
    if name == "vae_latents_to_tokens":
        z = args[0].astype(jnp.float32)
        return latent_ops.latents_to_tokens(z, m.bn_mean[...], m.bn_var[...],
                                            m.config.batch_norm_eps).astype(m.dtype)
    raise ValueError(f"unknown VAE method {name!r}")


def _run_method(graphdef, method: str, state, *args):
    return vae_method(nnx.merge(graphdef, state), method, *args)


_JIT = jax.jit(_run_method, static_argnums=(0, 1))


def num_parameters(vae: FluxVAE) -> int:
    """Learnable parameters (bn statistics excluded): 84,046,115 for the FLUX.2 VAE."""
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(vae.model, nnx.Param)))
