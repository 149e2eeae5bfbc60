"""VAEEncoder: every image at its slots, all local devices, one compiled program per shape."""

import jax
import numpy as np
import pytest

from lens_jax.data.buckets import patchify_image
from lens_jax.train.vae_encoding import VAEEncoder, group_size
from tests.conftest import max_rel_err
from tests.train.helpers import tiny_config


def test_group_size():
    assert [group_size(n, 8) for n in (1, 7, 8, 9, 16, 17)] == [8, 8, 8, 16, 16, 32]
    assert [group_size(n, 1) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]
    assert group_size(5, 6) == 12  # a multiple of the device count


def _batch(rng, sizes, rows=2, n_img=64):
    """A packed host batch holding images of the given latent sizes, filled row by row."""
    k = max(len(sizes), 1)
    batch = {"image_patches": np.zeros((rows, n_img, 768), np.float32),
             "segment_valid": np.zeros((rows, k), bool), "latent_hw": np.zeros((rows, k, 2), np.int32),
             "token_offset": np.zeros((rows, k), np.int32), "other": np.arange(rows)}
    used, images = [0] * rows, []
    for i, (h, w) in enumerate(sizes):
        r = i % rows
        image = rng.uniform(-1, 1, (16 * h, 16 * w, 3)).astype(np.float32)
        batch["image_patches"][r, used[r]:used[r] + h * w] = patchify_image(image)
        batch["segment_valid"][r, i], batch["latent_hw"][r, i], batch["token_offset"][r, i] = True, (h, w), used[r]
        images.append((r, used[r], image))
        used[r] += h * w
    return batch, images


def test_changing_bucket_mix_compiles_once_per_shape(shapes_path):
    config = tiny_config(shapes_path, in_channels=128, out_channels=32)
    config.image_encoder.update(kind="vae", path="random")
    encoder = VAEEncoder(config)
    assert encoder.num_devices == jax.local_device_count() == 8
    rng = np.random.default_rng(0)
    # the mix changes every step: counts 1..5 of three bucket shapes
    steps = [[(2, 2)], [(2, 2), (2, 4), (2, 2)], [(4, 2), (2, 2), (2, 4), (2, 4)],
             [(2, 4)] * 5, [(2, 2)] * 3 + [(4, 2)] * 2, [(4, 2)]]
    compiles = []
    for sizes in steps + steps:  # the second pass meets only shapes seen before
        batch, images = _batch(rng, sizes)
        out = encoder(batch)
        compiles.append(encoder.compiled_programs())
        assert "image_patches" not in out and out["other"] is batch["other"]
        assert out["latents"].shape == (2, 64, 128)
        for r, off, image in images:  # each image's tokens at its own slots, as if encoded alone
            want = np.asarray(encoder.vae.image_to_latents(image[None]))[0]
            assert max_rel_err(out["latents"][r, off:off + want.shape[0]], want) < 1e-5
    # every group of <= 8 images pads to the 8 devices: one program per bucket shape, ever
    assert compiles[-1] == 3
    assert compiles[len(steps) - 1] == compiles[-1]


def test_missing_path_is_refused(shapes_path):
    config = tiny_config(shapes_path)
    config.image_encoder.update(kind="vae", path="")
    with pytest.raises(ValueError, match="image_encoder.path"):
        VAEEncoder(config)
