"""Classifier-free guidance (spec 2.5) and the negative conditioning (spec 2.1.6)."""

import jax.numpy as jnp
import numpy as np
import torch

from lens_jax.sampling import guidance
from tests.conftest import max_rel_err
from tests.reference.sampling_torch import reference_guidance


def test_guide_matches_reference_and_rescales_to_cond_norm(rng):
    cond = rng.standard_normal((2, 5, 128)).astype(np.float32)
    uncond = rng.standard_normal((2, 5, 128)).astype(np.float32)
    uncond[0, 0] = cond[0, 0] * 0.25  # a token whose guided prediction is parallel to cond
    out = np.asarray(guidance.guide(jnp.asarray(cond), jnp.asarray(uncond), 4.5))
    expected = reference_guidance(torch.from_numpy(cond), torch.from_numpy(uncond), 4.5).numpy()
    assert max_rel_err(out, expected) < 1e-6
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(cond, axis=-1), rtol=1e-5)


def test_guide_at_scale_one_is_cond_and_zero_norm_token_is_unscaled():
    cond = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 8)), jnp.float32)
    uncond = jnp.asarray(np.random.default_rng(2).standard_normal((1, 3, 8)), jnp.float32)
    np.testing.assert_allclose(np.asarray(guidance.guide(cond, uncond, 1.0)), np.asarray(cond), rtol=1e-6)
    zeros = jnp.zeros((1, 2, 8))
    out = guidance.guide(zeros, zeros, 3.0)
    assert np.all(np.isfinite(np.asarray(out))) and float(jnp.abs(out).max()) == 0.0


def test_empty_negative_and_padding():
    feats = [jnp.ones((2, 4, 3)), 2 * jnp.ones((2, 4, 3))]
    mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    neg, neg_mask = guidance.empty_negative(feats, mask)
    assert all(float(jnp.abs(f).max()) == 0 and f.shape == (2, 4, 3) for f in neg)
    assert neg_mask.shape == (2, 4) and not bool(neg_mask.any())
    # A longer negative: the positive side is right-padded with zeros / False.
    long_neg = [jnp.full((2, 6, 3), 5.0)] * 2
    long_mask = jnp.ones((2, 6), bool)
    both, both_mask = guidance.cfg_conditioning(feats, mask, long_neg, long_mask)
    assert both[0].shape == (4, 6, 3) and both_mask.shape == (4, 6)
    np.testing.assert_array_equal(np.asarray(both_mask[0]), [1, 1, 1, 0, 0, 0])  # row 0 = cond 0
    np.testing.assert_array_equal(np.asarray(both_mask[1]), [1] * 6)  # row 1 = uncond 0
    assert float(both[1][0, 4:].max()) == 0.0 and float(both[1][1, 4:].min()) == 5.0
    a, b = guidance.split_interleaved(guidance.interleave(feats[0], feats[1]))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(feats[0]))
    np.testing.assert_array_equal(np.asarray(b), np.asarray(feats[1]))
