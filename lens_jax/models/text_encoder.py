"""GPT-OSS decoder as the Lens text encoder (spec 4.2/4.3), in Flax NNX.

Runs the decoder layers up to the deepest selected one and returns the selected layers'
residual streams (no final norm, no LM head). The layers' parameters are stacked on a leading
``layers`` axis and run under one ``jax.lax.scan``; the per-layer attention window (sliding on
``sliding_attention`` layers, unbounded on ``full_attention`` ones) is scanned data.

Experts are either dense (``gate_up [E, hidden, 2*I]``, ``down [E, I, hidden]``, gate/up columns
interleaved as in the checkpoint) or MXFP4-packed (uint8 blocks + scales, ``[E, out, in/32, 16]``),
which are dequantized inside the jitted forward, one layer at a time.

Under a mesh (``encode(..., mesh=, rules=)`` or an active ``lens_jax.sharding.use_rules``) the MoE
runs in ``jax.shard_map`` (``moe_partitioned``): tokens split over the batch axes, experts over the
``experts`` rule's axes; ``text_encoder_shardings`` places the parameters by the same logical names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lens_jax import sharding
from lens_jax.models import mxfp4 as mxfp4_lib

LAYER_SLIDING = "sliding_attention"
LAYER_FULL = "full_attention"
UNBOUNDED_WINDOW = 1 << 30
MOE_IMPLS = ("auto", "dense", "ragged")


def resolve_moe_impl(moe_impl: str, backend: str | None = None) -> str:
    """``auto`` -> ``ragged`` (top-4 grouped matmuls, 8x fewer expert FLOPs) on TPU/GPU, where
    ``jax.lax.ragged_dot`` has a native kernel; ``dense`` (every expert, masked combine) on CPU,
    where XLA lowers ragged_dot to a masked dense product and it measured 2-4x slower."""
    if moe_impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {moe_impl!r}")
    if moe_impl != "auto":
        return moe_impl
    return "ragged" if (backend or jax.default_backend()) in ("tpu", "gpu", "cuda", "rocm") else "dense"


@dataclasses.dataclass(frozen=True)
class RopeParams:
    """Resolved rotary parameters: base, YaRN settings (``rope_type`` "default" or "yarn")."""

    rope_type: str = "yarn"
    theta: float = 150000.0
    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = False
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    """The GPT-OSS hyper-parameters the encoder needs (defaults: gpt-oss-20b, spec 4.1)."""

    vocab_size: int = 201088
    hidden_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2880
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    rms_norm_eps: float = 1e-5
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    max_position_embeddings: int = 131072
    rope: RopeParams = RopeParams()
    pad_token_id: int = 199999

    def __post_init__(self):
        if not self.layer_types:
            types = tuple(LAYER_SLIDING if i % 2 == 0 else LAYER_FULL
                          for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {LAYER_SLIDING, LAYER_FULL})
        if bad:
            raise ValueError(f"unknown layer_types {bad}; expected {LAYER_SLIDING!r} or {LAYER_FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_hf(cls, hf: Mapping, source: str = "config.json") -> "GptOssConfig":
        """From a transformers ``GptOssConfig`` dict (``config.json``); raises ValueError if unusable."""
        if hf.get("model_type") != "gpt_oss":
            raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'gpt_oss' "
                             "(the Lens text encoder is GPT-OSS)")
        if hf.get("attention_bias", True) is not True:
            raise ValueError(f"{source}: attention_bias={hf.get('attention_bias')!r}; GPT-OSS "
                             "attention has biases")
        hidden = int(hf.get("hidden_size", 2880))
        heads = int(hf.get("num_attention_heads", 64))
        head_dim = hf.get("head_dim") or hidden // heads
        kwargs = {}
        for name in ("vocab_size", "num_hidden_layers", "num_key_value_heads", "intermediate_size",
                     "num_local_experts", "num_experts_per_tok", "sliding_window",
                     "max_position_embeddings"):
            if hf.get(name) is not None:
                kwargs[name] = int(hf[name])
        for name in ("rms_norm_eps", "swiglu_limit"):
            if hf.get(name) is not None:
                kwargs[name] = float(hf[name])
        if hf.get("pad_token_id") is not None:
            kwargs["pad_token_id"] = int(hf["pad_token_id"])
        if hf.get("layer_types"):
            kwargs["layer_types"] = tuple(hf["layer_types"])
        return cls(hidden_size=hidden, num_attention_heads=heads, head_dim=int(head_dim),
                   rope=resolve_rope(hf, source), **kwargs)


def resolve_rope(hf: Mapping, source: str = "config.json") -> RopeParams:
    """Rotary parameters from ``rope_parameters`` (transformers >= 5) or legacy ``rope_scaling``.

    Never silently falls back to plain RoPE when a YaRN block is present in either place.
    """
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping) or not isinstance(legacy, Mapping):
        raise ValueError(f"{source}: rope_parameters / rope_scaling must be objects")
    merged = dict(legacy)
    merged.update(params)
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    theta = merged.get("rope_theta", hf.get("rope_theta", 150000.0))
    if rope_type == "default":
        return RopeParams(rope_type="default", theta=float(theta), factor=1.0)
    if rope_type != "yarn":
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (GPT-OSS uses 'yarn')")
    original = merged.get("original_max_position_embeddings")
    if original is None:
        raise ValueError(f"{source}: YaRN needs original_max_position_embeddings")
    factor = merged.get("factor")
    if factor is None:
        factor = hf.get("max_position_embeddings", 131072) / original

    def optional(name):
        return None if merged.get(name) is None else float(merged[name])

    return RopeParams(
        rope_type="yarn", theta=float(theta), factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(merged.get("beta_fast") or 32), beta_slow=float(merged.get("beta_slow") or 1),
        truncate=bool(merged.get("truncate", True)), attention_factor=optional("attention_factor"),
        mscale=optional("mscale"), mscale_all_dim=optional("mscale_all_dim"))


def rope_frequencies(rope: RopeParams, head_dim: int) -> tuple[np.ndarray, float]:
    """``(inv_freq [head_dim/2] float32, attention_factor)`` for plain or YaRN RoPE (spec 4.2)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    pos_freqs = np.float32(rope.theta) ** exponents
    if rope.rope_type == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    else:
        attention_factor = mscale(rope.factor)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(rope.theta)))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(rope.factor) * pos_freqs)
    inv_freq = interpolation * ramp + extrapolation * (1 - ramp)
    return inv_freq.astype(np.float32), float(attention_factor)


