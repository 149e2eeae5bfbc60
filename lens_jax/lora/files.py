"""LoRA files: read either spelling (``keys``), check them against the model, merge them into its
weights; write the adapters of a run as a PEFT or kohya file.

Merging works in the PyTorch layout and reuses the checkpoint key map: for each adapted module the
delta ``scale * alpha / r * lora_B @ lora_A`` (``[out, in]``) goes through the same ``to_jax``
transform as the module's weight (transpose and the fused ``[3, heads, head_dim]`` / ``[heads,
head_dim]`` reshapes), so the merged model is exactly what PyTorch gets by adding the delta to
``weight``. rank and alpha: an ``.alpha`` tensor (kohya), else ``adapter_config.json`` beside the
file (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else the file's safetensors metadata
(``lora_adapter_metadata``, as diffusers writes it), else alpha = rank.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lens_jax.errors import LoraFileError
from lens_jax.lora import adapters as adapters_lib
from lens_jax.lora import keys

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"


@dataclasses.dataclass
class LoraWeights:
    """Adapters of a file in the PyTorch layout: ``{(layer, module): (A [r, in], B [out, r], alpha)}``."""

    source: str
    spelling: str
    modules: dict
    rslora: bool = False

    def factor(self, layer: int, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) of one module."""
        a, _, alpha = self.modules[(layer, module)]
        r = a.shape[0]
        return float(alpha) / (np.sqrt(r) if self.rslora else r)


