"""The real frozen-encoder routes: the host-side VAE (every image of a packed batch encoded at its
own size, its tokens in its own slots) and GPT-OSS inside the step (per-segment features gathered
into the packed text stream)."""

import numpy as np
import pytest

from tests.conftest import max_rel_err
from tests.train.helpers import host_batch, tiny_config


def test_vae_encoder_places_each_image(shapes_path):
    from lens_jax.data.packing import extract_images
    from lens_jax.train.vae_encoding import VAEEncoder

    config = tiny_config(shapes_path, in_channels=128, out_channels=32)  # the VAE's 128 channels
    config.image_encoder.kind = "vae"
    config.image_encoder.path = "random"
    config.data.update(rows_per_host=2, max_segments=2, base_sizes=(512,), base_probs=(1.0,))
    batch = host_batch(config)[0]
    encoder = VAEEncoder(config)
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


def _gpt_oss_config(shapes_path):
    config = tiny_config(shapes_path)
    config.text_encoder.kind = "gpt_oss"
    config.text_encoder.path = "random"   # tiny random GPT-OSS with hidden size enc_hidden_dim
    config.data.update(rows_per_host=2, max_segments=2, caption_length=24, text_tokens=48,
                       tokenizer="bytes")
    return config


def test_gpt_oss_features_are_gathered_per_segment(shapes_path):
    import jax
    import jax.numpy as jnp

    from lens_jax.train.encoders import encode_inputs, text_encoder
    from lens_jax.train.trainer import Trainer

    config = _gpt_oss_config(shapes_path)
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


def test_cached_caption_features_equal_the_steps_own(shapes_path):
    """``text_encoder.cache_features``: the host-made ``text_features`` equal the features the step
    computes itself, fp32, and a second pass over the same captions encodes nothing."""
    import jax

    from lens_jax.train.encoders import encode_inputs
    from lens_jax.train.trainer import Trainer

    config = _gpt_oss_config(shapes_path)
    cached_config = _gpt_oss_config(shapes_path)
    cached_config.text_encoder.cache_features = True
    batches = host_batch(config, 2)
    in_step, cached = Trainer(config), Trainer(cached_config)
    assert in_step.text_cache is None and cached.text_cache is not None
    encoded = 0
    for batch in batches:
        prepared = cached.prepare_batch(batch)
        assert prepared["text_features"].shape == batch["text_segment_ids"].shape + (
            len(config.model.selected_layer_index), config.model.enc_hidden_dim)
        _, want = jax.jit(lambda b: encode_inputs(config, in_step.frozen, b, 0))(batch)
        _, got = jax.jit(lambda b: encode_inputs(cached_config, cached.frozen, b, 0))(prepared)
        for g, w in zip(got, want):
            assert max_rel_err(np.asarray(g), np.asarray(w)) < 1e-5
        assert not prepared["text_features"][batch["text_segment_ids"] == 0].any()
        encoded += int((batch["caption_mask"].sum(-1) > 0).sum())
    assert 0 < cached.text_cache.misses <= encoded
    misses = cached.text_cache.misses
    again = cached.prepare_batch(batches[0])
    assert cached.text_cache.misses == misses   # nothing encoded the second time
    np.testing.assert_array_equal(again["text_features"], cached.prepare_batch(batches[0])["text_features"])


def test_caption_feature_cache_encodes_each_caption_once():
    """The cache on a table of captions: duplicates and known captions are not encoded again, an
    empty (dropped) caption never, new captions in one call of the batch's shape, and each token gets its own caption's feature at its own position."""
    from lens_jax.train.text_feature_cache import CaptionFeatureCache

    calls = []

    def encode_rows(ids, mask):  # feature of token t: (id, t, layer) -> easy to check
        calls.append((ids.shape, int(mask.any(-1).sum())))
        t = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        return [np.stack([ids, t, np.full(ids.shape, layer)], -1).astype(np.float32) for layer in range(2)]

    def batch(captions, preamble=0):  # one row per caption, one slot each, text after the preamble
        b, length = len(captions), 6
        ids = np.zeros((b, 1, length), np.int32)
        mask = np.zeros((b, 1, length), bool)
        text_index = np.zeros((b, length, 2), np.int32)
        seg = np.zeros((b, length), np.int32)
        for r, cap in enumerate(captions):
            ids[r, 0, :len(cap)] = cap
            mask[r, 0, :len(cap)] = True
            n = max(len(cap) - preamble, 0)
            text_index[r, :n, 1] = np.arange(n)
            seg[r, :n] = 1
        return {"caption_ids": ids, "caption_mask": mask, "text_index": text_index, "text_segment_ids": seg}

    cache = CaptionFeatureCache(encode_rows, preamble=1, layers=2, width=3)
    out = cache(batch([[7, 8, 9], [7, 8, 9], [], [5, 6]], preamble=1))
    assert calls == [((4, 6), 2)] and cache.misses == 2 and cache.hits == 1 and len(cache) == 2
    f = out["text_features"]   # [B, Nt, S, E]
    np.testing.assert_array_equal(f[0, :2, 1], [[8, 1, 1], [9, 2, 1]])   # after the preamble token 7
    np.testing.assert_array_equal(f[3, :1, 0], [[6, 1, 0]])
    assert not f[2].any() and not f[0, 2:].any()
    calls.clear()
    cache(batch([[5, 6], [1, 2], [1, 3], [1, 4]], preamble=1))  # one known, three new
    assert calls == [((4, 6), 3)] and cache.misses == 5
    bad = batch([[1, 2, 3]], preamble=0)
    bad["text_index"][0, 0, 1] = 4   # + preamble 1: position 5 of a 3-token caption
    with pytest.raises(ValueError, match="caption slot 0 reach position 5"):
        cache(bad)