# ---------------------------------------------------------------------------------------------
# Parameter layout


def param_specs(config: GptOssConfig, num_layers: int, mxfp4: bool
                ) -> dict[tuple[str, ...], tuple[tuple[int, ...], str, tuple]]:
    """``{path: (shape, kind, logical_axes)}`` of every parameter; kind is float, norm or packed.

    ``float`` arrays take the model dtype, ``norm`` arrays stay float32, ``packed`` are uint8.
    """
    c = config
    d, h, kv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    e, i2, inter = c.num_local_experts, 2 * c.intermediate_size, c.intermediate_size
    n = num_layers
    specs = {
        ("embed",): ((c.vocab_size, d), "float", ("vocab", "embed")),
        ("layers", "input_norm"): ((n, d), "norm", ("layers", "embed")),
        ("layers", "post_norm"): ((n, d), "norm", ("layers", "embed")),
        ("layers", "q_kernel"): ((n, d, h, hd), "float", ("layers", "embed", "heads", "head_dim")),
        ("layers", "q_bias"): ((n, h, hd), "float", ("layers", "heads", "head_dim")),
        ("layers", "k_kernel"): ((n, d, kv, hd), "float", ("layers", "embed", "kv_heads", "head_dim")),
        ("layers", "k_bias"): ((n, kv, hd), "float", ("layers", "kv_heads", "head_dim")),
        ("layers", "v_kernel"): ((n, d, kv, hd), "float", ("layers", "embed", "kv_heads", "head_dim")),
        ("layers", "v_bias"): ((n, kv, hd), "float", ("layers", "kv_heads", "head_dim")),
        ("layers", "o_kernel"): ((n, h, hd, d), "float", ("layers", "heads", "head_dim", "embed")),
        ("layers", "o_bias"): ((n, d), "float", ("layers", "embed")),
        ("layers", "sinks"): ((n, h), "float", ("layers", "heads")),
        ("layers", "router_kernel"): ((n, d, e), "float", ("layers", "embed", "experts")),
        ("layers", "router_bias"): ((n, e), "float", ("layers", "experts")),
        ("layers", "gate_up_bias"): ((n, e, i2), "float", ("layers", "experts", "mlp")),
        ("layers", "down_bias"): ((n, e, d), "float", ("layers", "experts", "embed")),
    }
    if mxfp4:
        (gu_b, gu_s), (dn_b, dn_s) = mxfp4_lib.packed_shapes(i2, d), mxfp4_lib.packed_shapes(d, inter)
        specs.update({
            ("layers", "gate_up_blocks"): ((n, e) + gu_b, "packed",
                                           ("layers", "experts", "mlp", "embed", None)),
            ("layers", "gate_up_scales"): ((n, e) + gu_s, "packed", ("layers", "experts", "mlp", "embed")),
            ("layers", "down_blocks"): ((n, e) + dn_b, "packed",
                                        ("layers", "experts", "embed", "mlp", None)),
            ("layers", "down_scales"): ((n, e) + dn_s, "packed", ("layers", "experts", "embed", "mlp")),
        })
    else:
        specs.update({
            ("layers", "gate_up"): ((n, e, d, i2), "float", ("layers", "experts", "embed", "mlp")),
            ("layers", "down"): ((n, e, inter, d), "float", ("layers", "experts", "mlp", "embed")),
        })
    return specs


