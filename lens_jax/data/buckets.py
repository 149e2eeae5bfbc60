"""Aspect-ratio buckets: the 27 training resolutions of spec 2.8, bucket assignment, resize + crop.

A bucket is a target ``width x height`` in pixels (both multiples of 16, so the latent grid is
``h = height // 16`` by ``w = width // 16`` tokens). The default set is the 27 training buckets
(base areas 512^2, 768^2, 1024^2 x nine aspect ratios W:H = 1:2 .. 2:1). Spec 2.8 lists them as
``W x H``: ``352x704`` is a *portrait* image 352 wide and 704 tall, aspect ratio 1:2 — the same
orientation as the inference buckets of spec 2.3 (``1:2`` -> ``H x W = 1472 x 736``).

An image goes to the ratio whose log aspect ratio is closest to its own; the base area among that
ratio's buckets is then drawn with the configured probabilities (optionally restricted to buckets
that do not upscale the image by more than ``max_upscale``). The image is resized (PIL Lanczos)
so that it covers the bucket and centre-cropped; pixels map to ``[-1, 1]`` as ``x / 127.5 - 1``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

PATCH = 16  # pixels per latent token side (8 from the VAE x 2 from the 2x2 patchify)

# The nine aspect ratios, W:H, portrait to landscape.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 2), (9, 16), (2, 3), (3, 4), (1, 1), (4, 3), (3, 2), (16, 9), (2, 1))

# Spec 2.8, listed as (W, H) in the order of ASPECT_RATIOS.
TRAINING_BUCKETS_WH: dict[int, tuple[tuple[int, int], ...]] = {
    512: ((352, 704), (384, 672), (416, 640), (448, 608), (512, 512),
          (608, 448), (640, 416), (672, 384), (704, 352)),
    768: ((544, 1088), (576, 1024), (640, 960), (672, 896), (768, 768),
          (896, 672), (960, 640), (1024, 576), (1088, 544)),
    1024: ((736, 1472), (768, 1376), (832, 1248), (864, 1152), (1024, 1024),
           (1152, 864), (1248, 832), (1376, 768), (1472, 736)),
}


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A target resolution. ``base`` is the (unscaled) base side it belongs to (512/768/1024);
    ``ratio_index`` indexes ``ASPECT_RATIOS``."""

    width: int
    height: int
    base: int
    ratio_index: int

    @property
    def latent_hw(self) -> tuple[int, int]:
        """``(h, w)``: the latent token grid, ``(height // 16, width // 16)``."""
        return self.height // PATCH, self.width // PATCH

    @property
    def num_tokens(self) -> int:
        """Image tokens of the denoiser: ``h * w``."""
        h, w = self.latent_hw
        return h * w

    @property
    def aspect(self) -> float:
        """``width / height``."""
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)


def _computed_sizes(base: int) -> tuple[tuple[int, int], ...]:
    # For a base side not in the spec table: equal area base^2, sides rounded to multiples of 16.
    out = []
    for rw, rh in ASPECT_RATIOS:
        r = rw / rh
        out.append((_round_to(base * math.sqrt(r), PATCH), _round_to(base / math.sqrt(r), PATCH)))
    return tuple(out)


def make_buckets(base_sizes: Sequence[int] = (512, 768, 1024), scale: float = 1.0,
                 multiple: int = PATCH) -> list[Bucket]:
    """Buckets for ``base_sizes`` x the nine ratios, sides multiplied by ``scale``.

    Bases 512/768/1024 use the exact sizes of spec 2.8; other bases use ``base^2``-area sizes
    rounded to multiples of 16. With ``scale != 1`` (tiny demos and tests, e.g. 1/8 -> 48..192 px)
    every side is rounded to the nearest multiple of ``multiple`` (>= ``multiple``); sizes that
    coincide after rounding are kept once (1/8 -> 23 buckets, 1/16 -> 15).
    """
    if scale <= 0:
        raise ValueError(f"bucket scale must be > 0, got {scale}")
    if multiple % PATCH:
        raise ValueError(f"bucket sides must be multiples of {PATCH}, got multiple={multiple}")
    buckets: list[Bucket] = []
    seen: set[tuple[int, int]] = set()
    for base in base_sizes:
        sizes = TRAINING_BUCKETS_WH.get(int(base)) or _computed_sizes(int(base))
        for ratio_index, (w, h) in enumerate(sizes):
            if scale != 1.0 or w % multiple or h % multiple:
                w, h = _round_to(w * scale, multiple), _round_to(h * scale, multiple)
            if (w, h) in seen:
                continue
            seen.add((w, h))
            buckets.append(Bucket(width=w, height=h, base=int(base), ratio_index=ratio_index))
    return buckets


