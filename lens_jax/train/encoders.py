"""The frozen encoders of a training run: the arrays they need inside the jitted step
(``build_frozen``), where those live (``frozen_shardings``), and the encoding of a batch inside
the step (``encode_inputs``: the DCT / embedding stand-ins of ``lens_jax.train.stand_ins``, or
GPT-OSS). The VAE runs on the host's devices before the step (``lens_jax.train.vae_encoding``), and
so does GPT-OSS with ``text_encoder.cache_features`` (``caption_feature_cache``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lens_jax.train import stand_ins


def text_preamble(config: ml_collections.ConfigDict) -> int:
    """Leading caption ids the denoiser does not see (from the data tokenizer)."""
    from lens_jax.data.tokenize import load_caption_tokenizer

    return int(load_caption_tokenizer(config.data.tokenizer, config.data.template_date,
                                      config.data.caption_length).preamble_length)


def build_frozen(config: ml_collections.ConfigDict) -> dict:
    """Arrays of the frozen encoders used inside the step (placed by ``frozen_shardings``)."""
    frozen: dict[str, Any] = {}
    ie, te, m = config.image_encoder, config.text_encoder, config.model
    if ie.kind == "dct":
        frozen["dct"] = jnp.asarray(stand_ins.dct_basis(m.in_channels))
    elif ie.kind != "vae":
        raise ValueError(f"config.image_encoder.kind={ie.kind!r}: expected dct|vae")
    if te.kind == "embedding":
        key = jax.random.PRNGKey(int(te.seed))
        shape = (len(m.selected_layer_index), int(te.vocab_size), int(m.enc_hidden_dim))
        frozen["text_tables"] = float(te.std) * jax.random.normal(key, shape, jnp.float32)
    elif te.kind == "gpt_oss":
        frozen["text_params"] = text_encoder(config).params()
    else:
        raise ValueError(f"config.text_encoder.kind={te.kind!r}: expected embedding|gpt_oss")
    return frozen


def frozen_shardings(config: ml_collections.ConfigDict, frozen: dict, mesh, rules) -> dict:
    """Where each frozen array lives: GPT-OSS's parameters sharded as
    ``text_encoder_shardings`` says (experts over the ``experts`` rule's axes, so the 20B encoder
    fits beside the denoiser), everything else (DCT basis, embedding tables) replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, frozen)
    if "text_params" in frozen:
        from lens_jax.models.text_encoder import text_encoder_shardings

        enc = text_encoder(config)
        shardings["text_params"] = text_encoder_shardings(enc.config, max(enc.selected) + 1,
                                                          enc.mxfp4, mesh, rules)
    return shardings


@functools.lru_cache(maxsize=4)
def _load_text_encoder(path: str, layers: tuple, hidden: int, seed: int, dtype: str = "bfloat16"):
    from lens_jax.models.text_encoder import GptOssConfig, TextEncoder

    if path == "random":  # tiny random GPT-OSS (tests / demos)
        n = max(layers) + 1
        cfg = GptOssConfig(vocab_size=512, hidden_size=hidden, num_hidden_layers=n, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, intermediate_size=hidden,
                           num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                           layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                             for i in range(n)))
        return TextEncoder.random(cfg, layers=layers, seed=seed)
    from lens_jax.checkpoints.text_encoder import load_text_encoder
    from lens_jax.train import toy_text_encoder

    if toy_text_encoder.read_summary(path) is not None:
        toy_text_encoder.check_matches(path, layers, hidden)
    encoder = load_text_encoder(path, layers=layers, dtype=jnp.dtype(dtype))
    if encoder.config.hidden_size != hidden:
        raise ValueError(f"config.model.enc_hidden_dim={hidden} but the text encoder {path} has "
                         f"hidden size {encoder.config.hidden_size}")
    return encoder


def text_encoder(config: ml_collections.ConfigDict):
    """The run's GPT-OSS ``TextEncoder`` (``text_encoder.kind="gpt_oss"``), loaded once per process."""
    te, m = config.text_encoder, config.model
    if not te.path:
        raise ValueError("config.text_encoder.kind='gpt_oss' needs config.text_encoder.path "
                         "(a GPT-OSS folder, or 'random')")
    return _load_text_encoder(te.path, tuple(m.selected_layer_index), int(m.enc_hidden_dim), int(te.seed),
                              str(te.get("dtype", "bfloat16")))


def caption_feature_cache(config: ml_collections.ConfigDict, preamble: int):
    """The host-side ``CaptionFeatureCache`` of ``text_encoder.cache_features`` (None when off):
    the run's GPT-OSS on this process's first device, outside the step."""
    te, m = config.text_encoder, config.model
    if not te.get("cache_features", False):
        return None
    if te.kind != "gpt_oss":
        raise ValueError(f"config.text_encoder.cache_features=True needs text_encoder.kind='gpt_oss' "
                         f"(got {te.kind!r}, whose features are a table lookup inside the step)")
    from lens_jax.train.text_feature_cache import CaptionFeatureCache

    enc = text_encoder(config)

    def encode_rows(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(o, np.float32) for o in enc(ids, mask)]

    return CaptionFeatureCache(encode_rows, preamble, len(m.selected_layer_index), int(m.enc_hidden_dim))


def dct_scales(config: ml_collections.ConfigDict) -> np.ndarray:
    """``[C]`` per-coefficient multipliers of the DCT stand-in (``stand_ins.dct_scales``)."""
    ie = config.image_encoder
    return stand_ins.dct_scales(int(config.model.in_channels), float(ie.scale),
                                float(ie.get("freq_exponent", 0.0)))


def encode_inputs(config: ml_collections.ConfigDict, frozen: dict, batch: dict, preamble: int
                  ) -> tuple[jax.Array, list[jax.Array]]:
    """Latent tokens ``[B, N_img, 128]`` and packed text features of a batch (inside jit)."""
    ie, te = config.image_encoder, config.text_encoder
    if ie.kind == "dct":
        latents = stand_ins.patches_to_latents(batch["image_patches"], frozen["dct"], dct_scales(config))
    else:
        latents = batch["latents"]
    if "text_features" in batch:  # text_encoder.cache_features: [B, Nt, S, E], made on the host
        tf = batch["text_features"]
        feats = [tf[:, :, i].astype(jnp.float32) for i in range(tf.shape[2])]
    elif te.kind == "embedding":
        ids = stand_ins.denoiser_text_ids(batch["caption_ids"], batch["text_index"], preamble)
        feats = stand_ins.embedding_features(frozen["text_tables"], ids, batch["text_segment_ids"])
    else:
        from lens_jax.models.text_encoder import encode

        enc = text_encoder(config)
        b, k, length = batch["caption_ids"].shape
        out = encode(frozen["text_params"], batch["caption_ids"].reshape(b * k, length),
                     batch["caption_mask"].reshape(b * k, length), config=enc.config,
                     selected=enc.selected, moe_impl=enc.moe_impl)
        out = [jax.lax.stop_gradient(o.astype(jnp.float32)) for o in out]
        feats = stand_ins.gather_text_features(out, batch["text_index"], batch["text_segment_ids"],
                                               preamble, k)
    return latents, feats
