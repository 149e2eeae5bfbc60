"""The Lens denoiser (``LensTransformer2DModel``, spec section 1) in Flax NNX.

48 dual-stream MMDiT blocks (image and text streams with their own weights, one joint attention
over [image, text] tokens), AdaLN modulation from the timestep, SwiGLU MLPs, RMSNorm and
QK-RMSNorm, 3-axis RoPE. The blocks' parameters are stacked on a leading ``layers`` axis and run
under one ``jax.lax.scan`` (one compiled block body), optionally rematerialised.

Two entry points:
- ``forward_packed``: the token-level core. Per token a 3-axis RoPE position and a segment id,
  per segment a timestep, so that several images of different sizes (each with its caption)
  share one row and attend only within their own image+caption segment. Segment ids are
  1..K per row; 0 is padding, which no token attends to.
- ``__call__``: the ordinary batch (one image per row, same size, right-padded caption with a
  ``text_mask``), a thin wrapper that builds the packed arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lens_jax.lora.adapters import lora_delta, merge_adapter
from lens_jax.models import attention as attention_lib
from lens_jax.models import config as config_lib
from lens_jax.models.cpu_matmul import dense_for_cpu
from lens_jax.models.positions import image_positions, text_positions
from lens_jax.models.rope import apply_rope, rope_angles
from lens_jax.sharding import constrain

BATCH_LENGTH_EMBED = ("batch", "length", "embed")
BATCH_LENGTH_HEADS = ("batch", "length", "heads", "head_dim")


# ----------------------------------------------------------------------------- parameter holders

class Linear(nnx.Module):
    """A kernel ``[*stack, *in_shape, *out_shape]`` and bias ``[*stack, *out_shape]`` with logical names."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
                 in_names: Sequence[str], out_names: Sequence[str], *, rngs: nnx.Rngs,
                 param_dtype, init_std: float, stack: int | None = None, bias: bool = True,
                 zero_init: bool = False):
        lead, lead_names = ((stack,), ("layers",)) if stack else ((), ())
        shape = lead + tuple(in_shape) + tuple(out_shape)
        if zero_init:
            kernel = jnp.zeros(shape, param_dtype)
        else:
            kernel = init_std * jax.random.normal(rngs.params(), shape, param_dtype)
        self.kernel = nnx.Param(kernel, out_sharding=lead_names + tuple(in_names) + tuple(out_names),
                                eager_sharding=False)
        self.bias = (nnx.Param(jnp.zeros(lead + tuple(out_shape), param_dtype),
                               out_sharding=lead_names + tuple(out_names), eager_sharding=False)
                     if bias else None)


class Scale(nnx.Module):
    """A norm's learned scale ``[*stack, dim]`` (initialised to ones)."""

    def __init__(self, dim: int, names: Sequence[str], *, param_dtype, stack: int | None = None):
        lead, lead_names = ((stack,), ("layers",)) if stack else ((), ())
        self.scale = nnx.Param(jnp.ones(lead + (dim,), param_dtype),
                               out_sharding=lead_names + tuple(names), eager_sharding=False)


class BlockStack(nnx.Module):
    """The parameters of all dual-stream blocks, stacked on a leading ``layers`` axis."""

    def __init__(self, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        d, heads, head_dim = config_lib.width(c), c.num_attention_heads, c.attention_head_dim
        f, layers = config_lib.mlp_hidden(c), c.num_layers
        kw = dict(rngs=rngs, param_dtype=jnp.dtype(c.param_dtype), init_std=c.init_std, stack=layers)
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_qkv", Linear((d,), (3, heads, head_dim), ("embed",),
                                                  ("qkv", "heads", "head_dim"), **kw))
            setattr(self, f"{stream}_out", Linear((heads, head_dim), (d,), ("heads", "head_dim"),
                                                  ("embed",), **kw))
            setattr(self, f"{stream}_mod", Linear((d,), (6 * d,), ("embed",), ("modulation",),
                                                  zero_init=c.zero_init_modulation, **kw))
            setattr(self, f"{stream}_mlp_w1", Linear((d,), (f,), ("embed",), ("mlp",), bias=False, **kw))
            setattr(self, f"{stream}_mlp_w3", Linear((d,), (f,), ("embed",), ("mlp",), bias=False, **kw))
            setattr(self, f"{stream}_mlp_w2", Linear((f,), (d,), ("mlp",), ("embed",), bias=False, **kw))
            for norm in ("norm_q", "norm_k"):
                setattr(self, f"{stream}_{norm}", Scale(head_dim, ("head_dim",), stack=layers,
                                                        param_dtype=jnp.dtype(c.param_dtype)))
            for norm in ("norm1", "norm2"):
                setattr(self, f"{stream}_{norm}", Scale(d, ("norm",), stack=layers,
                                                        param_dtype=jnp.dtype(c.param_dtype)))


