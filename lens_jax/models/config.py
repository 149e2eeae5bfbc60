"""The denoiser's configuration: every field, its default (the released Lens architecture), its meaning.

``transformer_config(**overrides)`` is the one place these defaults are written down; the files in
``configs/`` call it. Fields named like diffusers' ``transformer/config.json`` keep that name so that
a checkpoint's config maps onto this one field by field (``from_diffusers_config``).
"""

from __future__ import annotations

import ml_collections

# Fields of the diffusers ``LensTransformer2DModel`` config.json (spec 1.1) that fix the architecture.
DIFFUSERS_FIELDS = (
    "patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
    "num_attention_heads", "enc_hidden_dim", "axes_dims_rope", "gate_mlp", "rms_norm",
    "multi_layer_encoder_feature", "selected_layer_index",
)


def transformer_config(**overrides) -> ml_collections.ConfigDict:
    """Lens denoiser config; keyword arguments override the defaults below."""
    c = ml_collections.ConfigDict()
    # --- architecture (spec 1.1; defaults = the released 4.1B model) ---
    c.patch_size = 2                 # sizes proj_out (patch^2 * out_channels); patchify is outside
    c.in_channels = 128              # packed latent channels (32 VAE channels x 2x2 patch)
    c.out_channels = 32              # proj_out width = patch_size^2 * out_channels = 128
    c.num_layers = 48                # dual-stream blocks (no single-stream tier)
    c.attention_head_dim = 64
    c.num_attention_heads = 24       # width = heads * head_dim = 1536
    c.enc_hidden_dim = 2880          # text-encoder hidden size (GPT-OSS-20B)
    c.axes_dims_rope = (8, 28, 28)   # RoPE channels per (frame, height, width) axis; sums to head_dim
    c.rope_theta = 10000.0
    c.gate_mlp = True                # SwiGLU MLP; False (GELU MLP) is not implemented
    c.rms_norm = True                # block pre-norms are RMSNorm; False (LayerNorm) not implemented
    c.multi_layer_encoder_feature = True
    c.selected_layer_index = (5, 11, 17, 23)  # text-encoder layers fed in; one txt_norm each
    c.mlp_ratio = 8 / 3              # MLP hidden = int(width / 3 * 8) = 4096
    c.timestep_embed_dim = 256       # sinusoidal timestep features before the time MLP
    c.timestep_scale = 1000.0        # the model takes sigma in [0, 1]; the embedding scales by this
    # Norm epsilons (spec 1.8). QK-norm eps: 1e-6 is what the reference code passes (ComfyUI: 1e-5).
    c.txt_norm_eps = 1e-5
    c.block_norm_eps = 1e-6
    c.qk_norm_eps = 1e-6
    c.norm_out_eps = 1e-6
    # --- numerics and runtime (JAX only, not in the checkpoint) ---
    c.param_dtype = "float32"        # master weights
    c.dtype = "bfloat16"             # compute dtype (activations, matmul inputs)
    c.remat = "none"                 # none | full | save_dots | save_dots_no_batch | save_qkv_attn
    c.attention = "auto"             # auto | xla | chunked | cudnn | splash  (auto: splash on TPU,
                                     # cudnn on GPU, chunked = xla in query blocks on CPU)
    c.splash_block_size = 512        # splash attention q/kv block size (TPU)
    c.query_chunk = 128              # chunked attention: queries per block (CPU; docs/benchmarks.md)
    # --- initialisation of a fresh model (training from scratch) [choice: UNCONFIRMED upstream] ---
    c.init_std = 0.02                # normal std of linear kernels
    c.zero_init_modulation = True    # adaLN-Zero: modulation, norm_out and proj_out start at zero
    c.update(overrides)
    return c


def width(c: ml_collections.ConfigDict) -> int:
    """Model width; the diffusers constructor ignores ``inner_dim`` and uses heads * head_dim."""
    return c.num_attention_heads * c.attention_head_dim


def mlp_hidden(c: ml_collections.ConfigDict) -> int:
    return int(width(c) / 3 * 8) if abs(c.mlp_ratio - 8 / 3) < 1e-9 else int(width(c) * c.mlp_ratio)


# diffusers hard-codes RoPE theta 10000 (spec 1.1: "not in config"). A model trained with another
# ``rope_theta`` (the toy configs) writes it as this extra key, which lens_jax reads back and diffusers
# ignores: such a folder is only faithful in lens_jax. Absent for the released value.
EXTRA_THETA_KEY = "lens_jax_rope_theta"
DIFFUSERS_ROPE_THETA = 10000.0


def from_diffusers_config(config_json: dict, **runtime) -> ml_collections.ConfigDict:
    """A ``transformer/config.json`` dict -> our config (unknown/absent fields keep the defaults)."""
    fields = {k: config_json[k] for k in DIFFUSERS_FIELDS if k in config_json}
    if EXTRA_THETA_KEY in config_json:
        fields["rope_theta"] = float(config_json[EXTRA_THETA_KEY])
    for k in ("axes_dims_rope", "selected_layer_index"):
        if k in fields:
            fields[k] = tuple(fields[k])
    return transformer_config(**fields, **runtime)


def to_diffusers_config(c: ml_collections.ConfigDict) -> dict:
    """Our config -> the ``config.json`` of a diffusers ``LensTransformer2DModel`` folder."""
    out = {"_class_name": "LensTransformer2DModel", "_diffusers_version": "0.42.1"}
    for k in DIFFUSERS_FIELDS:
        v = c[k]
        out[k] = list(v) if isinstance(v, tuple) else v
    out["inner_dim"] = width(c)
    if float(c.rope_theta) != DIFFUSERS_ROPE_THETA:
        out[EXTRA_THETA_KEY] = float(c.rope_theta)
    return out


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError for configurations the implementation does not support."""
    if sum(c.axes_dims_rope) != c.attention_head_dim:
        raise ValueError(f"axes_dims_rope {tuple(c.axes_dims_rope)} must sum to attention_head_dim "
                         f"{c.attention_head_dim}")
    if any(d % 2 for d in c.axes_dims_rope):
        raise ValueError(f"axes_dims_rope {tuple(c.axes_dims_rope)}: every axis size must be even")
    if not c.gate_mlp or not c.rms_norm or not c.multi_layer_encoder_feature:
        raise ValueError("only gate_mlp=True, rms_norm=True, multi_layer_encoder_feature=True "
                         "(the released Lens architecture) are implemented")
    if c.remat not in ("none", "full", "save_dots", "save_dots_no_batch", "save_qkv_attn"):
        raise ValueError(f"remat={c.remat!r}: expected none|full|save_dots|save_dots_no_batch|"
                         "save_qkv_attn")
    if c.attention not in ("auto", "xla", "chunked", "cudnn", "splash"):
        raise ValueError(f"attention={c.attention!r}: expected auto|xla|chunked|cudnn|splash")
    if int(c.query_chunk) < 1:
        raise ValueError(f"query_chunk={c.query_chunk!r}: expected a positive number of queries")
