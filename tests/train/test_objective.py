"""Pure pieces of the objective and the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.train import objective, optim, stand_ins


def test_sigma_location_follows_spec():
    n = jnp.asarray([256, 1024, 4096])
    np.testing.assert_allclose(objective.sigma_location(n), [1.0, 1.06, 1.3], rtol=1e-6)


def test_sample_sigmas_logit_normal():
    n = jnp.full((400, 50), 1024)
    valid = jnp.ones((400, 50), bool).at[:, -1].set(False)
    s = objective.sample_sigmas(jax.random.split(jax.random.PRNGKey(0), 400), n, valid, scale=1.0)
    assert float(jnp.max(s[:, -1])) == 0.0
    logit = np.log(np.asarray(s[:, :-1]) / (1 - np.asarray(s[:, :-1])))
    assert abs(logit.mean() - 1.06) < 0.02 and abs(logit.std() - 1.0) < 0.02


def test_noised_and_target():
    x0, noise = jnp.full((1, 2, 3), 2.0), jnp.full((1, 2, 3), -1.0)
    x, target = objective.noised(x0, noise, jnp.asarray([[0.25, 1.0]]))
    np.testing.assert_allclose(x[0, 0], 0.75 * 2.0 - 0.25)
    np.testing.assert_allclose(x[0, 1], -1.0)
    np.testing.assert_allclose(target, -3.0)


def test_each_image_counts_once():
    # image 1: 2 tokens with squared error 1; image 2: 6 tokens with squared error 9; padding: 2 tokens
    seg = jnp.asarray([[1, 1, 2, 2, 2, 2, 2, 2, 0, 0]])
    pred = jnp.zeros((1, 10, 4))
    target = jnp.where((seg == 1)[..., None], 1.0, jnp.where((seg == 2)[..., None], 3.0, 100.0))
    target = jnp.broadcast_to(target, (1, 10, 4))
    losses, counts = objective.per_image_losses(pred, target, seg, num_segments=3)
    np.testing.assert_allclose(losses, [[1.0, 9.0, 0.0]])
    np.testing.assert_allclose(counts, [[2, 6, 0]])


def test_dct_basis_orthonormal_and_flat_colour_exact():
    basis = stand_ins.dct_basis()
    assert basis.shape == (768, 128)
    np.testing.assert_allclose(basis.T @ basis, np.eye(128), atol=1e-5)
    flat = np.tile(np.asarray([0.5, -0.25, 1.0], np.float32), 256)[None, None]  # (py, px, c) layout
    lat = stand_ins.patches_to_latents(jnp.asarray(flat), jnp.asarray(basis), 0.125)
    back = stand_ins.latents_to_patches(lat, jnp.asarray(basis), 0.125)
    np.testing.assert_allclose(back, flat, atol=1e-5)


def test_dct_frequency_and_scales_table():
    # columns: (u + v, u, v) order, 3 colours each: DC; (0,1) (1,0); (0,2) (1,1) (2,0); ...
    np.testing.assert_array_equal(stand_ins.dct_frequency(20), [0] * 3 + [1] * 6 + [2] * 9 + [3] * 2)
    np.testing.assert_allclose(stand_ins.dct_scales(12, 0.125), [0.125] * 12)
    np.testing.assert_allclose(stand_ins.dct_scales(12, 0.125, 2.0), [0.125] * 3 + [0.5] * 6 + [1.125] * 3)
    with pytest.raises(ValueError, match="out_channels 769"):
        stand_ins.dct_frequency(769)


def test_dct_per_frequency_scale_round_trips():
    basis = jnp.asarray(stand_ins.dct_basis(48))
    scales = jnp.asarray(stand_ins.dct_scales(48, 0.125, 1.5))
    patches = jax.random.uniform(jax.random.PRNGKey(0), (2, 3, 768), minval=-1, maxval=1)
    lat = stand_ins.patches_to_latents(patches, basis, scales)
    np.testing.assert_allclose(lat, stand_ins.patches_to_latents(patches, basis, 0.125) * scales / 0.125,
                               rtol=1e-5, atol=1e-6)
    low_passed = stand_ins.latents_to_patches(stand_ins.patches_to_latents(patches, basis, 0.125), basis, 0.125)
    np.testing.assert_allclose(stand_ins.latents_to_patches(lat, basis, scales), low_passed, atol=1e-5)


def test_text_ids_and_features_gather():
    caption_ids = jnp.asarray([[[7, 8, 9, 10], [20, 21, 0, 0]]])  # B=1, K=2, L=4
    text_index = jnp.asarray([[[0, 0], [0, 1], [1, 0], [0, 0]]])  # preamble 1
    seg = jnp.asarray([[1, 1, 2, 0]])
    ids = stand_ins.denoiser_text_ids(caption_ids, text_index, preamble=1)
    np.testing.assert_array_equal(ids, [[8, 9, 21, 8]])
    tables = jnp.arange(2 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 3)
    feats = stand_ins.embedding_features(tables, ids, seg)
    np.testing.assert_array_equal(feats[1][0, 2], tables[1, 21])
    np.testing.assert_array_equal(feats[0][0, 3], 0.0)
    # the online-encoder gather gives the same as reading ids
    enc = [tables[i][caption_ids.reshape(2, 4)] for i in range(2)]
    gathered = stand_ins.gather_text_features(enc, text_index, seg, preamble=1, num_segments=2)
    for a, b in zip(gathered, feats):
        np.testing.assert_array_equal(a, b)


def test_decay_mask_excludes_norms_and_biases():
    params = {"a": {"kernel": 1, "bias": 2}, "norm": {"scale": 3}}
    assert optim.decay_mask(params) == {"a": {"kernel": True, "bias": False}, "norm": {"scale": False}}


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule(schedule):
    from tests.train.helpers import tiny_config

    opt = tiny_config().optimizer
    opt.update(lr=1e-3, warmup_steps=10, schedule=schedule, end_lr_factor=0.1)
    f = optim.learning_rate_schedule(opt, num_steps=110)
    np.testing.assert_allclose(f(0), 0.0)
    np.testing.assert_allclose(f(5), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(f(10), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(f(110), 1e-3 if schedule == "constant" else 1e-4, rtol=1e-5)


def test_ema_update():
    ema = {"w": jnp.asarray([0.0])}
    out = optim.ema_update(ema, {"w": jnp.asarray([1.0])}, jnp.float32(0.9))
    np.testing.assert_allclose(out["w"], [0.1], rtol=1e-6)
    assert float(optim.ema_decay(jnp.int32(0), 0.999, True)) == pytest.approx(0.1)


def test_all_captions_dropped_gives_finite_loss(shapes_path):
    """Empty captions (no text tokens at all = an all-false text mask) train fine."""
    from tests.train.helpers import host_batch, initial_state, tiny_config
    from lens_jax.train.encoders import encode_inputs
    from lens_jax.train.trainer import Trainer

    config = tiny_config(shapes_path, zero_init_modulation=False)
    config.data.caption_dropout = 1.0
    batch = host_batch(config)[0]
    assert not batch["text_segment_ids"].any() and batch["segment_valid"].sum() > 0
    trainer = Trainer(config)
    params = initial_state(trainer)["params"]

    @jax.jit
    def loss(params, batch):
        latents, feats = encode_inputs(config, trainer.frozen, batch, trainer.preamble)
        return objective.packed_loss(trainer.apply_fn, params, batch, latents, feats, jax.random.PRNGKey(0))

    total, m = loss(params, batch)
    assert np.isfinite(float(total)) and float(m["images"]) == batch["segment_valid"].sum()
