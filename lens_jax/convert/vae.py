"""FLUX.2 VAE weights: diffusers ``vae/`` folder <-> ``FluxVAE``; the public VAE API.

``load_vae(path)`` reads a diffusers ``AutoencoderKLFlux2`` folder (``config.json`` + one or more
safetensors files, fp32 or bf16) and returns a ``FluxVAE``: jit-compiled ``image_to_latents`` /
``latents_to_image`` (the Lens latent space, spec 2.2 / 3.4), ``encode`` / ``decode`` (plain VAE
latents) and ``decode_tiled`` for large images. ``save_vae(vae, out_dir)`` writes the folder back;
a load/save round trip is bit-identical (including ``bn.num_batches_tracked``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lens_jax import output_guard, storage
from lens_jax.convert import keymap
from lens_jax.convert.safetensors_io import (CheckpointError, SafetensorsFolder, ShardedWriter,
                                             check_field_types, read_json, write_json)
from lens_jax.models import latents as latent_ops
from lens_jax.models.vae import AutoencoderKLFlux2, VAEConfig

WEIGHTS_PREFIX = "diffusion_pytorch_model"
NUM_BATCHES_KEY = "bn.num_batches_tracked"

# ------------------------------------------------------------------------------------------------
# Key mapping (spec 3.3)
# ------------------------------------------------------------------------------------------------


def _conv(key: str, path: tuple[str, ...], c_in: int, c_out: int, size: int) -> list[keymap.TensorMapping]:
    to_jax, to_torch = keymap.conv2d()
    return [keymap.TensorMapping(f"{key}.weight", path + ("kernel",), (c_out, c_in, size, size),
                                 to_jax=to_jax, to_torch=to_torch),
            keymap.TensorMapping(f"{key}.bias", path + ("bias",), (c_out,))]


def _norm(key: str, path: tuple[str, ...], channels: int) -> list[keymap.TensorMapping]:
    return [keymap.TensorMapping(f"{key}.weight", path + ("scale",), (channels,)),
            keymap.TensorMapping(f"{key}.bias", path + ("bias",), (channels,))]


def _linear(key: str, path: tuple[str, ...], c_in: int, c_out: int) -> list[keymap.TensorMapping]:
    to_jax, to_torch = keymap.linear()
    return [keymap.TensorMapping(f"{key}.weight", path + ("kernel",), (c_out, c_in),
                                 to_jax=to_jax, to_torch=to_torch),
            keymap.TensorMapping(f"{key}.bias", path + ("bias",), (c_out,))]


def _resnet(key: str, path: tuple[str, ...], c_in: int, c_out: int) -> list[keymap.TensorMapping]:
    out = (_norm(f"{key}.norm1", path + ("norm1",), c_in)
           + _conv(f"{key}.conv1", path + ("conv1",), c_in, c_out, 3)
           + _norm(f"{key}.norm2", path + ("norm2",), c_out)
           + _conv(f"{key}.conv2", path + ("conv2",), c_out, c_out, 3))
    if c_in != c_out:
        out += _conv(f"{key}.conv_shortcut", path + ("conv_shortcut",), c_in, c_out, 1)
    return out


def _mid_block(key: str, path: tuple[str, ...], c: int, attention: bool) -> list[keymap.TensorMapping]:
    out = _resnet(f"{key}.resnets.0", path + ("resnets", "0"), c, c)
    if attention:
        a, ap = f"{key}.attentions.0", path + ("attention",)
        out += _norm(f"{a}.group_norm", ap + ("group_norm",), c)
        for name, torch_name in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"),
                                 ("to_out", "to_out.0")):
            out += _linear(f"{a}.{torch_name}", ap + (name,), c, c)
    return out + _resnet(f"{key}.resnets.1", path + ("resnets", "1"), c, c)


def vae_mappings(config: VAEConfig) -> list[keymap.TensorMapping]:
    """Every tensor of a diffusers ``AutoencoderKLFlux2`` state dict and its ``FluxVAE`` path."""
    c = config
    m: list[keymap.TensorMapping] = []
    # Encoder
    chans = c.block_out_channels
    m += _conv("encoder.conv_in", ("encoder", "conv_in"), c.in_channels, chans[0], 3)
    for i, ch in enumerate(chans):
        prev = chans[max(i - 1, 0)]
        for j in range(c.layers_per_block):
            m += _resnet(f"encoder.down_blocks.{i}.resnets.{j}",
                         ("encoder", "down_blocks", str(i), "resnets", str(j)), prev if j == 0 else ch, ch)
        if i < len(chans) - 1:
            m += _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv",
                       ("encoder", "down_blocks", str(i), "downsampler", "conv"), ch, ch, 3)
    m += _mid_block("encoder.mid_block", ("encoder", "mid_block"), chans[-1], c.mid_block_add_attention)
    m += _norm("encoder.conv_norm_out", ("encoder", "conv_norm_out"), chans[-1])
    m += _conv("encoder.conv_out", ("encoder", "conv_out"), chans[-1], 2 * c.latent_channels, 3)
    # Decoder
    rev = tuple(reversed(c.decoder_channels))
    m += _conv("decoder.conv_in", ("decoder", "conv_in"), c.latent_channels, rev[0], 3)
    m += _mid_block("decoder.mid_block", ("decoder", "mid_block"), rev[0], c.mid_block_add_attention)
    for i, ch in enumerate(rev):
        prev = rev[max(i - 1, 0)]
        for j in range(c.layers_per_block + 1):
            m += _resnet(f"decoder.up_blocks.{i}.resnets.{j}",
                         ("decoder", "up_blocks", str(i), "resnets", str(j)), prev if j == 0 else ch, ch)
        if i < len(rev) - 1:
            m += _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv",
                       ("decoder", "up_blocks", str(i), "upsampler", "conv"), ch, ch, 3)
    m += _norm("decoder.conv_norm_out", ("decoder", "conv_norm_out"), rev[-1])
    m += _conv("decoder.conv_out", ("decoder", "conv_out"), rev[-1], c.out_channels, 3)
    # Quant convs and latent statistics
    if c.use_quant_conv:
        n = 2 * c.latent_channels
        m += _conv("quant_conv", ("quant_conv",), n, n, 1)
    if c.use_post_quant_conv:
        m += _conv("post_quant_conv", ("post_quant_conv",), c.latent_channels, c.latent_channels, 1)
    m += [keymap.TensorMapping("bn.running_mean", ("bn_mean",), (c.packed_channels,)),
          keymap.TensorMapping("bn.running_var", ("bn_var",), (c.packed_channels,)),
          keymap.TensorMapping(NUM_BATCHES_KEY, ("bn_num_batches_tracked",), ())]
    return m


# ------------------------------------------------------------------------------------------------
# The public VAE object
# ------------------------------------------------------------------------------------------------

def _state_dict(model: AutoencoderKLFlux2) -> dict[tuple[str, ...], jax.Array]:
    """Flat ``{path: array}`` of the model's variables, path parts as strings."""
    return {tuple(str(p) for p in path): var.get_value()
            for path, var in nnx.to_flat_state(nnx.state(model))}


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