def spec_dtype(kind: str, dtype) -> jnp.dtype:
    return {"float": jnp.dtype(dtype), "norm": jnp.dtype(jnp.float32), "packed": jnp.dtype(jnp.uint8)}[kind]


def _rule_pairs(rules) -> tuple:
    """Rules as ``(name, axes)`` pairs, from pairs (config) or a ``{name: axes}`` mapping (loader)."""
    return tuple(rules.items()) if isinstance(rules, Mapping) else tuple((n, a) for n, a in rules)


def text_encoder_shardings(config: GptOssConfig, num_layers: int, mxfp4: bool, mesh: Mesh, rules
                           ) -> dict:
    """NamedShardings of the parameter tree ``{"embed": ..., "layers": {name: ...}}`` (as
    ``TextEncoder.params()`` returns it) on ``mesh``.

    Each parameter's logical axes (``param_specs``) are mapped by ``rules`` (``(name, axes)`` pairs,
    first match wins, or a mapping), exactly as the trainer places the denoiser; a dim that its
    mesh axes do not divide is replicated. With ``DEFAULT_RULES`` the experts dim goes over
    ``fsdp`` (and ``tensor``) where their sizes divide ``num_local_experts``. ``encode`` derives
    its ``moe_partitioned`` layout from the same shardings.
    """
    specs = param_specs(config, num_layers, mxfp4)
    logical = unflatten_dict({p: PartitionSpec(*axes) for p, (_, _, axes) in specs.items()})
    abstract = unflatten_dict({p: jax.ShapeDtypeStruct(shape, spec_dtype(kind, jnp.float32))
                               for p, (shape, kind, _) in specs.items()})
    return sharding.param_shardings(logical, abstract, mesh, _rule_pairs(rules))


def abstract_params(config: GptOssConfig, num_layers: int, mxfp4: bool, dtype=jnp.bfloat16,
                    mesh: Mesh | None = None, rules=()) -> dict:
    """``jax.ShapeDtypeStruct`` parameter tree (sharded by ``text_encoder_shardings`` when a mesh
    is given), for ``jax.jit(...).lower`` without weights."""
    specs = param_specs(config, num_layers, mxfp4)
    shardings = (text_encoder_shardings(config, num_layers, mxfp4, mesh, rules) if mesh is not None
                 else None)
    return unflatten_dict({p: jax.ShapeDtypeStruct(
        shape, spec_dtype(kind, dtype),
        sharding=None if shardings is None else shardings[p[0]] if len(p) == 1 else shardings[p[0]][p[1]])
        for p, (shape, kind, _) in specs.items()})


