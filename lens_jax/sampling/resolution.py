"""Image sizes: the official Lens buckets (spec 2.3 table) and the resolution checks (spec 2.8)."""

from __future__ import annotations

import re
import warnings
from typing import NamedTuple

PATCH_PIXELS = 16  # 8 (VAE) x 2 (patchify): one latent token per 16 x 16 pixels
MAX_TRAINED_SIDE = 1440  # largest official bucket is 1440 x 1440
MIN_ASPECT, MAX_ASPECT = 0.5, 2.0  # width / height

# (height, width) of the portrait buckets per base; the landscape ones are their transposes.
_PORTRAIT = {
    1024: {"1:2": (1472, 736), "9:16": (1376, 768), "2:3": (1248, 832), "3:4": (1152, 864),
           "1:1": (1024, 1024)},
    1440: {"1:2": (2080, 1040), "9:16": (1936, 1088), "2:3": (1760, 1168), "3:4": (1616, 1216),
           "1:1": (1440, 1440)},
}
ASPECT_RATIOS = ("1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1")


class Bucket(NamedTuple):
    """An official inference resolution: ``aspect`` is W:H ("1:2" is portrait)."""

    base: int
    aspect: str
    height: int
    width: int


def official_buckets() -> list[Bucket]:
    """The 18 official inference buckets (bases 1024 and 1440 x 9 aspect ratios, spec 2.3)."""
    out = []
    for base, table in _PORTRAIT.items():
        for aspect in ASPECT_RATIOS:
            if aspect in table:
                h, w = table[aspect]
            else:
                a, b = aspect.split(":")
                w, h = table[f"{b}:{a}"]  # the transpose of the portrait bucket
            out.append(Bucket(base, aspect, h, w))
    return out


def bucket_size(base: int, aspect: str) -> tuple[int, int]:
    """``(height, width)`` of an official bucket, e.g. ``bucket_size(1024, "3:4") == (1152, 864)``."""
    for b in official_buckets():
        if b.base == int(base) and b.aspect == aspect:
            return b.height, b.width
    raise ValueError(f"no official bucket {base}:{aspect}; bases {sorted(_PORTRAIT)}, aspect ratios "
                     f"(W:H) {', '.join(ASPECT_RATIOS)}")


def parse_size(text: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (e.g. ``"1024x768"``) -> ``(height, width)``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"size {text!r}: expected WIDTHxHEIGHT such as 1024x1024")
    return int(m.group(2)), int(m.group(1))


def parse_bucket(text: str) -> tuple[int, int]:
    """``"BASE:W:H"`` (e.g. ``"1024:3:4"``) -> ``(height, width)`` of that official bucket."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"bucket {text!r}: expected BASE:W:H such as 1024:3:4")
    return bucket_size(int(m.group(1)), f"{m.group(2)}:{m.group(3)}")


def check_resolution(height: int, width: int) -> tuple[int, int]:
    """Raises ValueError unless both sides are positive multiples of 16; warns (does not refuse)
    outside the trained range: aspect ratio beyond 1:2..2:1 or area above 1440 x 1440.

    Returns the latent grid ``(h, w) = (height / 16, width / 16)``.
    """
    height, width = int(height), int(width)
    if height <= 0 or width <= 0 or height % PATCH_PIXELS or width % PATCH_PIXELS:
        raise ValueError(f"height and width must be positive multiples of {PATCH_PIXELS}, got "
                         f"height={height}, width={width} (nearest valid: height={_round16(height)}, "
                         f"width={_round16(width)})")
    aspect = width / height
    if not MIN_ASPECT <= aspect <= MAX_ASPECT:
        warnings.warn(f"{width}x{height} (WxH) has aspect ratio {aspect:.3g}, outside the trained "
                      "range 1:2..2:1; expect degraded images", stacklevel=2)
    if height * width > MAX_TRAINED_SIDE * MAX_TRAINED_SIDE:
        warnings.warn(f"{width}x{height} is larger than the largest trained area (1440x1440); expect "
                      "degraded images and high memory use", stacklevel=2)
    return height // PATCH_PIXELS, width // PATCH_PIXELS


def _round16(x: int) -> int:
    return max(PATCH_PIXELS, int(round(x / PATCH_PIXELS)) * PATCH_PIXELS)
