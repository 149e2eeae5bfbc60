"""FLUX.2 VAE: parity with diffusers' AutoencoderKLFlux2 (random weights), tiling, bad input."""

import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lens_jax.checkpoints.vae import load_vae, random_vae, save_vae
from lens_jax.models.vae import _JIT, FluxVAE, blend_ramp, tile_starts
from lens_jax.models import vae as vae_lib
from tests.conftest import max_rel_err, rel_l2
from tests.reference.diffusers_vae import (TINY_CONFIG, nchw_to_nhwc, nhwc_to_nchw,
                                           random_diffusers_vae, reference_image_to_latents,
                                           reference_latents_to_image)

PARITY_TOL = 1e-4  # fp32, max relative error (max|a-e| / max|e|)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers model, our FluxVAE loaded from the model's save_pretrained folder)."""
    model = random_diffusers_vae(0, **TINY_CONFIG)
    folder = tmp_path_factory.mktemp("tiny_vae")
    model.save_pretrained(folder)
    return model, load_vae(folder)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real FLUX.2 architecture (84M parameters), random weights."""
    model = random_diffusers_vae(1)
    folder = tmp_path_factory.mktemp("real_vae")
    model.save_pretrained(folder)
    return model, load_vae(folder)


def test_tiny_encode_decode_parity(tiny, rng):
    model, vae = tiny
    images = rng.uniform(-1, 1, (2, 64, 96, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(nhwc_to_nchw(images)).latent_dist
        mean_ref = nchw_to_nhwc(posterior.mean)
        moments_ref = nchw_to_nhwc(posterior.parameters)
    assert max_rel_err(vae.encode(images), mean_ref) <= PARITY_TOL
    assert max_rel_err(vae.encode_moments(images), moments_ref) <= PARITY_TOL

    z = rng.standard_normal((2, 8, 12, TINY_CONFIG["latent_channels"])).astype(np.float32)
    with torch.no_grad():
        decoded_ref = nchw_to_nhwc(model.decode(nhwc_to_nchw(z)).sample)
    decoded = vae.decode(z)
    assert decoded.shape == (2, 64, 96, 3)
    assert max_rel_err(decoded, decoded_ref) <= PARITY_TOL


def test_real_architecture_parity(real, rng):
    """Real config: encode at 256x256, decode from a 32x32 latent (one image each, to stay cheap)."""
    model, vae = real
    assert vae.config == vae_lib.VAEConfig()
    images = rng.uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)
    z = rng.standard_normal((1, 32, 32, 32)).astype(np.float32)
    start = time.perf_counter()
    mean, decoded = vae.encode(images), vae.decode(z)
    jax_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        mean_ref = nchw_to_nhwc(model.encode(nhwc_to_nchw(images)).latent_dist.mean)
        decoded_ref = nchw_to_nhwc(model.decode(nhwc_to_nchw(z)).sample)
    torch_s = time.perf_counter() - start
    print(f"real-size VAE: jax {jax_s:.1f} s (with compile), torch {torch_s:.1f} s")
    assert mean.shape == (1, 32, 32, 32) and decoded.shape == (1, 256, 256, 3)
    assert max_rel_err(mean, mean_ref) <= PARITY_TOL
    assert max_rel_err(decoded, decoded_ref) <= PARITY_TOL


def test_lens_latent_chain_matches_reference(tiny, rng):
    """image_to_latents / latents_to_image == diffusers encode/decode + the spec's torch math."""
    model, vae = tiny
    images = rng.uniform(-1, 1, (2, 64, 96, 3)).astype(np.float32)
    tokens = vae.image_to_latents(images)
    tokens_ref = reference_image_to_latents(model, images)
    assert tokens.shape == (2, 4 * 6, 4 * TINY_CONFIG["latent_channels"])
    assert max_rel_err(tokens, tokens_ref) <= PARITY_TOL

    noise = rng.standard_normal((2, 4 * 6, 4 * TINY_CONFIG["latent_channels"])).astype(np.float32)
    decoded = vae.latents_to_image(noise, latent_hw=(4, 6))
    decoded_ref = reference_latents_to_image(model, noise, (4, 6))
    assert decoded.shape == (2, 64, 96, 3)
    assert max_rel_err(decoded, decoded_ref) <= PARITY_TOL


def test_jit_cache_per_shape(tiny, rng):
    _, vae = tiny
    z = rng.standard_normal((2, 8, 12, TINY_CONFIG["latent_channels"])).astype(np.float32)
    vae.decode(z)
    size = _JIT._cache_size()
    vae.decode(z + 1)
    assert _JIT._cache_size() == size  # same shape: no new compilation


