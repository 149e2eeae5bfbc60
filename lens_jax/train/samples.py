"""A grid of samples for fixed prompts during training (the Euler sampler of ``lens_jax.sampling``).

Prompts are encoded with the run's text encoder (the frozen stand-in table or GPT-OSS), sampled
with classifier-free guidance against the empty prompt, and decoded with the run's image encoder
(the DCT stand-in's inverse, or the VAE). Weights are replicated over the mesh for sampling, which
suits small models; sample large ones from exported weights with ``lens-sample``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lens_jax.train import encoders, stand_ins


def prompt_features(config: ml_collections.ConfigDict, frozen: dict, prompts) -> tuple[list[jax.Array], jax.Array]:
    """Denoiser text features ``[B, L, E]`` per selected layer and the mask ``[B, L]`` of prompts."""
    from lens_jax.data.tokenize import load_caption_tokenizer

    tok = load_caption_tokenizer(config.data.tokenizer, config.data.template_date, config.data.caption_length)
    pre = int(tok.preamble_length)
    full = [np.asarray(tok.tokenize(p), np.int32)[:config.data.caption_length] for p in prompts]
    length = max(1, max(len(ids) for ids in full))
    ids = np.zeros((len(prompts), length), np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for i, row in enumerate(full):
        ids[i, :len(row)] = row
        valid[i, :len(row)] = True
    if config.text_encoder.kind == "embedding":
        tables = frozen["text_tables"]
        text = ids[:, pre:]
        mask = valid[:, pre:]
        feats = stand_ins.embedding_features(tables, jnp.asarray(text), jnp.asarray(mask))
    else:
        from lens_jax.models.text_encoder import encode

        enc = encoders.text_encoder(config)
        out = encode(frozen["text_params"], jnp.asarray(ids), jnp.asarray(valid), config=enc.config,
                     selected=enc.selected, moe_impl=enc.moe_impl)
        mask = valid[:, pre:]
        feats = [jnp.where(jnp.asarray(mask)[..., None], o[:, pre:].astype(jnp.float32), 0.0) for o in out]
    if mask.shape[1] == 0:  # only empty prompts
        feats = [jnp.zeros((len(prompts), 1, f.shape[-1]), jnp.float32) for f in feats]
        mask = np.zeros((len(prompts), 1), bool)
    return feats, jnp.asarray(mask)


def decode_latents(config: ml_collections.ConfigDict, frozen: dict, latents: jax.Array,
                   latent_hw: tuple[int, int]) -> np.ndarray:
    """``[B, h*w, 128]`` latents -> uint8 images ``[B, H, W, 3]``."""
    from lens_jax.data.buckets import unpatchify_image

    h, w = latent_hw
    if config.image_encoder.kind != "dct":
        raise NotImplementedError("sample decoding with the VAE: use lens-sample on exported weights")
    patches = np.asarray(stand_ins.latents_to_patches(latents, frozen["dct"], encoders.dct_scales(config)))
    images = [unpatchify_image(p, h, w) for p in patches]
    return np.stack([np.clip((np.asarray(im, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
                     for im in images])


def grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """``[B, H, W, 3]`` -> one row image with white gaps."""
    b, h, w, _ = images.shape
    out = np.full((h, b * w + (b - 1) * pad, 3), 255, np.uint8)
    for i in range(b):
        out[:, i * (w + pad):i * (w + pad) + w] = images[i]
    return out


class SampleGrid:
    """``SampleGrid(config, trainer)(state) -> uint8 [H, W*B, 3]`` for ``config.samples.prompts``."""

    def __init__(self, config: ml_collections.ConfigDict, trainer):
        from lens_jax.sampling.denoise import initial_noise
        from lens_jax.sampling.scheduler import sigmas_for

        s = config.samples
        self.config = config
        self.trainer = trainer
        self.latent_hw = (int(s.height) // 16, int(s.width) // 16)
        n = self.latent_hw[0] * self.latent_hw[1]
        rep = trainer.replicated
        self.features, self.mask = jax.device_put(prompt_features(config, trainer.frozen, list(s.prompts)), rep)
        self.noise = jax.device_put(initial_noise(int(s.seed), np.arange(len(s.prompts)), n,
                                                  config.model.in_channels), rep)
        self.sigmas = sigmas_for(int(s.steps), n)

    def __call__(self, state: dict) -> np.ndarray:
        from lens_jax.sampling.denoise import denoise

        s = self.config.samples
        params = self.trainer.model_weights(state, bool(s.use_ema))
        params = jax.device_put(params, self.trainer.replicated)
        model = nnx.merge(self.trainer.graphdef, params)
        latents = denoise(model, self.noise, self.features, self.mask, self.sigmas, float(s.guidance),
                          self.latent_hw)
        return grid(decode_latents(self.config, self.trainer.frozen, latents, self.latent_hw))
