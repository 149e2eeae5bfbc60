"""The Lens latent space: patchify / normalize / pack and their inverses (spec 2.2, 2.6, 3.4)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from lens_jax.models import latents as L
from tests.reference.diffusers_vae import nchw_to_nhwc, nhwc_to_nchw


def test_patchify_channel_order(rng):
    z = rng.standard_normal((2, 6, 10, 5)).astype(np.float32)  # [B, 2h, 2w, C]
    x = np.asarray(L.patchify(z))
    assert x.shape == (2, 3, 5, 20)
    for r, q, c, p1, p2 in [(0, 0, 0, 0, 1), (2, 4, 4, 1, 0), (1, 3, 2, 1, 1)]:
        np.testing.assert_array_equal(x[:, r, q, c * 4 + p1 * 2 + p2], z[:, 2 * r + p1, 2 * q + p2, c])


def test_patchify_and_pack_match_flux2_pipeline(rng):
    """Our NHWC functions == diffusers' FLUX.2 (NCHW) helpers, which Lens shares."""
    z = rng.standard_normal((2, 8, 12, 32)).astype(np.float32)
    ref_patch = Flux2Pipeline._patchify_latents(nhwc_to_nchw(z))
    np.testing.assert_array_equal(L.patchify(z), nchw_to_nhwc(ref_patch))
    ref_tokens = Flux2Pipeline._pack_latents(ref_patch).numpy()
    np.testing.assert_array_equal(L.pack(L.patchify(z)), ref_tokens)
    back = Flux2Pipeline._unpatchify_latents(ref_patch)
    np.testing.assert_array_equal(L.unpatchify(L.patchify(z)), nchw_to_nhwc(back))


def test_inverses(rng):
    z = rng.standard_normal((1, 10, 6, 32)).astype(np.float32)
    mean = rng.standard_normal(128).astype(np.float32)
    var = rng.uniform(0.5, 2.0, 128).astype(np.float32)
    np.testing.assert_array_equal(L.unpatchify(L.patchify(z)), z)
    x = L.patchify(z)
    np.testing.assert_array_equal(L.unpack(L.pack(x), (5, 3)), x)
    np.testing.assert_allclose(L.denormalize(L.normalize(x, mean, var, 1e-4), mean, var, 1e-4), x,
                               rtol=1e-5, atol=1e-5)
    tokens = L.latents_to_tokens(z, mean, var, 1e-4)
    assert tokens.shape == (1, 15, 128)
    np.testing.assert_allclose(L.tokens_to_latents(tokens, (5, 3), mean, var, 1e-4), z,
                               rtol=1e-5, atol=1e-5)


def test_normalize_formula(rng):
    x = rng.standard_normal((1, 2, 3, 128)).astype(np.float32)
    mean = rng.standard_normal(128).astype(np.float32)
    var = rng.uniform(0.0, 2.0, 128).astype(np.float32)
    expected = (x - mean) / np.sqrt(var + 1e-4)
    np.testing.assert_allclose(L.normalize(x, mean, var, 1e-4), expected, rtol=1e-6)
    assert L.normalize(jnp.asarray(x, jnp.bfloat16), mean, var, 1e-4).dtype == jnp.bfloat16


def test_shape_errors():
    with pytest.raises(ValueError, match=r"12 latent tokens.*latent_hw=\(3, 5\) = 15"):
        L.unpack(np.zeros((1, 12, 128)), (3, 5))
    with pytest.raises(ValueError, match=r"even latent height and width.*\(1, 5, 4, 32\)"):
        L.patchify(np.zeros((1, 5, 4, 32)))
    with pytest.raises(ValueError, match=r"divisible by 4.*\(1, 2, 2, 30\)"):
        L.unpatchify(np.zeros((1, 2, 2, 30)))


def test_to_uint8_truncates_like_the_reference(rng):
    x = np.concatenate([rng.uniform(-1.2, 1.2, 1000),
                        [-1.0, 1.0, 0.0, 0.999, -0.999, 0.996, 1.5, -7.0, 0.00393]]).astype(np.float32)
    ours = L.to_uint8(x)
    ref = ((torch.from_numpy(x).clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert ours.dtype == np.uint8
    assert L.to_uint8(np.float32(0.999)) == 254  # (1.999 * 127.5 = 254.87): truncated, not rounded
    assert L.to_uint8(jnp.ones((2, 2, 3), jnp.bfloat16)).tolist() == [[[255] * 3] * 2] * 2
