"""Loading the GPT-OSS text encoder from a Hugging Face folder, streaming tensor by tensor.

``load_text_encoder(path)`` reads ``config.json`` (must be ``model_type: gpt_oss``) and the
safetensors weights of a transformers GPT-OSS folder: MXFP4 experts (``*_blocks``/``*_scales``,
as openai/gpt-oss-20b and Lens ship them) or dense experts (``gate_up_proj``/``down_proj``, as
transformers saves a non-quantized model). Each tensor goes from the file straight into its
(optionally sharded) device array: per-layer tensors are written into their stacked
``[layers, ...]`` array on device with a donated in-place update, and the file's memory map is
released after every tensor, so host memory holds about one tensor (plus its copies) at a time
beyond the loaded arrays. Only layers up to the deepest selected one are read.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from lens_jax.checkpoints.keymap import (TensorMapping, check_keys, linear, load_tensor, reshape)
from lens_jax.checkpoints.safetensors_io import SafetensorsFolder, read_json
from lens_jax.errors import CheckpointError
from lens_jax.models import mxfp4 as mxfp4_lib
from lens_jax.models.text_encoder import (GptOssConfig, TextEncoder, check_layers, param_specs,
                                          spec_dtype)

log = logging.getLogger(__name__)

DEFAULT_LAYERS = (5, 11, 17, 23)
_LAYER_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def resolve_folder(path: str | os.PathLike) -> Path:
    """The GPT-OSS folder: ``path`` itself, or ``path/text_encoder`` for a Lens checkpoint root."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "text_encoder" / "config.json").is_file():
        return path / "text_encoder"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    raise CheckpointError(f"{path}: no config.json (expected a GPT-OSS text_encoder folder or a "
                          "Lens checkpoint root containing text_encoder/)")


def read_config(folder: Path) -> GptOssConfig:
    """``folder/config.json`` as a ``GptOssConfig``; CheckpointError if it is not GPT-OSS."""
    source = folder / "config.json"
    hf = read_json(source)
    try:
        return GptOssConfig.from_hf(hf, source=str(source))
    except (TypeError, ValueError) as e:  # e.g. "num_hidden_layers": "two"
        raise CheckpointError(str(e) if str(source) in str(e) else f"{source}: {e}") from e


def text_encoder_mappings(config: GptOssConfig, num_layers: int, packed: bool, prefix: str = "model."
                          ) -> list[TensorMapping]:
    """Torch key <-> JAX path of every tensor the encoder needs (embedding + ``num_layers`` layers).

    ``packed``: experts stored as MXFP4 ``*_blocks``/``*_scales`` (else dense ``gate_up_proj``...).
    """
    c = config
    d, h, kv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    e, inter = c.num_local_experts, c.intermediate_size
    maps = [TensorMapping(f"{prefix}embed_tokens.weight", ("embed",), (c.vocab_size, d))]
    for i in range(num_layers):
        p = f"{prefix}layers.{i}."

        def add(key, name, shape, transforms=None):
            to_jax, to_torch = transforms or (lambda x: x, lambda x: x)
            maps.append(TensorMapping(p + key, ("layers", name), tuple(shape), i, to_jax, to_torch))

        add("input_layernorm.weight", "input_norm", (d,))
        add("post_attention_layernorm.weight", "post_norm", (d,))
        for proj, heads in (("q", h), ("k", kv), ("v", kv)):
            add(f"self_attn.{proj}_proj.weight", f"{proj}_kernel", (heads * hd, d),
                linear(in_shape=(d,), out_shape=(heads, hd)))
            add(f"self_attn.{proj}_proj.bias", f"{proj}_bias", (heads * hd,),
                reshape((heads, hd), (heads * hd,)))
        add("self_attn.o_proj.weight", "o_kernel", (d, h * hd), linear(in_shape=(h, hd), out_shape=(d,)))
        add("self_attn.o_proj.bias", "o_bias", (d,))
        add("self_attn.sinks", "sinks", (h,))
        add("mlp.router.weight", "router_kernel", (e, d), linear())
        add("mlp.router.bias", "router_bias", (e,))
        add("mlp.experts.gate_up_proj_bias", "gate_up_bias", (e, 2 * inter))
        add("mlp.experts.down_proj_bias", "down_bias", (e, d))
        if packed:
            (gu_b, gu_s), (dn_b, dn_s) = mxfp4_lib.packed_shapes(2 * inter, d), mxfp4_lib.packed_shapes(d, inter)
            add("mlp.experts.gate_up_proj_blocks", "gate_up_blocks", (e,) + gu_b)
            add("mlp.experts.gate_up_proj_scales", "gate_up_scales", (e,) + gu_s)
            add("mlp.experts.down_proj_blocks", "down_blocks", (e,) + dn_b)
            add("mlp.experts.down_proj_scales", "down_scales", (e,) + dn_s)
        else:
            add("mlp.experts.gate_up_proj", "gate_up", (e, d, 2 * inter))
            add("mlp.experts.down_proj", "down", (e, inter, d))
    return maps


