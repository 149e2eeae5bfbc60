"""The Lens denoiser's weights: diffusers folders <-> JAX parameters <-> orbax checkpoints.

- A diffusers ``transformer/`` folder: ``config.json`` (``LensTransformer2DModel``) and one
  ``*.safetensors`` or sharded files with ``*.safetensors.index.json``, fp32 or bf16 (spec 1.2).
- Our orbax layout (written by ``lens-convert to-orbax``): ``lens_jax.json`` (format, config),
  ``top/`` (every non-block parameter) and ``layers/NNN/`` (one block each), each an orbax PyTree
  checkpoint in the JAX layout. One item per block lets conversion stream block by block, so
  converting the full model disk to disk holds about one block (~340 MB fp32) in memory.

Every conversion writes to a temporary folder and renames it at the end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from lens_jax import output_guard, storage
from lens_jax.checkpoints import keymap
from lens_jax.checkpoints.keymap import TensorMapping
from lens_jax.checkpoints.safetensors_io import (SafetensorsFolder, ShardedWriter, check_field_types,
                                                 read_json, write_json)
from lens_jax.errors import CheckpointError
from lens_jax.models import config as config_lib
from lens_jax.models.transformer import LensTransformer, abstract_model

log = logging.getLogger(__name__)

ORBAX_MARKER = "lens_jax.json"
ORBAX_FORMAT = "lens_jax.transformer.orbax.v1"
WEIGHTS_PREFIX = "diffusion_pytorch_model"
CLASS_NAME = "LensTransformer2DModel"
# What a conversion writes into its output folder (``--overwrite`` replaces nothing else).
DIFFUSERS_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json")
ORBAX_PATTERNS = (ORBAX_MARKER, "top", "layers")


# ----------------------------------------------------------------------------- the key map

def transformer_mappings(c: ml_collections.ConfigDict) -> list[TensorMapping]:
    """Every checkpoint tensor of the denoiser (diffusers names, spec 1.2) and its JAX path."""
    d, heads, head_dim = config_lib.width(c), c.num_attention_heads, c.attention_head_dim
    f, enc, n_feat = config_lib.mlp_hidden(c), c.enc_hidden_dim, len(c.selected_layer_index)
    out_dim = c.patch_size * c.patch_size * c.out_channels
    maps: list[TensorMapping] = []

    def lin(key: str, path: tuple, n_in: int, n_out: int, in_shape=(), out_shape=(), index=None,
            bias: bool = True) -> None:
        to_jax, to_torch = keymap.linear(in_shape, out_shape)
        maps.append(TensorMapping(f"{key}.weight", path + ("kernel",), (n_out, n_in), index,
                                  to_jax, to_torch))
        if bias:
            b_jax, b_torch = keymap.reshape(out_shape or (n_out,), (n_out,))
            maps.append(TensorMapping(f"{key}.bias", path + ("bias",), (n_out,), index, b_jax, b_torch))

    def norm(key: str, path: tuple, dim: int, index=None) -> None:
        maps.append(TensorMapping(f"{key}.weight", path + ("scale",), (dim,), index))

    lin("time_text_embed.timestep_embedder.linear_1", ("time_linear_1",), c.timestep_embed_dim, d)
    lin("time_text_embed.timestep_embedder.linear_2", ("time_linear_2",), d, d)
    for j in range(n_feat):
        norm(f"txt_norm.{j}", ("txt_norm",), enc, index=j)
    lin("txt_in", ("txt_in",), n_feat * enc, d)
    lin("img_in", ("img_in",), c.in_channels, d)
    for i in range(c.num_layers):
        p = f"transformer_blocks.{i}."
        for stream, qkv_key, out_key, qn, kn in (
                ("img", "attn.img_qkv", "attn.to_out.0", "attn.norm_q", "attn.norm_k"),
                ("txt", "attn.txt_qkv", "attn.to_add_out", "attn.norm_added_q", "attn.norm_added_k")):
            lin(p + qkv_key, ("blocks", f"{stream}_qkv"), d, 3 * d, out_shape=(3, heads, head_dim), index=i)
            norm(p + qn, ("blocks", f"{stream}_norm_q"), head_dim, index=i)
            norm(p + kn, ("blocks", f"{stream}_norm_k"), head_dim, index=i)
            lin(p + out_key, ("blocks", f"{stream}_out"), d, d, in_shape=(heads, head_dim), index=i)
            lin(p + f"{stream}_mod.1", ("blocks", f"{stream}_mod"), d, 6 * d, index=i)
            norm(p + f"{stream}_norm1", ("blocks", f"{stream}_norm1"), d, index=i)
            norm(p + f"{stream}_norm2", ("blocks", f"{stream}_norm2"), d, index=i)
            lin(p + f"{stream}_mlp.w1", ("blocks", f"{stream}_mlp_w1"), d, f, index=i, bias=False)
            lin(p + f"{stream}_mlp.w3", ("blocks", f"{stream}_mlp_w3"), d, f, index=i, bias=False)
            lin(p + f"{stream}_mlp.w2", ("blocks", f"{stream}_mlp_w2"), f, d, index=i, bias=False)
    lin("norm_out.linear", ("norm_out",), d, 2 * d)
    lin("proj_out", ("proj_out",), d, out_dim)
    return maps


def _group(m: TensorMapping) -> str:
    """Orbax item of a mapping: ``top`` or ``layers/NNN`` (one per block)."""
    return f"layers/{m.index:03d}" if m.path[0] == "blocks" else "top"


def _in_group(m: TensorMapping) -> TensorMapping:
    """The mapping as seen inside its orbax item (block tensors lose the leading layer axis)."""
    if m.path[0] != "blocks":
        return m
    return TensorMapping(m.key, m.path[1:], m.torch_shape, None, m.to_jax, m.to_torch)


def _grouped(mappings: Sequence[TensorMapping]) -> dict[str, list[TensorMapping]]:
    groups: dict[str, list[TensorMapping]] = {}
    for m in mappings:
        groups.setdefault(_group(m), []).append(m)
    return groups


# ----------------------------------------------------------------------------- sources

def is_orbax(path: Path) -> bool:
    return (path / ORBAX_MARKER).is_file()


def read_config(path: str | os.PathLike, **runtime) -> ml_collections.ConfigDict:
    """Our model config from a diffusers folder's ``config.json`` or an orbax checkpoint's marker
    (local or ``gs://``)."""
    path = storage.native(path)
    if is_orbax(path):
        meta = read_json(path / ORBAX_MARKER)
        if meta.get("format") != ORBAX_FORMAT:
            raise CheckpointError(f"{path / ORBAX_MARKER}: format {meta.get('format')!r}, "
                                  f"expected {ORBAX_FORMAT!r}")
        cfg_json = meta.get("config")
        if not isinstance(cfg_json, dict):
            raise CheckpointError(f"{path / ORBAX_MARKER}: no 'config' object")
        check_config_fields(cfg_json, path / ORBAX_MARKER)
    else:
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint folder (no such directory)")
        cfg_json = read_json(path / "config.json")
        if cfg_json.get("_class_name") not in (None, CLASS_NAME):
            raise CheckpointError(f"{path / 'config.json'}: _class_name is "
                                  f"{cfg_json.get('_class_name')!r}, expected {CLASS_NAME!r}")
        check_config_fields(cfg_json, path / "config.json")
    cfg = config_lib.from_diffusers_config(cfg_json, **runtime)
    try:
        config_lib.validate(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: unsupported config: {e}") from e
    return cfg


def check_config_fields(cfg_json: dict, path: Path) -> None:
    """A one-line ``CheckpointError`` for a field of the wrong type (``"num_layers": "two"``)."""
    defaults = config_lib.transformer_config()
    check_field_types(cfg_json, {k: defaults[k] for k in config_lib.DIFFUSERS_FIELDS}, path,
                      positive=True)


def _orbax_restore(path: Path) -> dict:
    import orbax.checkpoint as ocp
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing orbax item")
    return ocp.PyTreeCheckpointer().restore(str(path.absolute()))


def _orbax_save(path: Path, tree: dict) -> None:
    import orbax.checkpoint as ocp
    ocp.PyTreeCheckpointer().save(str(path.absolute()), tree)


def _check_orbax_item(path: Path, flat: dict, group: list[TensorMapping]) -> None:
    expected = keymap.jax_shapes([_in_group(m) for m in group])
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing parameters {missing}, unexpected {unexpected}")
    for p, shape in expected.items():
        if tuple(flat[p].shape) != tuple(shape):
            raise CheckpointError(f"{path}: parameter {'/'.join(p)} has shape "
                                  f"{tuple(flat[p].shape)}, expected {tuple(shape)}")


def _check_folder(src: Path, folder: SafetensorsFolder, mappings: list[TensorMapping]) -> None:
    """Every expected key present, nothing unexpected, every shape right (no data read)."""
    keymap.check_keys(str(src), folder.keys(), mappings)
    for m in mappings:
        if tuple(folder.shape(m.key)) != tuple(m.torch_shape):
            raise CheckpointError(f"{folder.file_of(m.key)}: tensor {m.key!r} has shape "
                                  f"{tuple(folder.shape(m.key))}, expected {tuple(m.torch_shape)}")


def check_checkpoint(path: str | os.PathLike, cfg: ml_collections.ConfigDict) -> int:
    """Checks a checkpoint's files without reading tensor data: safetensors headers against file
    sizes, every expected tensor present with its shape (orbax: every item's metadata). Returns
    the bytes on disk; raises ``CheckpointError`` naming the first broken file."""
    import orbax.checkpoint as ocp

    path = Path(path)
    mappings = transformer_mappings(cfg)
    if not is_orbax(path):
        with SafetensorsFolder(path) as folder:
            _check_folder(path, folder, mappings)
            files = set(folder.file_of(k) for k in folder.keys())
        return sum(f.stat().st_size for f in files)
    for name, group in _grouped(mappings).items():
        item = path / name
        if not item.is_dir():
            raise CheckpointError(f"{item}: missing orbax item (an interrupted conversion?)")
        try:
            tree = ocp.PyTreeCheckpointer().metadata(str(item.absolute())).item_metadata.tree
        except Exception as e:  # noqa: BLE001 - orbax raises many types on damaged folders
            raise CheckpointError(f"{item}: unreadable orbax item ({type(e).__name__}: {e})") from e
        _check_orbax_item(item, keymap.flatten(tree), group)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _iter_groups(src: Path, cfg: ml_collections.ConfigDict, dtype=None,
                 progress: bool = False) -> Iterator[tuple[str, list[TensorMapping], dict]]:
    """Yields ``(group, mappings, {path_in_group: jax-layout array})`` one orbax item at a time."""
    groups = _grouped(transformer_mappings(cfg))

    def bar():  # created once the files are checked: an error is then one line, not a bar
        return tqdm(groups.items(), desc=f"reading {src.name}", unit="item", disable=not progress)

    if is_orbax(src):
        for name, group in bar():
            flat = keymap.flatten(_orbax_restore(src / name))
            _check_orbax_item(src / name, flat, group)
            if dtype is not None:
                flat = {p: a.astype(dtype) for p, a in flat.items()}
            yield name, group, flat
        return
    with SafetensorsFolder(src) as folder:
        _check_folder(src, folder, [m for g in groups.values() for m in g])
        for name, group in bar():
            yield name, group, keymap.load_params(folder, [_in_group(m) for m in group], dtype=dtype,
                                                   strict=False)


# ----------------------------------------------------------------------------- in memory

def model_from_params(cfg: ml_collections.ConfigDict, params: dict,
                      shardings=None) -> LensTransformer:
    """A LensTransformer whose parameters are ``params`` (``{path: array}``, JAX layout)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    pure = nnx.to_pure_dict(state)
    expected = keymap.flatten(pure)
    missing = sorted("/".join(p) for p in set(expected) - set(params))
    if missing:
        raise CheckpointError(f"parameters missing for the model: {missing}")
    flat_shardings = keymap.flatten(shardings) if shardings is not None else {}
    arrays = {}
    for p, leaf in expected.items():
        if tuple(params[p].shape) != tuple(leaf.shape):
            raise CheckpointError(f"parameter {'/'.join(p)} has shape {tuple(params[p].shape)}, "
                                  f"the model expects {tuple(leaf.shape)}")
        arrays[p] = (jax.device_put(params[p], flat_shardings[p]) if p in flat_shardings
                     else jnp.asarray(params[p]))
    nnx.replace_by_pure_dict(state, keymap.unflatten(arrays))
    return nnx.merge(graphdef, state)


def load_transformer(path: str | os.PathLike, dtype=None, compute_dtype=None,
                     shardings=None, progress: bool = False, **config_overrides) -> LensTransformer:
    """Loads the denoiser from a diffusers folder or an orbax checkpoint written by ``lens-convert``.

    ``dtype``: parameter dtype (default: the checkpoint's). ``compute_dtype``: activation dtype
    (default: the parameter dtype). ``shardings``: optional nested dict of shardings (same tree as
    the model's parameters) to place each parameter as soon as it is read. Other keyword arguments
    override runtime config fields (``remat``, ``attention``, ...).
    """
    path = Path(path)
    cfg = read_config(path, **config_overrides)
    params: dict = {}
    stored_dtype = None
    for _, group, flat in _iter_groups(path, cfg, dtype=dtype, progress=progress):
        for m in group:
            local = _in_group(m).path
            array = flat[local]
            stored_dtype = stored_dtype or array.dtype
            if m.path[0] == "blocks":
                if m.path not in params:
                    params[m.path] = np.empty((cfg.num_layers,) + array.shape, array.dtype)
                params[m.path][m.index] = array
            else:
                params[m.path] = array
    param_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(stored_dtype)
    cfg.param_dtype = param_dtype.name
    cfg.dtype = jnp.dtype(compute_dtype).name if compute_dtype is not None else param_dtype.name
    return model_from_params(cfg, params, shardings)


def model_params(model: LensTransformer) -> dict:
    """``{path: array}`` of the model's parameters (arrays stay where they live)."""
    return keymap.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def save_transformer(model: LensTransformer, out_dir: str | os.PathLike, dtype=None,
                     max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> Path:
    """Writes ``model`` as a diffusers-format folder (config.json + sharded safetensors + index)."""
    cfg = model.config
    params = model_params(model)
    mappings = transformer_mappings(cfg)
    with output_guard.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_json(tmp / "config.json", config_lib.to_diffusers_config(cfg))
        writer = ShardedWriter(tmp, WEIGHTS_PREFIX, max_shard_bytes)
        for key, tensor in keymap.torch_tensors(params, mappings):
            writer.add(key, tensor.astype(dtype) if dtype is not None else tensor)
        writer.finish()
    return storage.native(out_dir)


# ----------------------------------------------------------------------------- disk to disk

def convert(src: str | os.PathLike, out: str | os.PathLike, to: str, dtype=None,
            max_shard_bytes: int = 2 << 30, overwrite: bool = False, progress: bool = True) -> Path:
    """Streams a checkpoint (diffusers folder or our orbax layout) to ``to`` = diffusers | orbax.

    Holds one block's tensors in memory at a time (plus one output shard for diffusers). A
    ``gs://`` source is first copied to a local temporary folder; a ``gs://`` output is uploaded.
    """
    if to not in ("diffusers", "orbax"):
        raise ValueError(f"to={to!r}: expected 'diffusers' or 'orbax'")
    output_guard.check_output(out, {"--src": src})
    if overwrite:
        output_guard.check_replaceable(out, DIFFUSERS_PATTERNS if to == "diffusers" else
                                       ORBAX_PATTERNS, f"lens-convert to-{to}")
    read_config(src)  # a source that is no checkpoint fails before any download
    with storage.local_dir(src) as local_src:
        _convert(local_src, out, to, dtype, max_shard_bytes, overwrite, progress)
    return storage.native(out)


def _convert(src: Path, out: str | os.PathLike, to: str, dtype, max_shard_bytes: int, overwrite: bool,
             progress: bool) -> None:
    cfg = read_config(src)
    with output_guard.atomic_output_dir(out, overwrite=overwrite) as tmp:
        if to == "diffusers":
            write_json(tmp / "config.json", config_lib.to_diffusers_config(cfg))
            writer = ShardedWriter(tmp, WEIGHTS_PREFIX, max_shard_bytes)
        else:
            write_json(tmp / ORBAX_MARKER, {"format": ORBAX_FORMAT,
                                            "config": config_lib.to_diffusers_config(cfg)})
        for name, group, flat in _iter_groups(src, cfg, dtype=dtype, progress=progress):
            output_guard.raise_if_interrupted()  # orbax's event loop may have dropped a Ctrl-C
            if to == "orbax":
                _orbax_save(tmp / name, keymap.unflatten(flat))
                continue
            local = [_in_group(m) for m in group]
            for key, tensor in keymap.torch_tensors(flat, local):
                writer.add(key, tensor)
        if to == "diffusers":
            writer.finish()


def tensor_count(cfg: ml_collections.ConfigDict) -> int:
    """Number of checkpoint tensors for ``cfg`` (1264 for the released model)."""
    return len(transformer_mappings(cfg))