def random_params(config: GptOssConfig, num_layers: int, mxfp4: bool, dtype=jnp.float32,
                  seed: int = 0, scale: float = 0.05) -> dict[tuple[str, ...], np.ndarray]:
    """Random host parameters (every tensor random; packed scales near 2^0) for tests/benchmarks."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, (shape, kind, _) in param_specs(config, num_layers, mxfp4).items():
        if kind == "packed":
            if path[-1].endswith("scales"):
                out[path] = rng.integers(118, 124, size=shape, dtype=np.uint8)
            else:
                out[path] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif kind == "norm":
            out[path] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[path] = (scale * rng.standard_normal(shape)).astype(jnp.dtype(dtype))
    return out


# ---------------------------------------------------------------------------------------------
# Pure math


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """``weight * x / rms(x)`` computed in float32, cast back to ``x.dtype``."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * xf).astype(x.dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Half-split rotation of ``x [B, L, H, D]`` by ``cos/sin [L, D/2]`` (already scaled)."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, sinks: jnp.ndarray,
              allowed: jnp.ndarray) -> jnp.ndarray:
    """GQA attention with a per-head sink logit.

    q ``[B, L, H, D]``, k/v ``[B, L, KV, D]``, sinks ``[H]``, allowed ``[B, L(query), L(key)]``.
    Query head ``g`` reads KV head ``g // (H // KV)``. Returns ``[B, L, H, D]``.
    """
    b, length, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, length, kv, h // kv, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = logits * (d ** -0.5)
    logits = jnp.where(allowed[:, None, None, :, :], logits, -jnp.inf)
    sink = sinks.astype(jnp.float32).reshape(1, kv, h // kv, 1, 1)
    # softmax over [keys, sink]; the sink column is dropped afterwards.
    top = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
    weights = jnp.exp(logits - top)
    denom = jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(sink - top)
    probs = (weights / denom).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, length, h, d).astype(v.dtype)


def swiglu(gate_up: jnp.ndarray, limit: float, alpha: float) -> jnp.ndarray:
    """Clamped SwiGLU of interleaved ``[..., 2I]`` (gate = even columns, up = odd) -> ``[..., I]``."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


def route(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray, top_k: int
          ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``x [T, D]`` -> (expert ids ``[T, k]``, weights ``[T, k]`` float32: softmax over the k logits)."""
    logits = (x @ kernel + bias).astype(jnp.float32)
    top_logits, top_ids = jax.lax.top_k(logits, top_k)
    return top_ids, jax.nn.softmax(top_logits, axis=-1)


def moe_dense(x, ids, weights, gate_up, gate_up_bias, down, down_bias, limit, alpha):
    """Every expert on every token (batched over experts), combined with the routing weights
    (zero for unchosen experts). Exact; 8x the FLOPs of top-4-of-32 but plain batched matmuls
    that shard over an ``experts`` mesh axis.

    x ``[T, D]``; gate_up ``[E, D, 2I]``; down ``[E, I, D]``. Ids outside ``0..E-1`` (experts held
    by another shard) contribute nothing.
    """
    num_experts = gate_up.shape[0]
    combine = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)
    gu = jnp.einsum("td,edf->etf", x, gate_up, preferred_element_type=jnp.float32)
    gu = (gu + gate_up_bias[:, None, :].astype(jnp.float32)).astype(x.dtype)
    act = swiglu(gu, limit, alpha)
    y = jnp.einsum("etf,efd->etd", act, down, preferred_element_type=jnp.float32)
    y = y + down_bias[:, None, :].astype(jnp.float32)
    return jnp.einsum("etd,te->td", y, combine).astype(x.dtype)


def moe_ragged(x, ids, weights, gate_up, gate_up_bias, down, down_bias, limit, alpha):
    """Token-expert pairs sorted by expert and run as grouped matmuls (``jax.lax.ragged_dot``).

    Only the chosen experts' FLOPs where the backend has a native grouped matmul (TPU); XLA's
    generic fallback (CPU) masks a dense product and is slower than ``moe_dense``.

    Ids outside ``0..E-1`` (experts held by another shard) contribute nothing: their pairs sort
    last and are cut, so the grouped matmuls have ``T * min(k, E)`` rows (each token picks distinct
    experts, so at most ``min(k, E)`` of its pairs are local).
    """
    num_tokens, top_k = ids.shape
    num_experts = gate_up.shape[0]
    flat_ids = ids.reshape(-1)
    local = (flat_ids >= 0) & (flat_ids < num_experts)
    key = jnp.where(local, flat_ids, num_experts)
    rows = num_tokens * min(top_k, num_experts)
    order = jnp.argsort(key, stable=True)[:rows]
    sorted_ids, kept = key[order], local[order]
    token = order // top_k
    group_sizes = jnp.bincount(key, length=num_experts).astype(jnp.int32)  # drops id num_experts
    xs = x[token]
    gu = jax.lax.ragged_dot(xs, gate_up, group_sizes, preferred_element_type=jnp.float32)
    gu = (gu + gate_up_bias[sorted_ids].astype(jnp.float32)).astype(x.dtype)
    act = swiglu(gu, limit, alpha)
    y = jax.lax.ragged_dot(act, down, group_sizes, preferred_element_type=jnp.float32)
    y = (y + down_bias[sorted_ids].astype(jnp.float32)) * weights.reshape(-1)[order][:, None]
    y = jnp.where(kept[:, None], y, 0.0)
    return jnp.zeros((num_tokens, x.shape[-1]), jnp.float32).at[token].add(y).astype(x.dtype)


