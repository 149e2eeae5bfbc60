"""Aspect-ratio buckets, bucket assignment, resize + crop, patchify."""

import numpy as np
import pytest
from PIL import Image

from lens_jax.data.buckets import (ASPECT_RATIOS, TRAINING_BUCKETS_WH, assign_bucket,
                                   from_unit_range, make_buckets, nearest_ratio_index,
                                   patchify_image, resize_and_crop, to_unit_range,
                                   unpatchify_image)


def test_default_buckets_are_the_27_of_the_spec():
    buckets = make_buckets()
    assert len(buckets) == 27
    assert {(b.width, b.height) for b in buckets} == {
        wh for sizes in TRAINING_BUCKETS_WH.values() for wh in sizes}
    assert all(b.width % 32 == 0 and b.height % 32 == 0 for b in buckets)
    by_name = {(b.base, ASPECT_RATIOS[b.ratio_index]): b for b in buckets}
    # Spec 2.8 lists W x H; "1:2" (W:H) is portrait, the 1024 one is the 1472x736 (HxW) bucket
    # of spec 2.3 with a 92 x 46 latent grid.
    portrait = by_name[(1024, (1, 2))]
    assert (portrait.width, portrait.height) == (736, 1472)
    assert portrait.latent_hw == (92, 46) and portrait.num_tokens == 4232
    assert (by_name[(512, (16, 9))].width, by_name[(512, (16, 9))].height) == (672, 384)
    assert by_name[(768, (1, 1))].num_tokens == 48 * 48
    for b in buckets:  # every ratio within 6% of its nominal W:H
        rw, rh = ASPECT_RATIOS[b.ratio_index]
        assert abs(np.log(b.aspect) - np.log(rw / rh)) < 0.06, b


def test_scaled_buckets_are_multiples_of_16():
    buckets = make_buckets(scale=1 / 8)
    assert 20 <= len(buckets) <= 27  # some sizes coincide after rounding to 16 px
    assert all(b.width % 16 == 0 and b.height % 16 == 0 for b in buckets)
    assert min(min(b.width, b.height) for b in buckets) == 48
    assert max(max(b.width, b.height) for b in buckets) == 192
    tiny = make_buckets(scale=1 / 16)
    assert all(b.width >= 16 and b.height >= 16 for b in tiny)
    assert len({(b.width, b.height) for b in tiny}) == len(tiny)
    with pytest.raises(ValueError, match="scale"):
        make_buckets(scale=0)


def test_other_base_sizes_use_equal_area_buckets():
    buckets = make_buckets(base_sizes=(256,))
    assert len(buckets) == 9
    square = [b for b in buckets if ASPECT_RATIOS[b.ratio_index] == (1, 1)][0]
    assert (square.width, square.height) == (256, 256)


@pytest.mark.parametrize("size,ratio", [((2000, 1000), (2, 1)), ((1000, 2000), (1, 2)),
                                        ((800, 800), (1, 1)), ((1000, 1333), (3, 4)),
                                        ((1920, 1080), (16, 9)), ((1500, 1000), (3, 2))])
def test_assign_bucket_nearest_log_ratio(size, ratio):
    buckets = make_buckets()
    bucket = assign_bucket(*size, buckets)
    assert ASPECT_RATIOS[bucket.ratio_index] == ratio
    assert ASPECT_RATIOS[nearest_ratio_index(*size)] == ratio
    assert bucket.base == 1024  # no rng: the largest base


def test_assign_bucket_base_probabilities_and_upscale_limit():
    buckets = make_buckets()
    rng = np.random.default_rng(0)
    picks = [assign_bucket(3000, 3000, buckets, base_probs={512: 0.5, 768: 0.5, 1024: 0.0},
                           rng=rng).base for _ in range(400)]
    assert set(picks) == {512, 768}
    assert 0.4 < picks.count(512) / len(picks) < 0.6
    # A 600x600 image must not be upscaled by more than 1.1x: only the 512 base is allowed.
    assert {assign_bucket(600, 600, buckets, base_probs={512: 1, 768: 1, 1024: 1}, rng=rng,
                          max_upscale=1.1).base for _ in range(20)} == {512}
    # Nothing allowed -> the smallest base.
    assert assign_bucket(100, 100, buckets, rng=rng, max_upscale=1.0).base == 512


def test_resize_and_crop_centre():
    bucket = [b for b in make_buckets(scale=1 / 16) if b.width == b.height][0]
    side = bucket.width
    # 3 side wide, side tall: red | green | blue bands; the centre crop is all green.
    img = np.zeros((side * 2, side * 6, 3), np.uint8)
    img[:, :side * 2, 0] = 255
    img[:, side * 2:side * 4, 1] = 255
    img[:, side * 4:, 2] = 255
    out = resize_and_crop(Image.fromarray(img), bucket)
    assert out.shape == (side, side, 3) and out.dtype == np.uint8
    assert out[:, 1:-1, 1].min() >= 250 and out[:, 1:-1, 0].max() <= 5
    # Grayscale input becomes RGB; upscaling works too.
    small = Image.fromarray(np.full((8, 8), 77, np.uint8))
    out = resize_and_crop(small, bucket)
    assert out.shape == (side, side, 3) and np.all(out == 77)


def test_unit_range():
    x = np.array([0, 255, 128], np.uint8)
    y = to_unit_range(x)
    assert y.dtype == np.float32 and y[0] == -1.0 and y[1] == 1.0
    np.testing.assert_array_equal(from_unit_range(y), x)


def test_patchify_layout_and_inverse(rng):
    h, w = 3, 5
    img = rng.integers(0, 256, (h * 16, w * 16, 3), dtype=np.uint8)
    patches = patchify_image(img)
    assert patches.shape == (h * w, 768)
    r, q = 2, 3
    np.testing.assert_array_equal(patches[r * w + q],
                                  img[16 * r:16 * r + 16, 16 * q:16 * q + 16].reshape(-1))
    np.testing.assert_array_equal(unpatchify_image(patches, h, w), img)
    f = to_unit_range(img)
    np.testing.assert_array_equal(unpatchify_image(patchify_image(f), h, w), f)
    with pytest.raises(ValueError, match="multiple"):
        patchify_image(img[:20])
    with pytest.raises(ValueError, match="grid"):
        unpatchify_image(patches, h, w + 1)
