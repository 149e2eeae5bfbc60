"""The real frozen-encoder routes: the host-side VAE (every image of a packed batch encoded at its
own size, its tokens in its own slots) and GPT-OSS inside the step (per-segment features gathered
into the packed text stream)."""

import numpy as np

from tests.conftest import max_rel_err
from tests.train.helpers import host_batch, tiny_config


def test_vae_batch_encoder_places_each_image(shapes_path):
    from lens_jax.data.packing import extract_images
    from lens_jax.train.encoders import VAEBatchEncoder

    config = tiny_config(shapes_path, in_channels=128, out_channels=32)  # the VAE's 128 channels
    config.image_encoder.kind = "vae"
    config.image_encoder.path = "random"
    config.data.update(rows_per_host=2, max_segments=2, base_sizes=(512,), base_probs=(1.0,))
    batch = host_batch(config)[0]
    encoder = VAEBatchEncoder(config)
    out = encoder(batch)
    assert "image_patches" not in out and out["latents"].shape == batch["image_patches"].shape[:2] + (128,)
    assert not out["latents"][batch["image_segment_ids"] == 0].any()
    checked = 0
    for r in range(2):
        for s, image in zip(np.nonzero(batch["segment_valid"][r])[0], extract_images(batch, r)):
            h, w = batch["latent_hw"][r, s]
            off = batch["token_offset"][r, s]
            want = np.asarray(encoder.vae.image_to_latents(image[None].astype(np.float32)))[0]
            assert max_rel_err(out["latents"][r, off:off + h * w], want) < 1e-5
            checked += 1
    assert checked >= 2


def test_gpt_oss_features_are_gathered_per_segment(shapes_path):
    import jax
    import jax.numpy as jnp

    from lens_jax.train.encoders import encode_inputs, text_encoder
    from lens_jax.train.trainer import Trainer

    config = tiny_config(shapes_path)
    config.text_encoder.kind = "gpt_oss"
    config.text_encoder.path = "random"   # tiny random GPT-OSS with hidden size enc_hidden_dim
    config.data.update(rows_per_host=2, max_segments=2, caption_length=24, text_tokens=48,
                       tokenizer="bytes")
    batch = host_batch(config)[0]
    trainer = Trainer(config)
    _, feats = jax.jit(lambda b: encode_inputs(config, trainer.frozen, b, 0))(batch)
    encoder = text_encoder(config)
    checked = 0
    for r in range(2):
        for s in np.nonzero(batch["segment_valid"][r])[0]:
            n, off = batch["text_length"][r, s], batch["text_offset"][r, s]
            if n == 0:
                continue
            want = encoder(jnp.asarray(batch["caption_ids"][r, s][None]),
                           jnp.asarray(batch["caption_mask"][r, s][None]))
            for got, w in zip(feats, want):
                assert max_rel_err(np.asarray(got)[r, off:off + n], np.asarray(w)[0, :n]) < 1e-5
            checked += 1
    assert checked >= 2
    padding = batch["text_segment_ids"] == 0
    assert all(not np.asarray(f)[padding].any() for f in feats)