def _show(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def _adapter_config(path: Path, metadata: dict) -> dict:
    beside = path.parent / ADAPTER_CONFIG
    if beside.is_file():
        try:
            return json.loads(beside.read_text())
        except ValueError as e:
            raise LoraFileError(f"{beside}: not JSON ({e})") from e
    raw = (metadata or {}).get(METADATA_KEY)
    if raw:
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise LoraFileError(f"{path}: metadata {METADATA_KEY!r} is not JSON ({e})") from e
        # diffusers may nest it per component ({"transformer": {...}}) or prefix the fields
        if isinstance(meta.get("transformer"), dict):
            meta = meta["transformer"]
        return {k.split(".")[-1]: v for k, v in meta.items()}
    return {}


def _pattern_value(pattern: dict, name: str):
    for pat, value in (pattern or {}).items():
        if name == pat or name.endswith("." + pat) or fnmatch.fnmatchcase(name, pat):
            return value
    return None


def read_lora(path: str | os.PathLike, model_config) -> LoraWeights:
    """Reads a LoRA safetensors file (PEFT or kohya keys, any prefix) and checks that every key
    names an adaptable module of this model with the right shapes; raises ``LoraFileError`` naming
    the offending keys otherwise."""
    from safetensors import SafetensorError, safe_open

    from lens_jax.checkpoints.safetensors_io import CheckpointError, check_safetensors_file
    from lens_jax.checkpoints.transformer import transformer_mappings

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise LoraFileError(f"{path}: no such LoRA file")
    try:
        check_safetensors_file(path)
        with safe_open(path, framework="numpy") as f:
            names, metadata = list(f.keys()), f.metadata() or {}
            tensors = {k: np.asarray(f.get_tensor(k)) for k in names}
    except (CheckpointError, OSError, SafetensorError) as e:
        raise LoraFileError(f"{path}: not a readable safetensors file ({e})") from e
    config = _adapter_config(path, metadata)
    parts: dict[tuple[int, str], dict] = {}
    unknown = []
    for name in names:
        parsed = keys.parse_key(name)
        if parsed is None:
            unknown.append(name)
            continue
        parts.setdefault((parsed.layer, parsed.module), {})[parsed.which] = (name, tensors[name])
    if unknown:
        raise LoraFileError(f"{path}: keys that are neither PEFT (transformer_blocks.N.MODULE."
                            f"lora_A.weight) nor kohya (lora_unet_transformer_blocks_N_MODULE."
                            f"lora_down.weight) LoRA keys: {_show(sorted(unknown))}")
    if not parts:
        raise LoraFileError(f"{path}: no LoRA tensors in the file")
    base = {m.key: m for m in transformer_mappings(model_config)}
    problems = []
    modules = {}
    for (layer, module), found in sorted(parts.items()):
        some_key = next(iter(found.values()))[0]
        if module not in keys.TARGETS:
            problems.append(f"{some_key}: module {module!r} cannot take a LoRA (adaptable: "
                            f"{', '.join(keys.TARGETS)})")
            continue
        weight = f"transformer_blocks.{layer}.{module}.weight"
        if weight not in base:
            problems.append(f"{some_key}: layer {layer} does not exist (the model has "
                            f"{model_config.num_layers} blocks)")
            continue
        if "A" not in found or "B" not in found:
            problems.append(f"{some_key}: no matching lora_{'B' if 'A' in found else 'A'} / "
                            f"lora_{'up' if 'A' in found else 'down'} tensor")
            continue
        (a_key, a), (b_key, b) = found["A"], found["B"]
        n_out, n_in = base[weight].torch_shape
        r = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != n_in or b.shape != (n_out, r):
            problems.append(f"{a_key} {tuple(a.shape)} / {b_key} {tuple(b.shape)}: expected "
                            f"[r, {n_in}] / [{n_out}, r] for {weight} {(n_out, n_in)}")
            continue
        if "alpha" in found:
            alpha = float(np.asarray(found["alpha"][1], np.float32).reshape(-1)[0])
        else:
            alpha = _pattern_value(config.get("alpha_pattern"), f"transformer_blocks.{layer}.{module}")
            alpha = float(alpha if alpha is not None else config.get("lora_alpha") or r)
        modules[(layer, module)] = (a.astype(np.float32), b.astype(np.float32), alpha)
    if problems:
        raise LoraFileError(f"{path} does not fit this model ({model_config.num_layers} blocks, "
                            f"width {base['img_in.weight'].torch_shape[0]}): " + "; ".join(problems[:8])
                            + (f" ... ({len(problems)} problems)" if len(problems) > 8 else ""))
    return LoraWeights(str(path), keys.spelling(names), modules, bool(config.get("use_rslora", False)))


def merge_lora(model, lora: LoraWeights | str | os.PathLike, scale: float = 1.0):
    """Adds ``scale * alpha/r * B @ A`` of every module of ``lora`` to ``model``'s weights, in place
    (each kernel keeps its dtype and sharding; the sum is float32). Returns the model."""
    from lens_jax.checkpoints import keymap
    from lens_jax.checkpoints.transformer import transformer_mappings

    cfg = model.config
    if not isinstance(lora, LoraWeights):
        lora = read_lora(lora, cfg)
    base = {m.key: m for m in transformer_mappings(cfg)}
    state = nnx.state(model, nnx.Param)
    flat = keymap.flatten(nnx.to_pure_dict(state))
    by_module: dict[str, list[int]] = {}
    for layer, module in lora.modules:
        by_module.setdefault(module, []).append(layer)
    for module, layers in by_module.items():
        m = base[f"transformer_blocks.0.{module}.weight"]
        kernel = flat[m.path]
        n_layers = kernel.shape[0]
        r = max(lora.modules[(i, module)][0].shape[0] for i in layers)
        n_out, n_in = m.torch_shape
        a = np.zeros((n_layers, r, n_in), np.float32)  # ranks padded with zeros: exact
        b = np.zeros((n_layers, n_out, r), np.float32)
        factor = np.zeros((n_layers,), np.float32)
        for i in layers:
            ai, bi, _ = lora.modules[(i, module)]
            a[i, :ai.shape[0]], b[i, :, :ai.shape[0]] = ai, bi
            factor[i] = scale * lora.factor(i, module)
        _check_layout(m, kernel.shape[1:])
        flat[m.path] = _add_deltas(kernel, a, b, factor)
    nnx.replace_by_pure_dict(state, keymap.unflatten(flat))
    nnx.update(model, state)
    return model


def _check_layout(m, layer_shape: tuple[int, ...]) -> None:
    """The merge maps a torch ``[out, in]`` delta to the kernel layout as ``delta.T.reshape(layer
    shape)``; this checks that it is the key map's own ``to_jax`` for this weight (on a probe)."""
    probe = np.arange(int(np.prod(m.torch_shape)), dtype=np.float32).reshape(m.torch_shape)
    if not np.array_equal(m.to_jax(probe), probe.T.reshape(layer_shape)):
        raise NotImplementedError(f"{m.key}: its key map layout is not a transposed Linear weight")


@jax.jit
def _add_deltas(kernel: jax.Array, a: jax.Array, b: jax.Array, factor: jax.Array) -> jax.Array:
    """``kernel[i] += (factor[i] * b[i] @ a[i]).T`` in the kernel's layer layout, layer by layer
    (one layer's float32 delta at a time); the kernel keeps its dtype (and sharding)."""
    def body(i, k):
        delta = ((b[i] @ a[i]) * factor[i]).T.reshape(k.shape[1:])
        return k.at[i].set((k[i].astype(jnp.float32) + delta).astype(k.dtype))
    return jax.lax.fori_loop(0, kernel.shape[0], body, kernel)


def lora_tensors(adapters: dict, spec: adapters_lib.LoraSpec, spelling: str = "peft") -> dict:
    """``{key: float32 array}`` of a run's adapters (``{param: {"lora_a", "lora_b"}}`` in the JAX
    layout) in the PEFT (no prefix) or kohya spelling."""
    if spelling not in ("peft", "kohya"):
        raise ValueError(f"LoRA format {spelling!r}: expected peft or kohya")
    name = keys.peft_key if spelling == "peft" else keys.kohya_key
    out = {}
    for module in spec.targets:
        param = keys.TARGETS[module]
        for layer in range(np.asarray(adapters[param]["lora_a"]).shape[0]):
            a, b = adapters_lib.to_torch(adapters[param], param, layer)
            out[name(layer, module, "A")] = a
            out[name(layer, module, "B")] = b
            if spelling == "kohya":
                out[name(layer, module, "alpha")] = np.asarray(spec.alpha, np.float32)
    return out


def adapter_config(spec: adapters_lib.LoraSpec) -> dict:
    """The PEFT ``adapter_config.json`` of ``spec``."""
    return {"peft_type": "LORA", "r": spec.rank, "lora_alpha": spec.alpha,
            "target_modules": list(spec.targets), "lora_dropout": spec.dropout, "bias": "none",
            "use_rslora": False, "init_lora_weights": True, "task_type": None}


def write_lora(out: str | os.PathLike, adapters: dict, spec: adapters_lib.LoraSpec,
               spelling: str = "peft", overwrite: bool = False) -> Path:
    """Writes ``out/pytorch_lora_weights.safetensors`` (+ ``adapter_config.json``), atomically."""
    from safetensors.numpy import save_file

    from lens_jax.checkpoints.safetensors_io import write_json
    from lens_jax.output_guard import atomic_output_dir

    tensors = lora_tensors(adapters, spec, spelling)
    config = adapter_config(spec)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", METADATA_KEY: json.dumps(config)})
        write_json(tmp / ADAPTER_CONFIG, config)
    return Path(out)
