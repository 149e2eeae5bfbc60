"""LoRA math on the scanned blocks: ``y = x W + b + scale * dropout(x) A B``, ``scale = alpha / r``.

Adapter parameters (the trainable tree) mirror ``BlockStack``: for each target parameter name
``{"lora_a": [L, *in_shape, r], "lora_b": [L, r, *out_shape]}`` (stacked on the scan axis like the
base kernels ``[L, *in_shape, *out_shape]``); ``B`` starts at zero, so a fresh adapter changes
nothing. ``A`` starts uniform in ``+-1/sqrt(fan_in)`` (PEFT's default, kaiming-uniform with a=sqrt(5)).
In the PyTorch layout (``keys``): ``lora_A.weight = A.reshape(fan_in, r).T``,
``lora_B.weight = B.reshape(r, fan_out).T``, and ``W_torch += scale * lora_B @ lora_A``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec

from lens_jax.lora import keys


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how: rank ``r``, ``alpha`` (scale = alpha / r), dropout on the adapter's
    input, and the target modules (diffusers names, ``keys.TARGETS``)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    merge_in_step: bool = False   # fold s A B into each block's kernel inside the step (merge_adapter)

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    @property
    def params(self) -> tuple[str, ...]:
        """The BlockStack parameter names adapted."""
        return tuple(keys.TARGETS[m] for m in self.targets)

    @classmethod
    def from_config(cls, lora: ml_collections.ConfigDict) -> "LoraSpec":
        """From a training config's ``lora`` section (``alpha`` 0 means alpha = rank)."""
        rank = int(lora.rank)
        if rank <= 0:
            raise ValueError(f"config.lora.rank={rank}: a LoRA run needs a rank >= 1")
        if not 0.0 <= float(lora.dropout) < 1.0:
            raise ValueError(f"config.lora.dropout={lora.dropout}: expected 0 <= dropout < 1")
        merge = bool(lora.get("merge_in_step", False))
        if merge and float(lora.dropout) > 0:
            raise ValueError("config.lora.merge_in_step=True folds the adapter into the kernel: "
                             "it cannot drop the adapter's input (set config.lora.dropout=0)")
        return cls(rank, float(lora.alpha) or float(rank), keys.select_targets(lora.targets),
                   float(lora.dropout), merge)


def split_kernel(shape: tuple[int, ...], param: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A stacked kernel shape ``[L, *in, *out]`` -> ``(in_shape, out_shape)``."""
    n_in = keys.input_axes(param)
    return tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


def adapter_shapes(spec: LoraSpec, blocks: dict) -> dict:
    """``{param: {"lora_a": shape, "lora_b": shape}}`` from the block parameters (arrays or
    ShapeDtypeStructs, the ``blocks`` subtree of the model's pure dict)."""
    out = {}
    for param in spec.params:
        shape = tuple(blocks[param]["kernel"].shape)
        in_shape, out_shape = split_kernel(shape, param)
        out[param] = {"lora_a": (shape[0],) + in_shape + (spec.rank,),
                      "lora_b": (shape[0], spec.rank) + out_shape}
    return out


def init_adapters(key: jax.Array, spec: LoraSpec, blocks: dict, dtype=jnp.float32) -> dict:
    """Fresh adapters: A uniform(+-1/sqrt(fan_in)), B zero (the adapted model equals the base)."""
    out = {}
    for i, (param, shapes) in enumerate(adapter_shapes(spec, blocks).items()):
        a_shape = shapes["lora_a"]
        fan_in = int(np.prod(a_shape[1:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        out[param] = {"lora_a": jax.random.uniform(jax.random.fold_in(key, i), a_shape, dtype,
                                                   -bound, bound),
                      "lora_b": jnp.zeros(shapes["lora_b"], dtype)}
    return out


def logical_specs(spec: LoraSpec, block_specs: dict) -> dict:
    """Logical axis names of the adapters from the base kernels' (the rank axis unnamed: replicated)."""
    out = {}
    for param in spec.params:
        names = tuple(block_specs[param]["kernel"])
        n_in = keys.input_axes(param)
        out[param] = {"lora_a": PartitionSpec(*names[:1 + n_in], None),
                      "lora_b": PartitionSpec(names[0], None, *names[1 + n_in:])}
    return out


def scanned(adapters: dict, spec: LoraSpec, dropout_key: jax.Array | None = None) -> dict:
    """The per-layer tree ``LensTransformer.forward_packed(adapters=...)`` scans with the blocks:
    each adapter plus ``lora_scale [L]`` and, with dropout and a key, ``lora_dropout [L]`` and
    ``lora_key [L, 2]`` (one key per layer and module)."""
    out = {}
    for i, (param, p) in enumerate(adapters.items()):
        layers = p["lora_a"].shape[0]
        entry = dict(p, lora_scale=jnp.full((layers,), spec.scale, jnp.float32))
        if spec.merge_in_step:
            entry["lora_merge"] = jnp.zeros((layers,), jnp.bool_)  # its presence is the switch
        if spec.dropout > 0 and dropout_key is not None:
            entry["lora_dropout"] = jnp.full((layers,), spec.dropout, jnp.float32)
            entry["lora_key"] = jax.random.split(jax.random.fold_in(dropout_key, i), layers)
        out[param] = entry
    return out


def merge_adapter(p: dict, dtype) -> dict:
    """One block's ``{"kernel": W + scale A B, "bias"}`` in ``dtype``: the adapted projection is
    then one matmul, whose output the remat policies save as in full fine-tuning (adding the
    adapter's product separately kept one more ``[tokens, out]`` activation per module and block
    under ``save_dots_no_batch``; docs/training.md), at the cost of the weight-gradient matmul."""
    delta = jnp.tensordot(p["lora_a"].astype(dtype), p["lora_b"].astype(dtype), axes=1)
    return {"kernel": p["kernel"].astype(dtype) + delta * p["lora_scale"].astype(dtype),
            "bias": p.get("bias")}


def lora_delta(x: jax.Array, p: dict, dtype, n_in: int) -> jax.Array:
    """``scale * dropout(x) A B`` for one layer's adapter ``p`` (``lora_a [*in, r]``,
    ``lora_b [r, *out]``, ``lora_scale`` scalar; optional ``lora_key``/``lora_dropout``)."""
    if "lora_key" in p:
        keep = 1.0 - p["lora_dropout"]
        mask = jax.random.bernoulli(p["lora_key"], keep, x.shape)
        x = jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))
    h = jnp.tensordot(x.astype(dtype), p["lora_a"].astype(dtype), axes=n_in)  # [..., r]
    y = jnp.tensordot(h, p["lora_b"].astype(dtype), axes=1)
    return y * p["lora_scale"].astype(dtype)


def merged_blocks(blocks: dict, adapters: dict, scale: float) -> dict:
    """Block parameters with ``kernel += scale * A B`` (float32 sum, cast back) for each adapter."""
    out = dict(blocks)
    for param, p in adapters.items():
        kernel = blocks[param]["kernel"]
        delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(
            jnp.asarray(p["lora_a"], jnp.float32), jnp.asarray(p["lora_b"], jnp.float32))
        out[param] = dict(blocks[param],
                          kernel=(jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype))
    return out


def to_torch(p: dict, param: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer of an adapter as PyTorch ``(lora_A [r, in], lora_B [out, r])`` float32."""
    a = np.asarray(p["lora_a"][layer], np.float32)
    b = np.asarray(p["lora_b"][layer], np.float32)
    r = a.shape[-1]
    return np.ascontiguousarray(a.reshape(-1, r).T), np.ascontiguousarray(b.reshape(r, -1).T)
