"""RoPE token positions (spec 1.6): numpy tables, and the jax angles the denoiser makes of them."""

import numpy as np

from lens_jax.models.positions import image_positions, text_positions
from lens_jax.models.rope import axis_frequencies, rope_angles


def test_image_positions_are_centred_rows_and_columns():
    # h=2, w=3: rows r - (2 - 1) = -1, 0; columns q - (3 - 1) = -2, -1, 0; frame 0; row-major.
    np.testing.assert_array_equal(image_positions(2, 3), [
        [0, -1, -2], [0, -1, -1], [0, -1, 0],
        [0, 0, -2], [0, 0, -1], [0, 0, 0]])
    assert image_positions(2, 3).dtype == np.int32
    # Odd height: h=3 -> rows -2, -1, 0 (r - (h - h//2)).
    np.testing.assert_array_equal(image_positions(3, 1)[:, 1], [-2, -1, 0])


def test_text_positions_start_after_the_image():
    # m = max(h//2, w//2) = max(2, 1) = 2; token j at m + j on every axis.
    np.testing.assert_array_equal(text_positions(4, 3, 3), [[2, 2, 2], [3, 3, 3], [4, 4, 4]])
    assert text_positions(4, 3, 3).dtype == np.int32
    assert text_positions(4, 3, 0).shape == (0, 3)


def test_jax_angles_of_numpy_positions_match_numpy():
    """The numpy positions (made in grain workers, without jax) turned into angles by the jax
    ``rope_angles`` equal the same product computed in numpy (float32)."""
    axes_dims, theta = (4, 6, 6), 2000.0
    pos = np.concatenate([image_positions(3, 5), text_positions(3, 5, 4)])
    expected = np.concatenate([pos[:, a, None].astype(np.float32) * f.astype(np.float32)
                               for a, f in enumerate(axis_frequencies(axes_dims, theta))], axis=-1)
    got = np.asarray(rope_angles(pos, axes_dims, theta))
    assert got.shape == (19, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