EXPERT_PARAMS = ("gate_up", "down", "gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales",
                 "gate_up_bias", "down_bias")


@dataclasses.dataclass(frozen=True)
class MoeLayout:
    """How ``moe_partitioned`` splits one layer's MoE over ``mesh`` (static and hashable).

    Tokens ``[T]`` are split over ``token_axes``, experts ``[E]`` over ``expert_axes``; ``specs``
    holds each per-layer expert tensor's PartitionSpec (its leading dim is the experts dim).
    """

    mesh: Mesh
    token_axes: tuple[str, ...]
    expert_axes: tuple[str, ...]
    specs: tuple[tuple[str, PartitionSpec], ...]


def _spec_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def moe_layout(config: GptOssConfig, num_layers: int, mxfp4: bool, batch_size: int, mesh: Mesh,
               rules) -> MoeLayout:
    """The MoE layout implied by ``text_encoder_shardings`` (experts) and the ``batch`` rule fitted
    to ``batch_size`` rows (tokens), on ``mesh``."""
    layers = text_encoder_shardings(config, num_layers, mxfp4, mesh, rules)["layers"]
    specs = {n: PartitionSpec(*tuple(s.spec)[1:]) for n, s in layers.items() if n in EXPERT_PARAMS}
    expert_axes = {n: _spec_axes(s[0] if len(s) else None) for n, s in specs.items()}
    if len(set(expert_axes.values())) != 1:
        raise ValueError(f"text encoder expert tensors are split over different mesh axes along the "
                         f"experts dim: {expert_axes}; give them one 'experts' rule")
    rows = sharding.param_shardings({"rows": PartitionSpec("batch")},
                                    {"rows": jax.ShapeDtypeStruct((batch_size,), jnp.int32)},
                                    mesh, _rule_pairs(rules))["rows"]
    return MoeLayout(mesh=mesh, token_axes=_spec_axes(rows.spec[0] if len(rows.spec) else None),
                     expert_axes=next(iter(expert_axes.values())),
                     specs=tuple(sorted(specs.items())))


def moe_partitioned(layout: MoeLayout, moe_impl: str, x, ids, weights, experts: Mapping[str, jax.Array],
                    limit: float, alpha: float) -> jax.Array:
    """The MoE of one layer in ``jax.shard_map`` over ``layout.mesh``: exact, same result as the
    unsharded ``moe_dense``/``moe_ragged`` up to summation order.

    Each shard holds its tokens ``x [T/t, D]`` (routing ``ids``/``weights [T/t, k]``) and its
    experts (``experts``: the layer's expert tensors, MXFP4 or dense, dequantized here per shard).
    Tokens are all-gathered over the expert axes that also split tokens (chunk by chunk, under
    ``lax.map``, so the grouped matmuls stay ``[T/t * min(k, E_local), ...]``), each shard applies
    its local experts, and the partial sums are reduce-scattered back to their tokens; expert axes
    that do not split tokens are summed with ``psum``. Expert tensors split along another dim too
    (e.g. ``mlp`` over ``tensor``) are all-gathered along it per layer.
    """
    names = tuple(n for n, _ in layout.specs if n in experts)
    specs = dict(layout.specs)
    tokens = PartitionSpec(layout.token_axes or None)
    gather = tuple(a for a in layout.expert_axes if a in layout.token_axes)
    summed = tuple(a for a in layout.expert_axes if a not in layout.token_axes)
    moe = moe_ragged if moe_impl == "ragged" else moe_dense

    def local(x, ids, weights, *arrays):
        layer = {}
        for name, array in zip(names, arrays):
            for dim, entry in enumerate(specs[name]):
                if dim and entry is not None:
                    array = jax.lax.all_gather(array, _spec_axes(entry), axis=dim, tiled=True)
            layer[name] = array
        num_local = layer["gate_up_bias"].shape[0]
        offset = jax.lax.axis_index(layout.expert_axes) * num_local if layout.expert_axes else 0
        gate_up, down = expert_weights(layer, x.dtype)

        def run(chunk):
            xc, ic, wc = chunk
            return moe(xc, ic - offset, wc, gate_up, layer["gate_up_bias"], down, layer["down_bias"],
                       limit, alpha)

        if gather:  # [G, T/t, ...]: every token of the expert group, by source shard
            chunks = tuple(jax.lax.all_gather(t, gather, axis=0) for t in (x, ids, weights))
            y = jax.lax.psum_scatter(jax.lax.map(run, chunks), gather, scatter_dimension=0)
        else:
            y = run((x, ids, weights))
        return jax.lax.psum(y, summed) if summed else y

    in_specs = (tokens, tokens, tokens) + tuple(specs[n] for n in names)
    # check_vma=False: the weights all-gathered along a non-expert dim are the same on every shard
    # of that axis, which the varying-axes check cannot infer (jax 0.10 has no public
    # all_gather_invariant); the tests compare every layout with the unsharded MoE.
    return jax.shard_map(local, mesh=layout.mesh, in_specs=in_specs, out_specs=tokens,
                         check_vma=False)(
        x, ids, weights, *(experts[n] for n in names))