def logical_sharding(names: Sequence, mesh: jax.sharding.Mesh | None, rules: Mapping | None
                     ) -> jax.sharding.Sharding:
    """Logical axis names -> NamedSharding via ``rules`` (name -> mesh axis / tuple / None).

    Without a mesh: the first device.
    """
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    rules = dict(rules or {})
    return NamedSharding(mesh, PartitionSpec(*[rules.get(n) if n is not None else None for n in names]))


def _drop_leading(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    return sharding


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _write_fn(sharding):
    def write(buffer, value, index):
        return jax.lax.dynamic_update_index_in_dim(buffer, value.astype(buffer.dtype), index, 0)
    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _cast_fn(dtype, sharding):
    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _dequant_fn(dtype, sharding):
    def dequant(blocks, scales):  # [E, out, G, 16] -> [E, in, out]
        return jnp.swapaxes(mxfp4_lib.dequantize(blocks, scales, dtype), 1, 2)
    return jax.jit(dequant, out_shardings=sharding)


class _DevicePlacer:
    """Puts host tensors into their (stacked, sharded) device arrays one at a time."""

    def __init__(self, specs, packed_specs, dtype, mesh, rules):
        self.specs, self.dtype = specs, jnp.dtype(dtype)
        self.shardings = {p: logical_sharding(s[2], mesh, rules) for p, s in specs.items()}
        # Where MXFP4 blocks/scales wait (per layer) before being dequantized into dense experts.
        self.packed_shardings = {p: _drop_leading(logical_sharding(s[2], mesh, rules))
                                 for p, s in packed_specs.items() if s[1] == "packed"}
        self.arrays: dict[tuple[str, ...], jax.Array] = {}
        self.pending: dict[tuple[int, str], dict[str, jax.Array]] = {}

    def _target_dtype(self, path):
        return spec_dtype(self.specs[path][1], self.dtype)

    def put(self, path: tuple[str, ...], index: int | None, host: np.ndarray) -> None:
        if path not in self.specs and path[1].endswith(("_blocks", "_scales")):
            self._put_packed_as_dense(path, index, host)
            return
        sharding = self.shardings[path]
        if index is None:
            value = jax.device_put(host, sharding)
            if value.dtype != self._target_dtype(path):
                value = _cast_fn(self._target_dtype(path), sharding)(value)
            self.arrays[path] = value
            return
        self.write_layer(path, index, jax.device_put(host, _drop_leading(sharding)))

    def write_layer(self, path, index: int, value: jax.Array) -> None:
        sharding = self.shardings[path]
        if path not in self.arrays:
            shape = self.specs[path][0]
            self.arrays[path] = _zeros_fn(shape, self._target_dtype(path), sharding)()
        self.arrays[path] = _write_fn(sharding)(self.arrays[path], value, np.int32(index))

    def _put_packed_as_dense(self, path, index, host) -> None:
        proj, part = path[1].rsplit("_", 1)  # gate_up / down, blocks / scales
        dense_path = ("layers", proj)
        slot = self.pending.setdefault((index, proj), {})
        slot[part] = jax.device_put(host, self.packed_shardings[path])
        if len(slot) == 2:
            del self.pending[(index, proj)]
            dense = _dequant_fn(self.dtype, _drop_leading(self.shardings[dense_path]))(
                slot["blocks"], slot["scales"])
            self.write_layer(dense_path, index, dense)


def _unused_key(prefix: str, num_layers: int):
    def ignore(key: str) -> bool:
        if key in (f"{prefix}norm.weight", "lm_head.weight"):
            return True
        match = _LAYER_KEY.match(key)
        return bool(match) and int(match.group(1)) >= num_layers
    return ignore


def load_text_encoder(path: str | os.PathLike, layers: Sequence[int] = DEFAULT_LAYERS,
                      dtype=jnp.bfloat16, mxfp4: bool = True, mesh: jax.sharding.Mesh | None = None,
                      rules: Mapping[str, object] | None = None, moe_impl: str = "auto",
                      progress: bool = True) -> TextEncoder:
    """Loads a GPT-OSS encoder returning the hidden states of ``layers`` (0-based decoder layers).

    ``path``: a transformers GPT-OSS folder (``config.json`` + safetensors) or a Lens checkpoint
    root with ``text_encoder/``. ``dtype``: the compute/parameter dtype (norms stay float32).
    ``mxfp4``: keep MXFP4 experts packed (dequantized inside the forward); False dequantizes them
    at load time into dense ``dtype`` experts. Dense checkpoints always load dense.
    ``mesh``/``rules``: place every parameter with ``NamedSharding`` built from its logical axis
    names (``rules`` maps a logical name such as ``"experts"`` to a mesh axis).
    ``moe_impl``: ``"auto"`` (default: ragged on TPU/GPU, dense on CPU), ``"dense"`` (every
    expert on every token, masked combine) or ``"ragged"`` (top-k grouped matmuls,
    ``jax.lax.ragged_dot``; 8x fewer expert FLOPs where the backend has a native kernel).
    """
    folder_path = resolve_folder(path)
    config = read_config(folder_path)
    selected = check_layers(layers, config.num_hidden_layers)
    num_layers = max(selected) + 1
    with SafetensorsFolder(folder_path) as folder:
        keys = folder.keys()
        prefix = "model." if "model.embed_tokens.weight" in folder else ""
        if f"{prefix}embed_tokens.weight" not in folder:
            raise CheckpointError(f"{folder_path}: no embed_tokens.weight; not a GPT-OSS checkpoint "
                                  f"(first keys: {sorted(keys)[:5]})")
        expert_key = f"{prefix}layers.0.mlp.experts."
        if expert_key + "gate_up_proj_blocks" in folder:
            packed = True
        elif expert_key + "gate_up_proj" in folder:
            packed = False
        else:
            raise CheckpointError(f"{folder_path}: neither {expert_key}gate_up_proj_blocks (MXFP4) nor "
                                  f"{expert_key}gate_up_proj (dense) found")
        if mxfp4 and not packed:
            log.info("%s stores dense experts: they are loaded dense (%s)", folder_path, jnp.dtype(dtype))
        keep_packed = bool(mxfp4 and packed)
        mappings = text_encoder_mappings(config, num_layers, packed, prefix)
        check_keys(str(folder_path), keys, mappings, ignore=_unused_key(prefix, num_layers))
        for m in mappings:
            found = folder.shape(m.key)
            if tuple(found) != m.torch_shape:
                raise CheckpointError(f"{folder.file_of(m.key)}: tensor {m.key!r} has shape "
                                      f"{tuple(found)}, expected {m.torch_shape}")
        placer = _DevicePlacer(param_specs(config, num_layers, keep_packed),
                               param_specs(config, num_layers, True), dtype, mesh, rules)
        by_file: dict[Path, list[TensorMapping]] = {}
        for m in mappings:
            by_file.setdefault(folder.file_of(m.key), []).append(m)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(mappings), desc="text encoder", unit="tensor")
        for file_mappings in by_file.values():
            for m in file_mappings:
                placer.put(m.path, m.index, load_tensor(folder, m))  # read() unmaps after each
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        if placer.pending:
            raise CheckpointError(f"{folder_path}: unpaired MXFP4 blocks/scales {sorted(placer.pending)}")
    return TextEncoder(config, placer.arrays, layers=selected, mxfp4=keep_packed, moe_impl=moe_impl)
