"""A random Lens checkpoint in the full Hugging Face layout, at a chosen size (``lens-convert random``).

Writes what ``LensPipeline.from_pretrained`` (and diffusers' ``LensPipeline``) read::

    model_index.json
    transformer/   config.json + safetensors (diffusers LensTransformer2DModel)
    vae/           config.json + safetensors (diffusers AutoencoderKLFlux2)
    text_encoder/  config.json + safetensors (transformers GPT-OSS, MXFP4-packed experts)
    tokenizer/     tokenizer.json (harmony special tokens at their stock ids) + tokenizer_config.json
    scheduler/     scheduler_config.json (spec 2.3 values)

Every tensor is random (the images are noise): the point is to exercise the tools end to end
without downloading 30 GB. Presets: ``tiny`` (seconds on a CPU, ~30 MB), ``small`` (~120 MB) and
``full`` (the real shapes: ~8 GB denoiser in bf16, ~13 GB MXFP4 text encoder, 0.3 GB VAE),
which is generated tensor by tensor and written shard by shard, never held in memory whole.

The tokenizer is a stand-in for o200k_harmony: o200k's pre-tokenization regex, a WordPiece
vocabulary holding the template's pieces, digits and single characters (so any ASCII/Latin-1
prompt tokenizes; other characters become ``[UNK]``), and the harmony special tokens at their
stock ids (``<|endoftext|>`` 199999, ``<|start|>`` 200006, ...).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from lens_jax import output_guard, storage
from lens_jax.checkpoints.safetensors_io import ShardedWriter, write_json
from lens_jax.models import config as config_lib
from lens_jax.models.text_encoder import GptOssConfig


PIPELINE_CLASS = "LensPipeline"
MODEL_INDEX = {
    "_class_name": PIPELINE_CLASS,
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "GptOssForCausalLM"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "transformer": ["diffusers", "LensTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}
HARMONY_SPECIAL_IDS = {
    "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
    "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007,
    "<|message|>": 200008, "<|call|>": 200012,
}
RESERVED_IDS = range(199998, 201088)  # o200k_harmony: every id from 199998 up is special/reserved
O200K_SPLIT = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
])
UNK = "[UNK]"


@dataclasses.dataclass(frozen=True)
class RandomPreset:
    """Sizes of one random checkpoint."""

    transformer: dict           # overrides of ``transformer_config``
    text_encoder: dict          # GptOssConfig fields
    vae: dict                   # VAEConfig fields
    transformer_dtype: str = "float32"
    vae_dtype: str = "float32"
    streaming: bool = False     # generate the denoiser tensor by tensor (never a whole model)
    max_shard_bytes: int = 2 << 30


_TINY_TEXT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                  sliding_window=16)
PRESETS = {
    "tiny": RandomPreset(
        transformer=dict(num_layers=2, num_attention_heads=4, attention_head_dim=16,
                         axes_dims_rope=(4, 6, 6), enc_hidden_dim=32, selected_layer_index=(1, 3)),
        text_encoder=_TINY_TEXT,
        vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)),
    "small": RandomPreset(
        transformer=dict(num_layers=4, num_attention_heads=4, attention_head_dim=64,
                         axes_dims_rope=(8, 28, 28), enc_hidden_dim=128, selected_layer_index=(1, 3, 5, 7)),
        text_encoder=dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, intermediate_size=128,
                          num_local_experts=8, num_experts_per_tok=2, sliding_window=128),
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32)),
    "full": RandomPreset(transformer={}, text_encoder={}, vae={}, transformer_dtype="bfloat16",
                         streaming=True, max_shard_bytes=2 << 30),
}


# ----------------------------------------------------------------------------- random tensors

def _normal(rng: np.random.Generator, shape, std: float, mean: float = 0.0, dtype=np.float32) -> np.ndarray:
    return (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def _transformer_tensor(key: str, shape: tuple[int, ...], rng: np.random.Generator, dtype) -> np.ndarray:
    """A random denoiser tensor in the torch layout: Linear weights N(0, 1/fan_in) scaled down,
    biases N(0, 0.02), norm scales 1 + N(0, 0.1)."""
    if key.endswith(".weight") and len(shape) == 1:  # RMSNorm scale
        return _normal(rng, shape, 0.1, 1.0, dtype)
    if key.endswith(".bias"):
        return _normal(rng, shape, 0.02, 0.0, dtype)
    return _normal(rng, shape, 0.5 / math.sqrt(shape[1]), 0.0, dtype)


def _write_transformer(cfg, out_dir: Path, seed: int, dtype: str, streaming: bool,
                       max_shard_bytes: int, progress: bool) -> None:
    from lens_jax.checkpoints import transformer as tconv

    rng = np.random.default_rng([seed, 1])
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    mappings = tconv.transformer_mappings(cfg)
    bar = tqdm(mappings, desc="transformer", unit="tensor", disable=not progress)
    if streaming:  # tensor by tensor into shards: the model never exists in memory
        out_dir.mkdir(parents=True)
        write_json(out_dir / "config.json", config_lib.to_diffusers_config(cfg))
        writer = ShardedWriter(out_dir, tconv.WEIGHTS_PREFIX, max_shard_bytes)
        for m in bar:
            writer.add(m.key, _transformer_tensor(m.key, m.torch_shape, rng, np_dtype))
        writer.finish()
        return
    params: dict = {}
    for m in bar:
        array = m.to_jax(_transformer_tensor(m.key, m.torch_shape, rng, np.float32))
        if m.index is None:
            params[m.path] = array
        else:
            params.setdefault(m.path, []).append(array)
    params = {p: np.stack(a) if isinstance(a, list) else a for p, a in params.items()}
    cfg.param_dtype, cfg.dtype = dtype, dtype
    model = tconv.model_from_params(cfg, {p: a.astype(np_dtype) for p, a in params.items()})
    tconv.save_transformer(model, out_dir, max_shard_bytes=max_shard_bytes)


def _write_vae(vae_fields: dict, out_dir: Path, seed: int, dtype: str) -> None:
    import jax.numpy as jnp

    from lens_jax.checkpoints.vae import random_vae, save_vae
    from lens_jax.models.vae import VAEConfig

    vae = random_vae(VAEConfig(**vae_fields), seed=seed, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    save_vae(vae, out_dir)


def text_encoder_config_json(c: GptOssConfig) -> dict:
    """A transformers ``GptOssForCausalLM`` ``config.json`` for ``c`` (MXFP4 quantized experts)."""
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
        "pad_token_id": c.pad_token_id, "head_dim": c.head_dim, "hidden_act": "silu",
        "hidden_size": c.hidden_size, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
        "layer_types": list(c.layer_types), "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": c.num_attention_heads, "num_experts_per_tok": c.num_experts_per_tok,
        "experts_per_token": c.num_experts_per_tok, "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads, "num_local_experts": c.num_local_experts,
        "output_router_logits": False, "rms_norm_eps": c.rms_norm_eps, "router_aux_loss_coef": 0.9,
        "sliding_window": c.sliding_window, "swiglu_limit": c.swiglu_limit,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": c.vocab_size,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": c.rope.theta, "factor": c.rope.factor,
                            "original_max_position_embeddings": c.rope.original_max_position_embeddings,
                            "beta_fast": c.rope.beta_fast, "beta_slow": c.rope.beta_slow,
                            "truncate": c.rope.truncate},
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    }


def _text_tensor(key: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A random GPT-OSS tensor as stored: uint8 MXFP4 blocks/scales, everything else bf16."""
    bf16 = ml_dtypes.bfloat16
    if key.endswith("_blocks"):
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    if key.endswith("_scales"):  # 2^-9 .. 2^-4 per group of 32
        return rng.integers(118, 124, size=shape, dtype=np.uint8)
    if key.endswith("layernorm.weight") or key == "model.norm.weight":
        return _normal(rng, shape, 0.1, 1.0, bf16)
    if key.endswith("embed_tokens.weight") or key == "lm_head.weight":
        out = np.empty(shape, bf16)
        for start in range(0, shape[0], 16384):  # the full embedding in slices (float32 temporaries)
            stop = min(start + 16384, shape[0])
            out[start:stop] = _normal(rng, (stop - start,) + tuple(shape[1:]), 1.0, 0.0, bf16)
        return out
    if key.endswith("sinks"):
        return _normal(rng, shape, 1.0, 0.0, bf16)
    if key.endswith(".bias") or key.endswith("_bias"):
        return _normal(rng, shape, 0.02, 0.0, bf16)
    return _normal(rng, shape, 1.0 / math.sqrt(shape[-1]), 0.0, bf16)