def expert_weights(layer: Mapping[str, jnp.ndarray], dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One layer's dense expert kernels ``(gate_up [E, D, 2I], down [E, I, D])``.

    MXFP4 layers are dequantized here (inside the jitted scan body, one layer at a time).
    """
    if "gate_up_blocks" in layer:
        gate_up = mxfp4_lib.dequantize(layer["gate_up_blocks"], layer["gate_up_scales"], dtype)
        down = mxfp4_lib.dequantize(layer["down_blocks"], layer["down_scales"], dtype)
        return jnp.swapaxes(gate_up, 1, 2), jnp.swapaxes(down, 1, 2)  # [E, out, in] -> [E, in, out]
    return layer["gate_up"], layer["down"]


def split_rows(layout: MoeLayout | None, t: jax.Array) -> jax.Array:
    """Keeps ``t [B or T, ...]`` split by rows over ``layout.token_axes`` (identity without a
    layout), so that XLA gathers the FSDP-split weights rather than the activations."""
    if layout is None:
        return t
    return jax.lax.with_sharding_constraint(
        t, NamedSharding(layout.mesh, PartitionSpec(layout.token_axes or None)))


def decoder_layer(config: GptOssConfig, moe_impl: str, h: jnp.ndarray, layer: Mapping[str, jnp.ndarray],
                  window: jnp.ndarray, valid: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray,
                  layout: MoeLayout | None = None) -> jnp.ndarray:
    """One pre-norm decoder layer on ``h [B, L, D]``; ``valid [B, L]`` is the key padding mask.

    With a ``layout`` the MoE is ``moe_partitioned``; without, it runs on the global token axis."""
    c = config
    b, length, d = h.shape
    rows = functools.partial(split_rows, layout)
    x = rms_norm(h, layer["input_norm"], c.rms_norm_eps)
    q = rows(jnp.einsum("bld,dhk->blhk", x, layer["q_kernel"]) + layer["q_bias"])
    k = rows(jnp.einsum("bld,dhk->blhk", x, layer["k_kernel"]) + layer["k_bias"])
    v = rows(jnp.einsum("bld,dhk->blhk", x, layer["v_kernel"]) + layer["v_bias"])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    pos = jnp.arange(length)
    causal = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    allowed = causal[None] & valid[:, None, :]
    a = rows(attention(q, k, v, layer["sinks"], allowed))
    h = rows(h + (jnp.einsum("blhk,hkd->bld", a, layer["o_kernel"]) + layer["o_bias"]).astype(h.dtype))

    x = rows(rms_norm(h, layer["post_norm"], c.rms_norm_eps).reshape(b * length, d))
    ids, weights = route(x, layer["router_kernel"], layer["router_bias"], c.num_experts_per_tok)
    ids, weights = rows(ids), rows(weights)
    if layout is not None:
        y = moe_partitioned(layout, moe_impl, x, ids, weights,
                            {n: v for n, v in layer.items() if n in EXPERT_PARAMS},
                            c.swiglu_limit, c.swiglu_alpha)
        return h + y.reshape(b, length, d)
    gate_up, down = expert_weights(layer, x.dtype)
    moe = moe_ragged if moe_impl == "ragged" else moe_dense
    y = moe(x, ids, weights, gate_up, layer["gate_up_bias"], down, layer["down_bias"],
            c.swiglu_limit, c.swiglu_alpha)
    return h + y.reshape(b, length, d)


def layer_windows(config: GptOssConfig, num_layers: int) -> np.ndarray:
    """Per-layer attention window (int32): ``sliding_window`` or unbounded."""
    return np.asarray([config.sliding_window if t == LAYER_SLIDING else UNBOUNDED_WINDOW
                       for t in config.layer_types[:num_layers]], np.int32)


def encode(params: Mapping, input_ids: jnp.ndarray, attention_mask: jnp.ndarray, *,
           config: GptOssConfig, selected: tuple[int, ...], moe_impl: str = "dense",
           mesh: Mesh | None = None, rules=None) -> list[jnp.ndarray]:
    """Pure forward: ``input_ids [B, L]`` + mask ``[B, L]`` -> selected layers' ``[B, L, D]``.

    ``params`` is ``{"embed": [V, D], "layers": {name: [N, ...]}}`` with N >= max(selected) + 1
    (extra layers are not run). Right padding is assumed (positions ``0..L-1``).

    ``mesh``/``rules`` (default: those of an active ``lens_jax.sharding.use_rules``, as inside the
    train step): on a mesh of more than one device the MoE is ``moe_partitioned`` (experts as
    ``text_encoder_shardings`` places them, tokens over the ``batch`` rule's axes) and the hidden
    states are kept split over the batch axes. Callable inside ``jax.jit`` or ``.lower`` as is.
    """
    if mesh is None:
        mesh, rules = sharding.active() or (None, None)
    layout = None
    if mesh is not None and mesh.size > 1:
        layers = params["layers"]
        layout = moe_layout(config, int(layers["input_norm"].shape[0]), "gate_up_blocks" in layers,
                            int(input_ids.shape[0]), mesh, rules or ())
    return _encode(params, input_ids, attention_mask, config=config, selected=tuple(selected),
                   moe_impl=moe_impl, layout=layout)


@functools.partial(jax.jit, static_argnames=("config", "selected", "moe_impl", "layout"))
def _encode(params: Mapping, input_ids: jnp.ndarray, attention_mask: jnp.ndarray, *,
            config: GptOssConfig, selected: tuple[int, ...], moe_impl: str,
            layout: MoeLayout | None) -> list[jnp.ndarray]:
    num_layers = max(selected) + 1
    layers = {name: value[:num_layers] if value.shape[0] > num_layers else value
              for name, value in params["layers"].items()}
    rows = functools.partial(split_rows, layout)
    h = rows(jnp.take(params["embed"], input_ids, axis=0))  # [B, L, D]
    b, length, d = h.shape
    valid = attention_mask.astype(bool)
    inv_freq, attention_factor = rope_frequencies(config.rope, config.head_dim)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
    # Slot of each layer in the output buffer; unselected layers write to a spare last slot.
    slots = np.full((num_layers,), len(selected), np.int32)
    for slot, layer_index in enumerate(selected):
        slots[layer_index] = slot
    windows = layer_windows(config, num_layers)

    def body(carry, xs):
        h, out = carry
        layer, window, slot = xs
        h = rows(decoder_layer(config, moe_impl, h, layer, window, valid, cos, sin, layout))
        out = jax.lax.dynamic_update_index_in_dim(out, h, slot, 0)
        return (h, out), None

    out = jnp.zeros((len(selected) + 1, b, length, d), h.dtype)
    (_, out), _ = jax.lax.scan(body, (h, out), (layers, jnp.asarray(windows), jnp.asarray(slots)))
    return [out[i] for i in range(len(selected))]


# ---------------------------------------------------------------------------------------------
# NNX holders


class DecoderStack(nnx.Module):
    """The decoder layers' parameters, each stacked on a leading ``layers`` axis."""

    def __init__(self, arrays: Mapping[str, jax.Array], axes: Mapping[str, tuple]):
        for name, value in arrays.items():
            setattr(self, name, nnx.Param(value, out_sharding=axes[name], eager_sharding=False))


class TextEncoder(nnx.Module):
    """GPT-OSS text encoder: ``encoder(input_ids, attention_mask)`` -> list of ``[B, L, hidden]``.

    Build with ``TextEncoder.from_arrays`` (the loader does) or ``TextEncoder.random`` (tests).
    """

    def __init__(self, config: GptOssConfig, arrays: Mapping[tuple[str, ...], jax.Array], *,
                 layers: Sequence[int] = (5, 11, 17, 23), mxfp4: bool = True, moe_impl: str = "auto"):
        self.config = config
        self.selected = check_layers(layers, config.num_hidden_layers)
        self.mxfp4 = bool(mxfp4)
        self.moe_impl = resolve_moe_impl(moe_impl)
        num_layers = max(self.selected) + 1
        specs = param_specs(config, num_layers, self.mxfp4)
        missing = sorted("/".join(p) for p in specs if p not in arrays)
        unexpected = sorted("/".join(p) for p in arrays if p not in specs)
        if missing or unexpected:
            raise ValueError(f"TextEncoder parameters: missing {missing}, unexpected {unexpected}")
        for path, (shape, _, _) in specs.items():
            if tuple(arrays[path].shape) != shape:
                raise ValueError(f"parameter {'/'.join(path)} has shape {tuple(arrays[path].shape)}, "
                                 f"expected {shape}")
        self.embed = nnx.Param(arrays[("embed",)], out_sharding=specs[("embed",)][2],
                               eager_sharding=False)
        self.layers = DecoderStack({p[1]: arrays[p] for p in specs if p[0] == "layers"},
                                   {p[1]: s[2] for p, s in specs.items() if p[0] == "layers"})

    @classmethod
    def random(cls, config: GptOssConfig, *, layers: Sequence[int], mxfp4: bool = False,
               dtype=jnp.float32, seed: int = 0, moe_impl: str = "auto") -> "TextEncoder":
        selected = check_layers(layers, config.num_hidden_layers)
        host = random_params(config, max(selected) + 1, mxfp4, dtype, seed)
        return cls(config, {p: jnp.asarray(a) for p, a in host.items()}, layers=selected,
                   mxfp4=mxfp4, moe_impl=moe_impl)

    def params(self) -> dict:
        """The raw arrays as ``{"embed": ..., "layers": {name: ...}}``."""
        layers = {name: var[...] for name, var in vars(self.layers).items()
                  if isinstance(var, nnx.Variable)}
        return {"embed": self.embed[...], "layers": layers}

    def __call__(self, input_ids, attention_mask=None, *, mesh: Mesh | None = None,
                 rules=None) -> list[jax.Array]:
        """Selected layers' hidden states; ``mesh``/``rules`` as in ``encode``."""
        if isinstance(input_ids, np.ndarray) and input_ids.size:  # host inputs are checked cheaply
            if input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size:
                raise ValueError(f"input_ids outside 0..{self.config.vocab_size - 1}: "
                                 f"min {input_ids.min()}, max {input_ids.max()}")
        if isinstance(attention_mask, np.ndarray) and attention_mask.ndim == 2:
            if not is_right_padded(attention_mask):
                raise ValueError("attention_mask is not right-padded (a valid token follows a padded "
                                 "one); the encoder assumes right padding, positions 0..L-1")
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        attention_mask = jnp.asarray(attention_mask).astype(bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        return encode(self.params(), input_ids, attention_mask, config=self.config,
                      selected=self.selected, moe_impl=self.moe_impl, mesh=mesh, rules=rules)

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed[...].dtype


def is_right_padded(mask: np.ndarray) -> bool:
    """Whether no valid token follows a padded one in any row of ``mask [..., L]`` (host array)."""
    m = np.asarray(mask).astype(bool)
    return not (m[..., 1:] & ~m[..., :-1]).any()


def check_layers(layers: Sequence[int], num_hidden_layers: int) -> tuple[int, ...]:
    """Validates the selected layer indices (0-based, distinct, in range); keeps their order."""
    selected = tuple(int(i) for i in layers)
    if not selected:
        raise ValueError("layers: select at least one decoder layer")
    if len(set(selected)) != len(selected):
        raise ValueError(f"layers {selected}: duplicates")
    bad = [i for i in selected if not 0 <= i < num_hidden_layers]
    if bad:
        raise ValueError(f"layers {selected}: {bad} out of range 0..{num_hidden_layers - 1}")
    return selected