def test_param_and_compute_dtype_are_independent(rng):
    """Same random weights stored in f32 or bf16, computed in f32 or bf16 (a 2-stage config, so
    the three compilations stay cheap)."""
    config = vae_lib.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, latent_channels=8,
                               norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                               up_block_types=("UpDecoderBlock2D",) * 2)
    ref = random_vae(config, seed=3)
    mixed = random_vae(config, seed=3, dtype=jnp.float32, param_dtype=jnp.bfloat16)
    bf16 = random_vae(config, seed=3, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert mixed.model.encoder.conv_in.kernel[...].dtype == jnp.bfloat16
    assert mixed.model.bn_var[...].dtype == jnp.bfloat16
    assert bf16.model.encoder.conv_in.kernel[...].dtype == jnp.float32
    z = rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    expected = ref.decode(z)
    out_mixed, out_bf16 = mixed.decode(z), bf16.decode(z)
    assert out_mixed.dtype == jnp.float32 and out_bf16.dtype == jnp.bfloat16
    # bf16 weights (mixed) or bf16 activations: ~3 significant digits per layer.
    assert 0 < rel_l2(out_mixed, expected) < 3e-2
    assert 0 < rel_l2(out_bf16, expected) < 5e-2


def test_every_parameter_has_logical_axis_names():
    model = nnx.eval_shape(lambda: vae_lib.AutoencoderKLFlux2(vae_lib.VAEConfig(), rngs=nnx.Rngs(0)))
    variables = nnx.to_flat_state(nnx.state(model))
    assert len(variables) == 251 - 1  # all tensors but bn.num_batches_tracked
    for path, var in variables:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.get_value().shape), path


def test_random_vae_has_every_tensor_random():
    vae = random_vae(vae_lib.VAEConfig.from_diffusers(TINY_CONFIG))
    for path, var in nnx.to_flat_state(nnx.state(vae.model)):
        value = np.asarray(var.get_value())
        assert np.unique(value).size > 1, path


def test_chunked_attention_equals_unchunked(rng):
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 16)), jnp.float32) for _ in range(3))
    full = vae_lib.single_head_attention(q, k, v, query_chunk=64)
    chunked = vae_lib.single_head_attention(q, k, v, query_chunk=8)  # 5 chunks, last one padded
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-6)
    scores = np.einsum("bqd,bkd->bqk", q, k) / 4.0
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bqk,bkd->bqd", probs / probs.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(full, expected, rtol=1e-4, atol=1e-5)