# ------------------------------------------------------------------------------------------------
# Load / save
# ------------------------------------------------------------------------------------------------

def _vae_folder(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/vae`` for a pipeline root holding a ``vae/`` folder."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return path / "vae"
    return path


def load_vae(path: str | os.PathLike, dtype=None, param_dtype=None) -> FluxVAE:
    """Loads a diffusers ``AutoencoderKLFlux2`` folder (or a pipeline root with ``vae/``).

    ``dtype`` is the compute dtype and ``param_dtype`` the storage dtype of the weights and
    batch-norm statistics; each defaults to the other, and both to the checkpoint's dtype.
    Raises ``CheckpointError`` (a ValueError) naming the key and both shapes on missing,
    unexpected or misshaped tensors.
    """
    folder_path = _vae_folder(path)
    config_json = read_json(folder_path / "config.json")
    name = config_json.get("_class_name")
    if name not in (None, "AutoencoderKLFlux2"):
        raise CheckpointError(f"{folder_path / 'config.json'}: _class_name is {name!r}, "
                              "expected 'AutoencoderKLFlux2'")
    check_field_types(config_json, {f.name: f.default for f in dataclasses.fields(VAEConfig)},
                      folder_path / "config.json")
    try:
        config = VAEConfig.from_diffusers(config_json)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder_path / 'config.json'}: {e}") from e
    mappings = vae_mappings(config)
    with SafetensorsFolder(folder_path) as folder:
        params = keymap.load_params(folder, mappings)
    num_batches = params.pop(("bn_num_batches_tracked",))
    float_dtypes = {np.dtype(a.dtype) for a in params.values()}
    if param_dtype is None:
        param_dtype = dtype if dtype is not None else (
            float_dtypes.pop() if len(float_dtypes) == 1 else jnp.float32)
    if dtype is None:
        dtype = param_dtype
    param_dtype, dtype = jnp.dtype(param_dtype), jnp.dtype(dtype)
    params = {p: a.astype(param_dtype) for p, a in params.items()}
    return FluxVAE(_build(config, params, dtype, param_dtype), int(num_batches))


