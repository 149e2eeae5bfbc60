"""MXFP4 (OCP microscaling FP4) dequantization of the GPT-OSS expert weights, as pure functions.

A packed tensor is ``blocks [..., G, 16]`` uint8 plus ``scales [..., G]`` uint8. Each block of
16 bytes holds 32 E2M1 codes of one group: the low nibble of byte j is element 2j, the high
nibble element 2j+1. Each group is multiplied by ``2^(scale - 127)`` (an E8M0 exponent). The
dequantized tensor is ``[..., G * 32]``; for GPT-OSS experts that is ``[experts, out, in]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# E2M1 code -> value (code 8 is -0).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK_BYTES = 16
GROUP_SIZE = 32


def e8m0_to_float32(scales: jnp.ndarray) -> jnp.ndarray:
    """uint8 E8M0 exponents -> float32 ``2^(s - 127)``, exactly (255 -> inf, like ``ldexp``).

    Exponents 0 and 1 give subnormal products (< 2^-126), which XLA on CPU flushes to zero.
    """
    s = scales.astype(jnp.uint32)
    normal = jax.lax.bitcast_convert_type(s << 23, jnp.float32)  # exponent field = s
    return jnp.where(s == 0, jnp.float32(2.0 ** -127), normal)


def e2m1_to_float32(codes: jnp.ndarray) -> jnp.ndarray:
    """E2M1 codes (0..15, any int dtype) -> float32 ``FP4_VALUES[code]``, by arithmetic.

    Elementwise (no table gather), so XLA fuses the whole dequantization into one loop that writes
    only the ``dtype`` result: a gather-based lookup kept several float32 copies of a layer's
    experts alive on TPU (3-4 GiB per chip for GPT-OSS-20B, benchmarks/text_encoder_tpu_compile.py).
    """
    c = codes.astype(jnp.int32)
    exponent = (c >> 1) & 3
    half_mantissa = 0.5 * (c & 1).astype(jnp.float32)
    power = jnp.where(exponent == 1, 1.0, jnp.where(exponent == 2, 2.0, 4.0))
    magnitude = jnp.where(exponent == 0, half_mantissa, (1.0 + half_mantissa) * power)
    return jnp.where(c >= 8, -magnitude, magnitude)  # code 8 -> -0.0


def dequantize(blocks: jnp.ndarray, scales: jnp.ndarray, dtype=jnp.bfloat16) -> jnp.ndarray:
    """``blocks [..., G, 16]`` uint8 + ``scales [..., G]`` uint8 -> ``[..., G*32]`` in ``dtype``.

    Exact: every result is representable in bf16 (a 2-bit mantissa times a power of two).
    """
    if blocks.shape[-1] != BLOCK_BYTES or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not "
                         f"match: expected blocks [..., G, {BLOCK_BYTES}] and scales [..., G]")
    blocks = blocks.astype(jnp.uint8)
    nibbles = (blocks[..., None] >> jnp.asarray([0, 4], jnp.uint8)) & 0x0F  # [..., G, 16, 2]: low first
    values = e2m1_to_float32(nibbles).reshape(blocks.shape[:-1] + (GROUP_SIZE,))  # [..., G, 32]
    values = values * e8m0_to_float32(scales)[..., None]
    return values.reshape(blocks.shape[:-2] + (blocks.shape[-2] * GROUP_SIZE,)).astype(dtype)


def dequantize_numpy(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Host (numpy, float32) version of ``dequantize``, for tools and tests."""
    lut = np.asarray(FP4_VALUES, np.float32)
    values = np.stack([lut[blocks & 0x0F], lut[blocks >> 4]], axis=-1)
    values = values.reshape(blocks.shape[:-1] + (GROUP_SIZE,))
    with np.errstate(over="ignore"):  # exponent 254 x 6 overflows to inf, as in float32 ldexp
        values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return values.reshape(blocks.shape[:-2] + (blocks.shape[-2] * GROUP_SIZE,))


def packed_shapes(rows: int, cols: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """Per-expert ``(blocks, scales)`` shapes of a ``[rows, cols]`` matrix (cols divisible by 32)."""
    if cols % GROUP_SIZE:
        raise ValueError(f"MXFP4 needs the input size ({cols}) to be a multiple of {GROUP_SIZE}")
    groups = cols // GROUP_SIZE
    return (rows, groups, BLOCK_BYTES), (rows, groups)