def nearest_ratio_index(width: int, height: int) -> int:
    """Index in ``ASPECT_RATIOS`` of the ratio closest to ``width / height`` in log space."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    log_ar = math.log(width / height)
    dists = [abs(log_ar - math.log(rw / rh)) for rw, rh in ASPECT_RATIOS]
    return int(np.argmin(dists))


def upscale_factor(width: int, height: int, bucket: Bucket) -> float:
    """Scale the image needs to cover ``bucket`` (> 1 means upscaling)."""
    return max(bucket.width / width, bucket.height / height)


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket], *,
                  base_probs: Mapping[int, float] | None = None,
                  rng: np.random.Generator | None = None,
                  max_upscale: float | None = None) -> Bucket:
    """The bucket of a ``width x height`` image.

    The aspect ratio is the one closest in log space (among the ratios present in ``buckets``).
    Among that ratio's buckets (one per base area), candidates needing an upscale above
    ``max_upscale`` are dropped (when all would be, the smallest is kept). The base is then drawn
    with ``base_probs`` (base side -> weight, renormalized over the candidates; missing bases
    weigh 0, all-zero falls back to uniform) using ``rng``; without ``rng`` the largest candidate
    is taken.
    """
    if not buckets:
        raise ValueError("assign_bucket: empty bucket list")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    log_ar = math.log(width / height)
    present = {b.ratio_index for b in buckets}
    # Distance to the nominal ratio (the bucket's own up to rounding); ties -> lower index.
    best_ratio = min(present, key=lambda i: (
        abs(log_ar - math.log(ASPECT_RATIOS[i][0] / ASPECT_RATIOS[i][1])), i))
    candidates = sorted((b for b in buckets if b.ratio_index == best_ratio),
                        key=lambda b: b.num_tokens)
    if max_upscale is not None:
        allowed = [b for b in candidates if upscale_factor(width, height, b) <= max_upscale]
        candidates = allowed or candidates[:1]
    if rng is None or len(candidates) == 1:
        return candidates[-1]
    weights = np.array([float((base_probs or {}).get(b.base, 0.0 if base_probs else 1.0))
                        for b in candidates])
    if weights.sum() <= 0:
        weights = np.ones(len(candidates))
    return candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]


def resize_and_crop(image: Image.Image, bucket: Bucket,
                    resample: int = Image.Resampling.LANCZOS) -> np.ndarray:
    """``[bucket.height, bucket.width, 3]`` uint8: RGB ``image`` resized to cover the bucket
    (aspect preserved) and centre-cropped."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    scale = upscale_factor(width, height, bucket)
    new_w = max(bucket.width, int(math.ceil(width * scale - 1e-6)))
    new_h = max(bucket.height, int(math.ceil(height * scale - 1e-6)))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample=resample, reducing_gap=None)
    left = (new_w - bucket.width) // 2
    top = (new_h - bucket.height) // 2
    image = image.crop((left, top, left + bucket.width, top + bucket.height))
    return np.asarray(image, dtype=np.uint8)


def draft_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """The smallest size covering ``bucket`` at the image's aspect ratio (for ``Image.draft``,
    which lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 while staying >= this size)."""
    scale = upscale_factor(width, height, bucket)
    return int(math.ceil(width * scale)), int(math.ceil(height * scale))


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[0, 255]`` -> float32 ``[-1, 1]`` (``x / 127.5 - 1``)."""
    return pixels.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def from_unit_range(pixels: np.ndarray) -> np.ndarray:
    """float ``[-1, 1]`` -> uint8 (rounded, clipped)."""
    scaled = np.round((np.asarray(pixels, np.float32) + 1.0) * 127.5)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def patchify_image(image: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """``[H, W, C]`` -> ``[h*w, patch*patch*C]``: token ``r*w + q`` holds rows ``16r..16r+15``,
    columns ``16q..16q+15``, flattened as ``(py, px, c)``. Any dtype."""
    height, width, channels = image.shape
    if height % patch or width % patch:
        raise ValueError(f"image {width}x{height} is not a multiple of the {patch}-pixel patch")
    h, w = height // patch, width // patch
    x = image.reshape(h, patch, w, patch, channels).transpose(0, 2, 1, 3, 4)
    return x.reshape(h * w, patch * patch * channels)


def unpatchify_image(patches: np.ndarray, h: int, w: int, patch: int = PATCH) -> np.ndarray:
    """Inverse of ``patchify_image``: ``[h*w, patch*patch*C]`` -> ``[h*patch, w*patch, C]``."""
    patches = np.asarray(patches)
    if patches.shape[0] != h * w or patches.shape[1] % (patch * patch):
        raise ValueError(f"patches of shape {patches.shape} do not hold a {h}x{w} grid of "
                         f"{patch}x{patch} patches")
    channels = patches.shape[1] // (patch * patch)
    x = patches.reshape(h, w, patch, patch, channels).transpose(0, 2, 1, 3, 4)
    return x.reshape(h * patch, w * patch, channels)
