"""MXFP4 dequantization against transformers' own conversion (convert_moe_packed_tensors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.models import mxfp4

torch = pytest.importorskip("torch")
convert_moe_packed_tensors = pytest.importorskip(
    "transformers.integrations.mxfp4").convert_moe_packed_tensors


@pytest.mark.parametrize("dtype,torch_dtype", [(jnp.float32, "float32"), (jnp.bfloat16, "bfloat16")])
def test_matches_transformers(rng, dtype, torch_dtype):
    blocks = rng.integers(0, 256, size=(3, 10, 4, 16), dtype=np.uint8)  # [E, out, in/32, 16]
    scales = rng.integers(100, 150, size=(3, 10, 4), dtype=np.uint8)
    # Extremes of the exponent range. Not 0/1: they give subnormals (< 2^-126), which XLA on CPU
    # flushes to zero; 255 is NaN in E8M0. Real checkpoints use exponents near 127.
    scales[0, 0, :] = [2, 3, 127, 254]
    ours = jax.jit(mxfp4.dequantize, static_argnums=2)(blocks, scales, dtype)
    assert ours.shape == (3, 10, 128) and ours.dtype == dtype
    expected = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                          dtype=getattr(torch, torch_dtype))
    expected = expected.transpose(1, 2).float().numpy()  # transformers returns [E, in, out]
    np.testing.assert_array_equal(np.asarray(ours, np.float32), expected)
    np.testing.assert_array_equal(mxfp4.dequantize_numpy(blocks, scales).astype(dtype).astype(np.float32),
                                  expected)


def test_nibble_order_and_scale():
    # byte 0x71: low nibble 1 (+0.5) is element 0, high nibble 7 (+6) is element 1; scale 2^(128-127).
    blocks = np.zeros((1, 1, 16), np.uint8)
    blocks[0, 0, 0] = 0x71
    blocks[0, 0, 15] = 0x8F  # element 30: code 15 (-6), element 31: code 8 (-0)
    out = np.asarray(mxfp4.dequantize(blocks, np.full((1, 1), 128, np.uint8), jnp.float32))[0]
    assert out[0] == 1.0 and out[1] == 12.0 and out[30] == -12.0
    assert out[31] == 0.0 and np.signbit(out[31])
    assert np.count_nonzero(out) == 3


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(np.zeros((2, 3, 16), np.uint8), np.zeros((2, 4), np.uint8))
