"""FLUX.2 VAE weights: diffusers ``vae/`` folder <-> ``FluxVAE`` (``lens_jax.models.vae``).

``load_vae(path)`` reads a diffusers ``AutoencoderKLFlux2`` folder (``config.json`` + one or more
safetensors files, fp32 or bf16) and returns a ``FluxVAE``: jit-compiled ``image_to_latents`` /
``latents_to_image`` (the Lens latent space, spec 2.2 / 3.4), ``encode`` / ``decode`` (plain VAE
latents) and ``decode_tiled`` for large images. ``save_vae(vae, out_dir)`` writes the folder back;
a load/save round trip is bit-identical (including ``bn.num_batches_tracked``). ``random_vae``
builds one with random weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lens_jax import output_guard, storage
from lens_jax.checkpoints import keymap
from lens_jax.checkpoints.safetensors_io import (SafetensorsFolder, ShardedWriter, check_field_types,
                                                 read_json, write_json)
from lens_jax.errors import CheckpointError
from lens_jax.models.vae import AutoencoderKLFlux2, FluxVAE, VAEConfig

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
# Load / save
# ------------------------------------------------------------------------------------------------

def _state_dict(model: AutoencoderKLFlux2) -> dict[tuple[str, ...], jax.Array]:
    """Flat ``{path: array}`` of the model's variables, path parts as strings."""
    return {tuple(str(p) for p in path): var.get_value()
            for path, var in nnx.to_flat_state(nnx.state(model))}


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