def _build(config: VAEConfig, params: dict[tuple[str, ...], np.ndarray], dtype,
           param_dtype) -> AutoencoderKLFlux2:
    """An ``AutoencoderKLFlux2`` whose variables are ``params`` (no random initialisation)."""
    model = nnx.eval_shape(lambda: AutoencoderKLFlux2(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                      param_dtype=param_dtype))
    flat = nnx.to_flat_state(nnx.state(model))
    model_paths = {tuple(str(p) for p in path) for path, _ in flat}
    if model_paths != set(params):
        raise CheckpointError(f"internal: mapping and module disagree: "
                              f"{sorted(model_paths ^ set(params))[:8]}")
    for path, var in flat:
        key = tuple(str(p) for p in path)
        expected = var.get_value()
        array = params[key]
        if tuple(array.shape) != tuple(expected.shape):
            raise CheckpointError(f"parameter {'/'.join(key)} has shape {tuple(array.shape)}, "
                                  f"expected {tuple(expected.shape)}")
        var.set_value(jnp.asarray(array))
    return model


NORM_MODULES = ("norm1", "norm2", "group_norm", "conv_norm_out")


def random_vae(config: VAEConfig = VAEConfig(), seed: int = 0, dtype=jnp.float32,
               param_dtype=jnp.float32) -> FluxVAE:
    """A VAE with every tensor random (numpy RNG, no per-layer compilation).

    Kernels and biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (torch's default scale), GroupNorm
    scale ``1 + 0.1 N(0, 1)`` and bias ``0.1 N(0, 1)``, bn mean ``0.5 N(0, 1)``, bn var ``U(0.5, 2)``.
    """
    rng = np.random.default_rng(seed)
    shapes = keymap.jax_shapes(vae_mappings(config))
    shapes.pop(("bn_num_batches_tracked",))
    params: dict[tuple[str, ...], np.ndarray] = {}
    for path, shape in shapes.items():
        if len(path) >= 2 and path[-2] in NORM_MODULES:
            value = (1.0 if path[-1] == "scale" else 0.0) + 0.1 * rng.standard_normal(shape)
        elif path == ("bn_mean",):
            value = 0.5 * rng.standard_normal(shape)
        elif path == ("bn_var",):
            value = rng.uniform(0.5, 2.0, shape)
        else:
            kernel_shape = shapes[path[:-1] + ("kernel",)]
            bound = 1.0 / math.sqrt(math.prod(kernel_shape[:-1]))
            value = rng.uniform(-bound, bound, shape)
        params[path] = value.astype(np.float32).astype(jnp.dtype(param_dtype))
    return FluxVAE(_build(config, params, jnp.dtype(dtype), jnp.dtype(param_dtype)))


def save_vae(vae: FluxVAE, out_dir: str | os.PathLike, overwrite: bool = False,
             max_shard_bytes: int = 10 << 30) -> Path:
    """Writes ``vae`` as a diffusers ``AutoencoderKLFlux2`` folder (config.json + safetensors).

    Float tensors are written in the VAE's ``param_dtype``; the folder is written atomically.
    """
    mappings = vae_mappings(vae.config)
    params = {p: np.asarray(a) for p, a in _state_dict(vae.model).items()}
    params[("bn_num_batches_tracked",)] = np.asarray(vae.num_batches_tracked, np.int64)
    with output_guard.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, WEIGHTS_PREFIX, max_shard_bytes=max_shard_bytes)
        for key, tensor in keymap.torch_tensors(params, mappings):
            writer.add(key, tensor)
        writer.finish()
        write_json(tmp / "config.json", vae.config.to_diffusers())
    return storage.native(out_dir)


def num_parameters(vae: FluxVAE) -> int:
    """Learnable parameters (bn statistics excluded): 84,046,115 for the FLUX.2 VAE."""
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(vae.model, nnx.Param)))