def _write_text_encoder(config: GptOssConfig, out_dir: Path, seed: int, max_shard_bytes: int,
                        progress: bool) -> None:
    from lens_jax.checkpoints.text_encoder import text_encoder_mappings

    rng = np.random.default_rng([seed, 2])
    out_dir.mkdir(parents=True)
    write_json(out_dir / "config.json", text_encoder_config_json(config))
    write_json(out_dir / "generation_config.json", {"eos_token_id": [200002, 199999, 200012],
                                                    "pad_token_id": 199999})
    keys = [(m.key, m.torch_shape) for m in
            text_encoder_mappings(config, config.num_hidden_layers, packed=True, prefix="model.")]
    keys += [("model.norm.weight", (config.hidden_size,)),
             ("lm_head.weight", (config.vocab_size, config.hidden_size))]
    writer = ShardedWriter(out_dir, "model", max_shard_bytes)
    for key, shape in tqdm(keys, desc="text_encoder", unit="tensor", disable=not progress):
        writer.add(key, _text_tensor(key, shape, rng))
    writer.finish()


# ----------------------------------------------------------------------------- tokenizer

def stand_in_tokenizer():
    """A ``tokenizers.Tokenizer`` that renders the Lens template with the harmony special tokens at
    their stock ids (a stand-in for o200k_harmony; see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    from lens_jax import text

    pre = pre_tokenizers.Split(Regex(O200K_SPLIT), behavior="isolated")
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    add(UNK)
    template = text.render_prompt("", "2025-01-01").split("<|")  # the template's pieces
    for part in template:
        piece_text = part.split("|>", 1)[-1]
        for piece, _ in pre.pre_tokenize_str(piece_text):
            add(piece)
    for n in range(1000):  # o200k splits numbers into runs of up to 3 digits
        add(str(n))
        add(f"{n:02d}")
        add(f"{n:03d}")
    chars = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(160, 256)] + ["\n", "\t"]
    for ch in chars:  # any Latin-1 word: a first character, then continuation characters
        add(ch)
        add(" " + ch)
        add("##" + ch)
    add("\n\n")
    for token_id in RESERVED_IDS:
        vocab[_special_name(token_id)] = token_id
    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##",
                                     max_input_chars_per_word=200))
    tok.pre_tokenizer = pre
    tok.add_special_tokens([AddedToken(_special_name(i), special=True, normalized=False)
                            for i in RESERVED_IDS])
    return tok


def _special_name(token_id: int) -> str:
    for name, i in HARMONY_SPECIAL_IDS.items():
        if i == token_id:
            return name
    return f"<|reserved_{token_id}|>"


def _write_tokenizer(out_dir: Path) -> None:
    out_dir.mkdir(parents=True)
    stand_in_tokenizer().save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "eos_token": "<|return|>", "bos_token": "<|startoftext|>",
        "padding_side": "right", "lens_jax_note": "random stand-in for o200k_harmony (lens-convert random)"})


# ----------------------------------------------------------------------------- the checkpoint

def write_random_checkpoint(out: str | os.PathLike, preset: str = "tiny", seed: int = 0,
                            overwrite: bool = False, progress: bool = True) -> Path:
    """Writes a random Lens checkpoint folder (full Hugging Face layout) at the ``preset``'s size.

    ``preset``: tiny | small | full. Written atomically (a temporary folder renamed at the end).
    """
    from lens_jax.sampling.scheduler import SchedulerConfig

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    cfg = config_lib.transformer_config(**p.transformer)
    text_cfg = GptOssConfig(**p.text_encoder)
    if cfg.enc_hidden_dim != text_cfg.hidden_size:
        raise ValueError(f"preset {preset}: enc_hidden_dim {cfg.enc_hidden_dim} != text encoder "
                         f"hidden_size {text_cfg.hidden_size}")
    if max(cfg.selected_layer_index) >= text_cfg.num_hidden_layers:
        raise ValueError(f"preset {preset}: selected layers {tuple(cfg.selected_layer_index)} need "
                         f"{max(cfg.selected_layer_index) + 1} text-encoder layers")
    with output_guard.atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_json(tmp / "model_index.json",
                   dict(MODEL_INDEX, _lens_jax_random={"preset": preset, "seed": int(seed)}))
        (tmp / "scheduler").mkdir()
        write_json(tmp / "scheduler" / "scheduler_config.json", SchedulerConfig().to_json())
        _write_tokenizer(tmp / "tokenizer")
        _write_vae(p.vae, tmp / "vae", seed, p.vae_dtype)
        _write_transformer(cfg, tmp / "transformer", seed, p.transformer_dtype, p.streaming,
                           p.max_shard_bytes, progress)
        _write_text_encoder(text_cfg, tmp / "text_encoder", seed, p.max_shard_bytes, progress)
    return storage.native(out)


def estimated_bytes(preset: str) -> int:
    """Approximate size on disk of a preset's checkpoint (for the CLI's warning)."""
    from lens_jax.checkpoints import transformer as tconv
    from lens_jax.checkpoints.text_encoder import text_encoder_mappings
    from lens_jax.checkpoints.vae import vae_mappings
    from lens_jax.models.vae import VAEConfig

    p = PRESETS[preset]
    cfg = config_lib.transformer_config(**p.transformer)
    t_bytes = 2 if p.transformer_dtype == "bfloat16" else 4
    total = sum(math.prod(m.torch_shape) for m in tconv.transformer_mappings(cfg)) * t_bytes
    total += sum(math.prod(m.torch_shape) for m in vae_mappings(VAEConfig(**p.vae))) * 4
    text_cfg = GptOssConfig(**p.text_encoder)
    for m in text_encoder_mappings(text_cfg, text_cfg.num_hidden_layers, packed=True):
        total += math.prod(m.torch_shape) * (1 if m.key.endswith(("_blocks", "_scales")) else 2)
    return total + 2 * text_cfg.vocab_size * text_cfg.hidden_size  # lm_head