# ----------------------------------------------------------------------------- pure math

_CPU_DENSE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def dense(x: jax.Array, p: dict, dtype, n_in: int = 1) -> jax.Array:
    """Contracts the last ``n_in`` axes of ``x`` with the first ``n_in`` of ``p['kernel']``.
    bf16 or f32 traced for the CPU: ``cpu_matmul.dense_for_cpu`` (the same arithmetic, with a
    backward pass that XLA:CPU runs on its fast paths)."""
    if "lora_merge" in p:  # a LoRA adapter folded into this block's kernel (lens_jax.lora.adapters)
        p = merge_adapter(p, dtype)
    if jnp.dtype(dtype) in _CPU_DENSE_DTYPES and attention_lib.target_backend() == "cpu":
        y = dense_for_cpu(x.astype(dtype), p["kernel"].astype(dtype), n_in)
    else:
        y = jnp.tensordot(x.astype(dtype), p["kernel"].astype(dtype), axes=n_in)
    if p.get("bias") is not None:
        y = y + p["bias"].astype(dtype)
    if "lora_a" in p:  # a low-rank adapter scanned with the blocks (lens_jax.lora.adapters)
        y = y + lora_delta(x, p, dtype, n_in)
    return y


@partial(jax.checkpoint, static_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``x * rsqrt(mean(x^2) + eps) * scale`` over the last axis, in float32, cast back.
    Recomputed in the backward pass from ``x`` (``jax.checkpoint``): autodiff would keep the
    float32 copy of a bf16 ``x`` for it, stacked over the layer scan (twice the bytes, and a
    conversion of the whole stack between the two passes)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


@partial(jax.checkpoint, static_argnums=(1,))
def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """Affine-free LayerNorm over the last axis, in float32, cast back; recomputed in the backward
    pass as ``rms_norm`` is."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def timestep_features(t: jax.Array, dim: int = 256, scale: float = 1000.0) -> jax.Array:
    """Sinusoidal features ``[..., dim]`` of sigmas ``t`` (cos half first), float32 (spec 1.5)."""
    half = dim // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = (t.astype(jnp.float32)[..., None] * freqs) * scale
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def per_token(per_segment: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``[B, K, C]`` per-segment values -> ``[B, N, C]`` per token (padding takes segment 1's).

    A one-hot matmul, not a gather: a gather's gradient is a scatter-add of every token's ``[C]``
    row into K rows (~N/K colliding adds per address, which a GPU serialises), the matmul's a dense
    contraction over N. Exact in the forward pass: each output is one value times 1 (``HIGHEST``
    keeps float32 values from being rounded to TF32 on GPUs)."""
    if per_segment.shape[1] == 1:
        return per_segment  # broadcasts over the tokens
    k = per_segment.shape[1]
    onehot = jax.nn.one_hot(jnp.clip(segment_ids - 1, 0, k - 1), k, dtype=per_segment.dtype)  # [B, N, K]
    return jnp.einsum("bnk,bkc->bnc", onehot, per_segment, precision=jax.lax.Precision.HIGHEST)


@jax.checkpoint
def _silu_gate(a: jax.Array, b: jax.Array) -> jax.Array:
    """``silu(a) * b``, recomputed in the backward pass: it keeps ``a`` and ``b`` ([B, N, mlp] each)
    instead of the four or five intermediates autodiff would stack over the layer scan."""
    return jax.nn.silu(a) * b


def swiglu(x: jax.Array, p: dict, stream: str, dtype) -> jax.Array:
    gated = _silu_gate(dense(x, p[f"{stream}_mlp_w1"], dtype), dense(x, p[f"{stream}_mlp_w3"], dtype))
    return dense(gated, p[f"{stream}_mlp_w2"], dtype)


def block_forward(p: dict, x: jax.Array, c: jax.Array, *, temb: jax.Array,
                  img_segments: jax.Array, txt_segments: jax.Array, img_angles: jax.Array,
                  txt_angles: jax.Array, cfg: ml_collections.ConfigDict, packed: bool = True
                  ) -> tuple[jax.Array, jax.Array]:
    """One dual-stream block (spec 1.4 step 7). ``x [B, Ni, D]`` image, ``c [B, Nt, D]`` text.
    ``packed=False``: one image per row (plus padding), which lets the GPU attention use cuDNN."""
    dtype = jnp.dtype(cfg.dtype)
    eps = cfg.block_norm_eps
    silu_temb = jax.nn.silu(temb)  # [B, K, D]
    streams = {"img": (x, img_segments, img_angles), "txt": (c, txt_segments, txt_angles)}
    mods, qkv, normed = {}, {}, {}
    for s, (h, seg, angles) in streams.items():
        mod = per_token(dense(silu_temb, p[f"{s}_mod"], dtype), seg)  # [B, N|1, 6D]
        mods[s] = jnp.split(mod, 6, axis=-1)  # shift1, scale1, gate1, shift2, scale2, gate2
        shift1, scale1 = mods[s][0], mods[s][1]
        normed[s] = rms_norm(h, p[f"{s}_norm1"]["scale"], eps) * (1 + scale1) + shift1
        proj = dense(normed[s], p[f"{s}_qkv"], dtype)  # [B, N, 3, H, Dh]
        proj = checkpoint_name(proj, "qkv")
        q = rms_norm(proj[:, :, 0], p[f"{s}_norm_q"]["scale"], cfg.qk_norm_eps)
        k = rms_norm(proj[:, :, 1], p[f"{s}_norm_k"]["scale"], cfg.qk_norm_eps)
        qkv[s] = (apply_rope(q, angles), apply_rope(k, angles), proj[:, :, 2])

    n_img = x.shape[1]
    q, k, v = (constrain(jnp.concatenate([qkv["img"][i], qkv["txt"][i]], axis=1), BATCH_LENGTH_HEADS)
               for i in range(3))
    segments = jnp.concatenate([img_segments, txt_segments], axis=1)
    out = attention_lib.attention(q, k, v, segments, cfg.attention, cfg.splash_block_size,
                                  packed=packed, query_chunk=cfg.query_chunk)
    out = checkpoint_name(out, "attn_out")

    new = {}
    for s, (h, _, _), o in (("img", streams["img"], out[:, :n_img]), ("txt", streams["txt"], out[:, n_img:])):
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[s]
        h = h + gate1 * dense(o, p[f"{s}_out"], dtype, n_in=2)
        mlp_in = rms_norm(h, p[f"{s}_norm2"]["scale"], eps) * (1 + scale2) + shift2
        h = h + gate2 * swiglu(mlp_in, p, s, dtype)
        new[s] = constrain(h, BATCH_LENGTH_EMBED)
    return new["img"], new["txt"]


REMAT_POLICIES = {
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_attn": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
}


# ----------------------------------------------------------------------------- the model

class LensTransformer(nnx.Module):
    """The Lens MMDiT denoiser. ``config``: ``lens_jax.models.config.transformer_config(...)``."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        config_lib.validate(config)
        self.config = ml_collections.FrozenConfigDict(config)
        c = self.config
        d, pdt = config_lib.width(c), jnp.dtype(c.param_dtype)
        n_feat = len(c.selected_layer_index)
        kw = dict(rngs=rngs, param_dtype=pdt, init_std=c.init_std)
        self.time_linear_1 = Linear((c.timestep_embed_dim,), (d,), ("time_embed",), ("embed",), **kw)
        self.time_linear_2 = Linear((d,), (d,), ("embed",), ("embed_out",), **kw)
        self.txt_norm = Scale(c.enc_hidden_dim, ("text_embed",), stack=n_feat, param_dtype=pdt)
        self.txt_in = Linear((n_feat * c.enc_hidden_dim,), (d,), ("text_embed",), ("embed",), **kw)
        self.img_in = Linear((c.in_channels,), (d,), ("in_channels",), ("embed",), **kw)
        self.blocks = BlockStack(c, rngs=rngs)
        self.norm_out = Linear((d,), (2 * d,), ("embed",), ("modulation",),
                               zero_init=c.zero_init_modulation, **kw)
        out_dim = c.patch_size * c.patch_size * c.out_channels
        self.proj_out = Linear((d,), (out_dim,), ("embed",), ("out_channels",),
                               zero_init=c.zero_init_modulation, **kw)

    # -- the ordinary batch ----------------------------------------------------------------------
    def __call__(self, latents: jax.Array, text_features: Sequence[jax.Array], timesteps: jax.Array,
                 latent_hw: tuple[int, int], text_mask: jax.Array | None = None,
                 adapters: dict | None = None) -> jax.Array:
        """Velocity ``[B, h*w, 128]`` for one image per row.

        latents ``[B, h*w, in_channels]``; text_features: one ``[B, L, enc_hidden_dim]`` per selected
        encoder layer; timesteps ``[B]`` sigmas in [0, 1]; text_mask ``[B, L]`` bool (True = valid).
        adapters: see ``forward_packed``.
        """
        h, w = (int(v) for v in latent_hw)
        if latents.ndim != 3 or latents.shape[1] != h * w:
            raise ValueError(f"latents shape {tuple(latents.shape)} does not match latent_hw "
                             f"{(h, w)}: expected [B, {h * w}, {self.config.in_channels}]")
        b = latents.shape[0]
        n_txt = text_features[0].shape[1] if len(text_features) else 0
        if tuple(timesteps.shape) != (b,):
            raise ValueError(f"timesteps shape {tuple(timesteps.shape)}, expected ({b},)")
        if text_mask is not None and tuple(text_mask.shape) != (b, n_txt):
            raise ValueError(f"text_mask shape {tuple(text_mask.shape)}, expected ({b}, {n_txt})")
        img_pos = jnp.broadcast_to(jnp.asarray(image_positions(h, w)), (b, h * w, 3))
        txt_pos = jnp.broadcast_to(jnp.asarray(text_positions(h, w, n_txt)), (b, n_txt, 3))
        img_seg = jnp.ones((b, h * w), jnp.int32)
        txt_seg = (jnp.ones((b, n_txt), jnp.int32) if text_mask is None
                   else text_mask.astype(jnp.int32))
        return self.forward_packed(latents, img_pos, img_seg, text_features, txt_pos, txt_seg,
                                   timesteps[:, None], packed=False, adapters=adapters)

    # -- the token-level core -------------------------------------------------------------------
    def forward_packed(self, img_tokens: jax.Array, img_positions: jax.Array,
                       img_segment_ids: jax.Array, text_features: Sequence[jax.Array],
                       text_positions: jax.Array, text_segment_ids: jax.Array,
                       segment_timesteps: jax.Array, *, packed: bool = True,
                       adapters: dict | None = None) -> jax.Array:
        """Velocity ``[B, Ni, 128]`` for packed rows (zero at padding tokens).

        img_tokens ``[B, Ni, in_channels]``, img_positions ``[B, Ni, 3]`` int, img_segment_ids
        ``[B, Ni]`` int (1..K, 0 = padding); text_features: one ``[B, Nt, enc_hidden_dim]`` per
        selected layer, text_positions ``[B, Nt, 3]``, text_segment_ids ``[B, Nt]``;
        segment_timesteps ``[B, K]`` sigmas (column k-1 belongs to segment k). ``packed=False``
        promises one segment per row (``__call__``): the GPU then attends with cuDNN, not Pallas.
        ``adapters``: LoRA adapters scanned with the blocks, ``{param: {"lora_a", "lora_b",
        "lora_scale", ...}}`` stacked on the layer axis (``lens_jax.lora.adapters.scanned``).
        """
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self._check_packed(img_tokens, img_positions, img_segment_ids, text_features,
                           text_positions, text_segment_ids, segment_timesteps)

        x = constrain(dense(img_tokens, _values(self.img_in), dtype), BATCH_LENGTH_EMBED)
        scales = self.txt_norm.scale[...]
        normed = [rms_norm(f.astype(dtype), scales[j], c.txt_norm_eps)
                  for j, f in enumerate(text_features)]
        txt = constrain(dense(jnp.concatenate(normed, axis=-1), _values(self.txt_in), dtype),
                        BATCH_LENGTH_EMBED)

        # diffusers casts the timestep to the compute dtype first (``timestep.to(hidden_states.dtype)``):
        # in bf16 the embedding sees the bf16-rounded sigma (2 radians apart on the top frequency near
        # sigma 1 from the float32 one); in float32 this is exact.
        t_feat = timestep_features(segment_timesteps.astype(dtype), c.timestep_embed_dim,
                                   c.timestep_scale)
        temb = dense(jax.nn.silu(dense(t_feat.astype(dtype), _values(self.time_linear_1), dtype)),
                     _values(self.time_linear_2), dtype)  # [B, K, D]

        img_angles = rope_angles(img_positions, c.axes_dims_rope, c.rope_theta)
        txt_angles = rope_angles(text_positions, c.axes_dims_rope, c.rope_theta)
        img_segments = img_segment_ids.astype(jnp.int32)
        txt_segments = text_segment_ids.astype(jnp.int32)

        def body(carry, layer_params):
            x, txt = carry
            x, txt = block_forward(layer_params, x, txt, temb=temb, img_segments=img_segments,
                                   txt_segments=txt_segments, img_angles=img_angles,
                                   txt_angles=txt_angles, cfg=c, packed=packed)
            return (x, txt), None

        if c.remat == "full":
            body = jax.checkpoint(body)
        elif c.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[c.remat])
        blocks = _values(self.blocks)
        if adapters:
            blocks = {name: {**p, **adapters.get(name, {})} for name, p in blocks.items()}
        (x, _), _ = jax.lax.scan(body, (x, txt), blocks)

        final = per_token(dense(jax.nn.silu(temb), _values(self.norm_out), dtype), img_segments)
        scale, shift = jnp.split(final, 2, axis=-1)  # scale first (spec 1.2)
        x = layer_norm(x, c.norm_out_eps) * (1 + scale) + shift
        out = dense(x, _values(self.proj_out), dtype)
        return jnp.where((img_segments != 0)[..., None], out, jnp.zeros_like(out))

    def _check_packed(self, img_tokens, img_positions, img_segment_ids, text_features,
                      text_positions, text_segment_ids, segment_timesteps) -> None:
        c = self.config
        b, n_img = img_tokens.shape[:2]
        problems = []
        if img_tokens.ndim != 3 or img_tokens.shape[-1] != c.in_channels:
            problems.append(f"img_tokens {tuple(img_tokens.shape)} != [B, Ni, {c.in_channels}]")
        if len(text_features) != len(c.selected_layer_index):
            problems.append(f"{len(text_features)} text feature tensors given, the model takes "
                            f"{len(c.selected_layer_index)} (layers {tuple(c.selected_layer_index)})")
        n_txt = text_features[0].shape[1] if len(text_features) else 0
        for j, f in enumerate(text_features):
            if tuple(f.shape) != (b, n_txt, c.enc_hidden_dim):
                problems.append(f"text_features[{j}] {tuple(f.shape)} != "
                                f"({b}, {n_txt}, {c.enc_hidden_dim})")
        expected = {"img_positions": (img_positions, (b, n_img, 3)),
                    "img_segment_ids": (img_segment_ids, (b, n_img)),
                    "text_positions": (text_positions, (b, n_txt, 3)),
                    "text_segment_ids": (text_segment_ids, (b, n_txt))}
        for name, (arr, shape) in expected.items():
            if tuple(arr.shape) != shape:
                problems.append(f"{name} {tuple(arr.shape)} != {shape}")
        if segment_timesteps.ndim != 2 or segment_timesteps.shape[0] != b:
            problems.append(f"segment_timesteps {tuple(segment_timesteps.shape)} != ({b}, K)")
        if problems:
            raise ValueError("LensTransformer inputs: " + "; ".join(problems))


def _values(module: nnx.Module) -> dict:
    """The module's parameters as a plain nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def abstract_model(config: ml_collections.ConfigDict) -> LensTransformer:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes and names, no allocation."""
    return nnx.eval_shape(lambda: LensTransformer(config, rngs=nnx.Rngs(0)))


def param_count(model: LensTransformer) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