def test_tile_layout():
    assert tile_starts(40, 64, 16) == [0]
    assert tile_starts(180, 64, 16) == [0, 39, 77, 116]
    assert tile_starts(128, 64, 16) == [0, 32, 64]
    for size, tile, overlap in [(180, 64, 16), (130, 64, 16), (41, 16, 8)]:
        starts = tile_starts(size, tile, overlap)
        assert starts[-1] + tile == size
        assert starts[0] == 0 and all(0 < b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    ramp = blend_ramp(8, 4, 2)
    np.testing.assert_allclose(ramp, [0.125, 0.375, 0.625, 0.875, 1, 1, 0.75, 0.25])


class _LocalDecodeVAE(FluxVAE):
    """Decodes by nearest x8 upsampling of the first 3 latent channels: a purely local decoder,
    for which tiled decode must be exact if tiles are placed and blended correctly."""

    def _decode_tile(self, z):
        return jnp.repeat(jnp.repeat(z[..., :3], 8, axis=1), 8, axis=2)


def test_tiled_blending_is_exact_for_a_local_decoder(tiny, rng):
    vae = _LocalDecodeVAE(tiny[1].model)
    z = rng.standard_normal((2, 41, 30, TINY_CONFIG["latent_channels"])).astype(np.float32)
    expected = np.asarray(vae._decode_tile(z))
    tiled = np.asarray(vae.decode_tiled(z, tile=16, overlap=5))  # 4 x 3 tiles, uneven overlaps
    np.testing.assert_allclose(tiled, expected, rtol=1e-6, atol=1e-6)


def test_tiled_decode_close_to_untiled(tiny, rng):
    """Tiled decode of a 56x72 latent (448x576 image) in 32x32 tiles, overlap >= 16: 2 x 4 tiles.

    Tiled decode is not exact: each tile's GroupNorm statistics (and the mid-block attention)
    see only that tile, so every normalized activation is off by the difference between the
    tile's and the image's group mean/variance. With spatially stationary latents (i.i.d.
    Gaussian here, as at the start of sampling) that difference is a sampling error of the
    per-tile estimate, which shrinks with the tile area. Measured on this tiny config (2-4
    channels per group; the real VAE has 4-16) with torch-default random weights: 12% relative
    L2 for 32-latent tiles (5% with our random_vae weights; ~30% for 16-latent tiles, hence the
    default tile of 64). Bound: relative L2 and mean |error| / mean |image| < 20%, i.e. a tiled
    decode is a close approximation, not a parity check (the untiled decode is the exact one).
    Seams must not stand out: the error on the rows/columns where tiles end is less than twice
    the error elsewhere (the linear blend spreads the per-tile offsets over the overlap).
    """
    _, vae = tiny
    z = rng.standard_normal((1, 56, 72, TINY_CONFIG["latent_channels"])).astype(np.float32)
    full = np.asarray(vae.decode(z))
    tiled = np.asarray(vae.decode_tiled(z, tile=32, overlap=16))
    assert tiled.shape == full.shape == (1, 448, 576, 3)
    err = np.abs(tiled - full)
    rl2 = rel_l2(tiled, full)
    mean_err = err.mean() / np.abs(full).mean()
    print(f"tiled vs untiled: rel L2 {rl2:.4f}, mean abs err / mean abs {mean_err:.4f}")
    assert rl2 < 0.20
    assert mean_err < 0.20
    f = 8  # image pixels per latent pixel
    seam_rows = sorted((s + 32) * f - 1 for s in tile_starts(56, 32, 16)[:-1])
    seam_cols = sorted((s + 32) * f - 1 for s in tile_starts(72, 32, 16)[:-1])
    seam_err = np.concatenate([err[:, seam_rows].ravel(), err[:, :, seam_cols].ravel()])
    assert seam_err.mean() < 2 * err.mean()


def test_tiled_latents_to_image(tiny, rng):
    """latents_to_image(tiled=True) is decode_tiled of the de-normalized, unpatchified latents."""
    _, vae = tiny
    c = 4 * TINY_CONFIG["latent_channels"]
    tokens = rng.standard_normal((1, 18 * 22, c)).astype(np.float32)
    z = vae.tokens_to_vae_latents(tokens, (18, 22))
    tiled = np.asarray(vae.latents_to_image(tokens, (18, 22), tiled=True, tile=32, overlap=16))
    np.testing.assert_array_equal(tiled, np.asarray(vae.decode_tiled(z, tile=32, overlap=16)))
    single = np.asarray(vae.latents_to_image(tokens, (18, 22), tiled=True, tile=44))
    np.testing.assert_array_equal(single, np.asarray(vae.decode(z)))  # one tile: the exact decode


@pytest.mark.parametrize("shape, match", [
    ((1, 40, 48, 3), r"multiples of 16.*40 x 48"),
    ((1, 32, 32, 4), r"\[B, H, W, 3\].*\(1, 32, 32, 4\)"),
    ((1, 3, 32, 32), r"\[B, H, W, 3\].*\(1, 3, 32, 32\)"),
    ((32, 32, 3), r"\(32, 32, 3\)"),
])
def test_bad_images(tiny, shape, match):
    _, vae = tiny
    with pytest.raises(ValueError, match=match):
        vae.image_to_latents(np.zeros(shape, np.float32))


def test_bad_tokens(tiny):
    _, vae = tiny
    c = 4 * TINY_CONFIG["latent_channels"]
    with pytest.raises(ValueError, match=r"\(1, 12, 32\) hold 12 tokens.*latent_hw=\(3, 5\) needs 15"):
        vae.latents_to_image(np.zeros((1, 12, c), np.float32), latent_hw=(3, 5))
    with pytest.raises(ValueError, match=rf"\[B, h\*w, {c}\].*\(1, 15, 7\)"):
        vae.latents_to_image(np.zeros((1, 15, 7), np.float32), latent_hw=(3, 5))
    with pytest.raises(ValueError, match=r"\[B, h, w, 8\].*\(1, 4, 4, 3\)"):
        vae.decode(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="tile"):
        vae.decode_tiled(np.zeros((1, 4, 4, 8), np.float32), tile=4, overlap=4)


def test_config_rejects_unsupported_architecture():
    with pytest.raises(ValueError, match="act_fn"):
        vae_lib.VAEConfig(act_fn="gelu")
    with pytest.raises(ValueError, match="norm_num_groups"):
        vae_lib.VAEConfig(block_out_channels=(128, 256, 500, 512))
    with pytest.raises(ValueError, match="fields this implementation does not know"):
        vae_lib.VAEConfig.from_diffusers({"block_out_channels": [32], "shift_factor": 0.1})


def test_fluxvae_is_exported():
    import lens_jax
    assert lens_jax.load_vae is load_vae
    assert lens_jax.save_vae is save_vae
    assert isinstance(random_vae(vae_lib.VAEConfig.from_diffusers(TINY_CONFIG)), FluxVAE)
