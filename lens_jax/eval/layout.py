"""Prompt-following score on the synthetic coloured-shapes task (``lens-eval layout``).

In the spirit of GenEval, but with exact ground truth: each generated image comes with the layout
its prompt was written from (``lens_jax.data.synth_shapes``), and the image is read back by
colour segmentation and geometry, with no learned detector:

1. every pixel takes the nearest of the eight object colours, unless it is closer to the layout's
   background (a plain colour, or anywhere on the segment between the two colours of a gradient)
   or farther than ``max_color_distance`` from every object colour (a layout that names a held-out
   colour of ``synth_shapes.HELD_OUT_COLORS`` adds it to the eight: ``palette``);
2. each colour mask is opened (``opening_size`` square) to drop anti-aliased rims, thin bridges
   and noise; its connected components of at least ``min_area_fraction`` of a small object's
   bounding square are the detected objects;
3. each detection gets a centroid, a bounding box, an area and a shape class (nearest prototype
   in fill ratio / aspect ratio / vertical centroid offset / solidity; the prototypes are the
   renderer's shapes at the detection's size, sharp and blurred, segmented the same way).

Per prompt and category the result is pass / fail / not applicable (see ``CATEGORIES`` and
docs/eval.md); a category's score is the fraction of its applicable prompts that pass.
Everything is deterministic: the same images and layouts give the same report.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from lens_jax.data.synth_shapes import (HELD_OUT_COLORS, POSITION_NAMES, OBJECT_COLORS, SHAPES,
                                        SIZE_FRACTIONS, bucket_sizes, caption_dense, caption_short,
                                        render_layout, sample_layout)

REPORT_VERSION = 2  # 2: colour matching keeps the k largest detections of each colour
COLOR_NAMES: tuple[str, ...] = tuple(OBJECT_COLORS)
_COLOR_RGB = np.asarray([OBJECT_COLORS[c] for c in COLOR_NAMES], np.float32)  # [8, 3]

# Category -> which prompts it applies to and what must hold (docs/eval.md has the long form).
CATEGORIES: dict[str, str] = {
    "object_present": "every colour of the prompt is found (at least one object of it)",
    "count": "the detected objects' colours equal the prompt's colours as a multiset (no extras)",
    "colour": "each prompt object, matched by location, has its colour (1 object: the largest)",
    "single_object_colour": "1-object prompts: the largest detected object has the right colour",
    "shape": "each prompt object, matched by colour, has its shape",
    "position": ">=2 objects: every pairwise relation of the caption (left/right/above/below) "
                "holds between the colour-matched detections",
    "region": "each prompt object, matched by colour, lies in its named ninth of the image",
    "colour_binding": ">=2 colours: each colour is found on the right shape",
}
# Relations use the caption's rule (synth_shapes._relation): both axes when both offsets exceed
# this fraction of the image side, otherwise the larger offset's axis.
_RELATION_BOTH_AXES = 0.15


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Thresholds of the segmentation (defaults are what every reported number uses)."""

    max_color_distance: float = 80.0  # RGB distance beyond which a pixel is no object colour
    opening_size: int = 3  # side of the square structuring element of the opening (1: none)
    min_area_fraction: float = 0.1  # min opened area, x (small object side)^2
    region_tolerance: float = 0.05  # slack around each third of the image, x image side
    # held-out colours (synth_shapes.HELD_OUT_COLORS) in every layout's palette, not only in those
    # that name them: finds a LoRA's new colour painted for a prompt of an old one
    extra_colors: tuple[str, ...] = ()


class Detection(NamedTuple):
    """One detected object (pixel coordinates of the scored image)."""

    color: str
    shape: str
    area: int  # pixels of the recovered component
    center: tuple[float, float]  # (x, y) centroid
    bbox: tuple[int, int, int, int]  # [x0, y0, x1, y1)

    def to_json(self) -> dict[str, Any]:
        return {"color": self.color, "shape": self.shape, "area": self.area,
                "center": [round(self.center[0], 2), round(self.center[1], 2)],
                "bbox": list(self.bbox)}


class EvalPrompt(NamedTuple):
    """A held-out evaluation prompt: its layout, captions and image size."""

    layout: dict[str, Any]
    caption: str
    short_caption: str
    width: int
    height: int


# ---------------------------------------------------------------------------------------------
# Held-out prompts

# Spawn-key tag of the evaluation stream: training examples use default_rng([seed, index])
# (no spawn key), evaluation prompts SeedSequence(seed, spawn_key=(tag, index, attempt)).
EVAL_STREAM_TAG = 0x4C454E53  # "LENS"


def make_eval_set(num: int, seed: int = 0, base_size: int = 64,
                  groups: Sequence[int] = (512, 768, 1024), balanced: bool = True,
                  short_style: str = "plain", placement: str = "free",
                  aspect: str = "all") -> list[EvalPrompt]:
    """``num`` held-out prompts (layout, dense caption, short caption of ``short_style``
    (``synth_shapes.caption_short``), width, height).

    Sizes are training buckets (``bucket_sizes(base_size, groups, aspect=aspect)``). The random stream is a
    numpy ``SeedSequence`` child with a spawn key, disjoint by construction from the training
    stream ``default_rng([seed, index])`` of ``lens-data synth-shapes``. With ``balanced``, prompt
    ``i`` has ``1 + i % 4`` objects (layouts are redrawn from the same stream until they do), so
    every object count, the 1-object prompts included, gets a quarter of the set. ``placement``:
    of the objects, as ``synth_shapes.sample_layout``'s.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    sizes = bucket_sizes(base_size, groups, aspect=aspect)
    prompts = []
    for index in range(num):
        wanted = 1 + index % 4 if balanced else None
        for attempt in itertools.count():
            sequence = np.random.SeedSequence(seed, spawn_key=(EVAL_STREAM_TAG, index, attempt))
            rng = np.random.default_rng(sequence)
            width, height = sizes[int(rng.integers(len(sizes)))]
            layout = sample_layout(rng, width, height, placement)
            if wanted is None or len(layout["objects"]) == wanted or attempt >= 255:
                break
        prompts.append(EvalPrompt(layout, caption_dense(layout), caption_short(layout, short_style),
                                  int(width), int(height)))
    return prompts


# ---------------------------------------------------------------------------------------------
# Segmentation


def _check_image(image: np.ndarray, index: int | None = None) -> np.ndarray:
    where = "" if index is None else f"image {index}: "
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{where}expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}expected uint8 pixels, got {image.dtype} (convert decoder "
                         "output in [-1, 1] with lens_jax.models.latents.to_uint8)")
    if min(image.shape[:2]) < 8:
        raise ValueError(f"{where}image {image.shape[1]}x{image.shape[0]} is too small to score")
    return image


def _background_distance(pixels: np.ndarray, background: dict[str, Any]) -> np.ndarray:
    """RGB distance [H, W] of every pixel to the background: its colour, or the segment between
    a gradient's two colours (any point of the ramp, wherever the model put it)."""
    colors = np.asarray(background["rgb"], np.float32).reshape(-1, 3)
    if len(colors) == 1 or background.get("kind") == "plain":
        offset = pixels - colors[0]
        return np.sqrt(np.einsum("hwc,hwc->hw", offset, offset))
    start, direction = colors[0], colors[1] - colors[0]
    offset = pixels - start
    t = np.clip((offset @ direction) / max(float(direction @ direction), 1e-6), 0, 1)
    residual = offset - t[..., None] * direction
    return np.sqrt(np.einsum("hwc,hwc->hw", residual, residual))


def palette(layout: dict[str, Any], config: ScoreConfig = ScoreConfig()) -> tuple[str, ...]:
    """The object colours an image of ``layout`` is segmented with: ``COLOR_NAMES``, then the
    held-out colours (``synth_shapes.HELD_OUT_COLORS``) its objects name or
    ``config.extra_colors`` lists. Layouts of the generator name none, so with the default config
    their scores do not depend on the held-out colours."""
    unknown = sorted(set(config.extra_colors) - set(HELD_OUT_COLORS))
    if unknown:
        raise ValueError(f"extra colours {unknown} are not held-out colours; known: "
                         f"{sorted(HELD_OUT_COLORS)}")
    extra = ({o["color"] for o in layout["objects"]} | set(config.extra_colors)) & set(HELD_OUT_COLORS)
    return COLOR_NAMES + tuple(c for c in HELD_OUT_COLORS if c in extra)


def color_labels(image: np.ndarray, layout: dict[str, Any],
                 config: ScoreConfig = ScoreConfig()) -> np.ndarray:
    """Per-pixel object colour index into ``palette(layout)`` [H, W], -1 for background / none."""
    pixels = _check_image(image).astype(np.float32)
    colors = palette(layout, config)
    rgb = _COLOR_RGB if len(colors) == len(COLOR_NAMES) else np.asarray(
        [OBJECT_COLORS.get(c) or HELD_OUT_COLORS[c] for c in colors], np.float32)  # [K, 3]
    # Squared distances to the K colours, |p|^2 - 2 p.c + |c|^2 (exact in float32 for 0..255).
    squared = ((pixels ** 2).sum(-1, keepdims=True) - 2.0 * pixels @ rgb.T
               + (rgb ** 2).sum(-1))  # [H, W, K]
    nearest = np.argmin(squared, axis=-1)
    nearest_dist = np.sqrt(np.maximum(
        np.take_along_axis(squared, nearest[..., None], axis=-1)[..., 0], 0.0))
    is_object = ((nearest_dist < _background_distance(pixels, layout["background"]))
                 & (nearest_dist <= config.max_color_distance))
    return np.where(is_object, nearest, -1).astype(np.int32)


def _features(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(fill ratio of the bounding box, width / height, vertical centroid offset in the box,
    solidity = area / convex hull area) of a binary mask."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    area = len(ys)
    return (float(area / (h * w)), float(w / h), float((ys.mean() + 0.5 - y0) / h),
            float(area / _hull_area(xs, ys)))


def _hull_area(xs: np.ndarray, ys: np.ndarray) -> float:
    """Area of the convex hull of the pixels (unit squares) at ``xs``, ``ys``."""
    from scipy.spatial import ConvexHull, QhullError

    # Only the first and last pixel of each row can be hull vertices.
    order = np.lexsort((xs, ys))
    rows, starts = np.unique(ys[order], return_index=True)
    ends = np.append(starts[1:], len(order)) - 1
    ex = np.concatenate([xs[order][starts], xs[order][ends] + 1])  # left edge, right edge
    ey = np.concatenate([rows, rows])
    corners = np.concatenate([np.stack([ex, ey + dy], -1) for dy in (0, 1)]).astype(np.float64)
    try:
        return max(float(ConvexHull(corners).volume), float(len(xs)))
    except QhullError:  # degenerate (a line of pixels): solidity 1
        return float(len(xs))


# Blur radii (pixels) of the prototype renders: generated images are rarely as crisp as the
# renderer's, and blur changes a small shape's mask (corners round off, fill ratio grows).
PROTOTYPE_BLURS = (0.0, 0.6, 1.0)


def _prototype_side(side: int) -> int:
    """Sides with their own prototypes: every side up to 24 px, then multiples of 4 up to 64;
    larger objects use 64 (the features barely change beyond)."""
    side = max(int(side), 4)
    return side if side <= 24 else min(64, 4 * round(side / 4))


@functools.lru_cache(maxsize=512)
def shape_prototypes(side: int, config: ScoreConfig = ScoreConfig()
                     ) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """(shape, features) of each shape rendered by ``render_layout`` with a bounding square of
    about ``side`` pixels, sharp and blurred (``PROTOTYPE_BLURS``), segmented like a detection."""
    from PIL import Image, ImageFilter
    from scipy import ndimage

    side = _prototype_side(side)
    pad = 4 + side // 4
    background = {"kind": "plain", "colors": ["white"], "rgb": [[245, 245, 245]],
                  "direction": None}
    prototypes = []
    for shape in SHAPES:
        # A star's extent is 0.95 of its bounding square: size it so that its extent is ``side``.
        square = round(side / 0.951) if shape == "star" else side
        layout = {"width": square + 2 * pad, "height": square + 2 * pad,
                  "background": background,
                  "objects": [{"shape": shape, "color": "red", "rgb": list(OBJECT_COLORS["red"]),
                               "bbox": [pad, pad, pad + square, pad + square]}]}
        sharp = render_layout(layout)
        for radius in PROTOTYPE_BLURS:
            image = sharp if radius == 0 else np.asarray(
                Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(radius)))
            raw = color_labels(image, layout, config) == COLOR_NAMES.index("red")
            regions = _regions(raw, 4.0, config, ndimage)
            if regions:
                largest = max(regions, key=lambda m: int(m.sum()))
                prototypes.append((shape, _features(largest)))
    return tuple(prototypes)


# Vertical offset separates triangle / diamond, solidity star / the rest.
_FEATURE_WEIGHTS = np.asarray([1.0, 1.0, 2.0, 1.0])


def classify_shape(mask: np.ndarray, config: ScoreConfig = ScoreConfig()) -> str:
    """The shape of the nearest prototype (weighted feature distance) at the mask's size."""
    ys, xs = np.nonzero(mask)
    side = max(int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1)
    features = np.asarray(_features(mask))
    best, best_distance = SHAPES[0], math.inf
    # Ties go to the first prototype (SHAPES order).
    for shape, prototype in shape_prototypes(_prototype_side(side), config):
        distance = float(np.linalg.norm((features - np.asarray(prototype)) * _FEATURE_WEIGHTS))
        if distance < best_distance:
            best, best_distance = shape, distance
    return best


def _regions(raw: np.ndarray, min_area: float, config: ScoreConfig, ndimage
             ) -> list[np.ndarray]:
    """Object masks of one colour's mask ``raw`` [H, W]: the components of its opening with at
    least ``min_area`` pixels (cores), each grown back over its component of ``raw`` (the pixels
    the opening removed: star tips, thin corners); a component of ``raw`` holding several cores
    is split between them by nearest core pixel."""
    cross = ndimage.generate_binary_structure(2, 1)
    size = config.opening_size
    opened = ndimage.binary_opening(raw, np.ones((size, size), bool)) if size > 1 else raw
    cores, count = ndimage.label(opened, cross)
    if count == 0:
        return []
    areas = ndimage.sum_labels(opened, cores, np.arange(1, count + 1))
    kept = np.nonzero(areas >= min_area)[0] + 1
    if len(kept) == 0:
        return []
    cores = np.where(np.isin(cores, kept), cores, 0)
    components, _ = ndimage.label(raw, cross)
    # Nearest kept core pixel of every pixel (Euclidean; ties broken by scipy's scan order),
    # used only within the same component of ``raw``.
    _, (iy, ix) = ndimage.distance_transform_edt(cores == 0, return_indices=True)
    grown = np.where(raw & (components == components[iy, ix]), cores[iy, ix], 0)
    return [grown == k for k in kept]


def detect_objects(image: np.ndarray, layout: dict[str, Any],
                   config: ScoreConfig = ScoreConfig()) -> list[Detection]:
    """The objects of ``image``: opened connected components of each object colour.

    Sorted by colour index, then area (largest first), then position: deterministic.
    """
    from scipy import ndimage

    labels = color_labels(image, layout, config)
    colors = palette(layout, config)
    height, width = labels.shape
    small_side = SIZE_FRACTIONS["small"] * min(width, height)
    min_area = max(4.0, config.min_area_fraction * small_side ** 2)
    detections = []
    for color_index in np.unique(labels[labels >= 0]):
        found = []
        for region in _regions(labels == color_index, min_area, config, ndimage):
            ys, xs = np.nonzero(region)
            found.append(Detection(
                color=colors[int(color_index)], shape=classify_shape(region, config),
                area=int(len(ys)), center=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
                bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
        found.sort(key=lambda d: (-d.area, d.center[1], d.center[0]))
        detections.extend(found)
    return detections


# ---------------------------------------------------------------------------------------------
# Scoring


def _scaled_objects(layout: dict[str, Any], width: int, height: int) -> list[dict[str, Any]]:
    """The layout's objects with centres in the scored image's pixels."""
    sx, sy = width / layout["width"], height / layout["height"]
    return [{**obj, "center": (obj["center"][0] * sx, obj["center"][1] * sy)}
            for obj in layout["objects"]]


def _assign(gt_centers: list[tuple[float, float]], det_centers: list[tuple[float, float]],
            width: int, height: int) -> list[int | None]:
    """Optimal one-to-one matching on normalised centroid distance: detection index per GT
    object (None when detections run out)."""
    from scipy.optimize import linear_sum_assignment

    matches: list[int | None] = [None] * len(gt_centers)
    if not gt_centers or not det_centers:
        return matches
    gt = np.asarray(gt_centers) / (width, height)
    det = np.asarray(det_centers) / (width, height)
    cost = np.linalg.norm(gt[:, None, :] - det[None, :, :], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    for r, c in zip(rows, cols):
        matches[int(r)] = int(c)
    return matches


def _match_by_color(objects: list[dict[str, Any]], detections: list[Detection], width: int,
                    height: int) -> list[Detection | None]:
    """For each GT object, a detection of its colour: within each colour, the ``k`` largest
    detections (``k``: the prompt's objects of that colour, as GenEval keeps the most confident
    detections) paired with the prompt objects by minimum total distance. Choosing among all the
    detections of a colour by distance would let an image with blobs of every colour everywhere
    (the untrained model's noise) pass position and region by chance."""
    matched: list[Detection | None] = [None] * len(objects)
    for color in sorted({o["color"] for o in objects}):
        gt_index = [i for i, o in enumerate(objects) if o["color"] == color]
        candidates = sorted((d for d in detections if d.color == color),
                            key=lambda d: -d.area)[:len(gt_index)]
        assignment = _assign([objects[i]["center"] for i in gt_index],
                             [d.center for d in candidates], width, height)
        for i, j in zip(gt_index, assignment):
            matched[i] = None if j is None else candidates[j]
    return matched


def _relation_axes(a: tuple[float, float], b: tuple[float, float], width: int, height: int
                   ) -> list[tuple[int, float]]:
    """The (axis, sign of b - a) pairs the caption states for objects a and b."""
    dx, dy = (b[0] - a[0]) / width, (b[1] - a[1]) / height
    if abs(dx) > _RELATION_BOTH_AXES and abs(dy) > _RELATION_BOTH_AXES:
        return [(0, math.copysign(1, dx)), (1, math.copysign(1, dy))]
    if abs(dx) >= abs(dy):
        return [(0, math.copysign(1, dx))]
    return [(1, math.copysign(1, dy))]


def _in_region(center: tuple[float, float], position: str, width: int, height: int,
               tolerance: float) -> bool:
    row = next(r for r, names in enumerate(POSITION_NAMES) if position in names)
    col = POSITION_NAMES[row].index(position)
    x, y = center[0] / width, center[1] / height
    return (col / 3 - tolerance <= x <= (col + 1) / 3 + tolerance
            and row / 3 - tolerance <= y <= (row + 1) / 3 + tolerance)


# Categories a short caption ("a red circle and two blue squares") gives no basis for: it names
# no positions, so placement and location-matched colours are not asked of the model.
SHORT_PROMPT_NOT_APPLICABLE = ("position", "region")
PROMPT_KINDS = ("dense", "short")


def score_image(image: np.ndarray, layout: dict[str, Any],
                config: ScoreConfig = ScoreConfig(), prompt_kind: str = "dense"
                ) -> dict[str, Any]:
    """Per-category result of one image: ``{"categories": {name: True|False|None},
    "detections": [...]}`` (None: the category does not apply to this prompt).

    ``prompt_kind="short"``: the image was generated from the short caption, which names no
    positions: ``position`` and ``region`` do not apply, and ``colour`` applies to 1-object
    prompts only (for several objects it matches by location).
    """
    if prompt_kind not in PROMPT_KINDS:
        raise ValueError(f"prompt_kind must be one of {PROMPT_KINDS}, got {prompt_kind!r}")
    image = _check_image(image)
    height, width = image.shape[:2]
    detections = detect_objects(image, layout, config)
    objects = _scaled_objects(layout, width, height)
    gt_colors = [o["color"] for o in objects]
    by_color = _match_by_color(objects, detections, width, height)
    results: dict[str, bool | None] = {}

    results["object_present"] = all(any(d.color == c for d in detections) for c in set(gt_colors))
    results["count"] = Counter(d.color for d in detections) == Counter(gt_colors)

    if len(objects) == 1:
        largest = max(detections, key=lambda d: d.area, default=None)
        single = largest is not None and largest.color == gt_colors[0]
        results["colour"] = single
        results["single_object_colour"] = single
    else:
        by_location = _assign([o["center"] for o in objects], [d.center for d in detections],
                              width, height)
        results["colour"] = all(j is not None and detections[j].color == o["color"]
                                for o, j in zip(objects, by_location))
        results["single_object_colour"] = None

    results["shape"] = all(d is not None and d.shape == o["shape"]
                           for o, d in zip(objects, by_color))

    if len(objects) >= 2:
        ok = all(d is not None for d in by_color)
        for i, j in itertools.combinations(range(len(objects)), 2):
            if not ok:
                break
            for axis, sign in _relation_axes(objects[i]["center"], objects[j]["center"],
                                             width, height):
                delta = by_color[j].center[axis] - by_color[i].center[axis]
                ok = ok and delta * sign > 0
        results["position"] = ok
    else:
        results["position"] = None

    results["region"] = all(
        d is not None and _in_region(d.center, o["position"], width, height,
                                     config.region_tolerance)
        for o, d in zip(objects, by_color))

    if len(set(gt_colors)) >= 2:
        results["colour_binding"] = all(d is not None and d.shape == o["shape"]
                                        for o, d in zip(objects, by_color))
    else:
        results["colour_binding"] = None
    if prompt_kind == "short":
        for name in SHORT_PROMPT_NOT_APPLICABLE:
            results[name] = None
        if len(objects) > 1:
            results["colour"] = None
    if not objects:  # an empty layout: nothing to find
        results = {name: None for name in CATEGORIES}
    return {"categories": {name: results[name] for name in CATEGORIES},
            "detections": [d.to_json() for d in detections]}


def score_images(images: Sequence[np.ndarray], layouts: Sequence[dict[str, Any]],
                 names: Sequence[str] | None = None, config: ScoreConfig = ScoreConfig(),
                 show_progress: bool = False, prompt_kind: str | Sequence[str] = "dense"
                 ) -> dict[str, Any]:
    """The report of a set of generated images against their prompts' layouts.

    ``{"version", "num_images", "categories": {name: {"score", "passed", "prompts",
    "description"}}, "overall" (mean of the applicable categories' scores), "by_object_count":
    {"1": {name: {"score", "passed", "prompts"}}, "2": ...} (the same tally over the prompts of
    each object count), "config",
    "per_image": [{"name", "prompt_kind", "categories", "detections"}]}``. A category with no
    applicable prompt has score None. ``prompt_kind``: "dense" (default) or "short" for every
    image, or one per image (see ``score_image``).
    """
    if len(images) != len(layouts):
        raise ValueError(f"{len(images)} images but {len(layouts)} layouts")
    kinds = [prompt_kind] * len(images) if isinstance(prompt_kind, str) else list(prompt_kind)
    if len(kinds) != len(images):
        raise ValueError(f"{len(kinds)} prompt kinds for {len(images)} images")
    if names is not None and len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    iterator: Iterable[int] = range(len(images))
    if show_progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(images), desc="lens-eval layout", unit="img")
    per_image = []
    for i in iterator:
        _check_layout(layouts[i], f"layout {i if names is None else names[i]}")
        try:
            result = score_image(images[i], layouts[i], config, kinds[i])
        except ValueError as e:
            raise ValueError(f"{names[i] if names is not None else f'image {i}'}: {e}") from None
        per_image.append({"name": names[i] if names is not None else str(i),
                          "prompt_kind": kinds[i], **result})
    categories = _tally(per_image, with_descriptions=True)
    scores = [c["score"] for c in categories.values() if c["score"] is not None]
    counts = [len(layout["objects"]) for layout in layouts]
    by_object_count = {str(n): _tally([r for r, c in zip(per_image, counts) if c == n])
                       for n in sorted(set(counts))}
    return {"version": REPORT_VERSION, "num_images": len(images), "categories": categories,
            "overall": float(np.mean(scores)) if scores else None,
            "by_object_count": by_object_count,
            "config": dataclasses.asdict(config), "per_image": per_image}


def _tally(per_image: Sequence[dict[str, Any]], with_descriptions: bool = False
           ) -> dict[str, dict[str, Any]]:
    """``{category: {"score", "passed", "prompts"[, "description"]}}`` over ``per_image`` rows
    (a category's score is None where it applies to none of them)."""
    out = {}
    for name, description in CATEGORIES.items():
        outcomes = [r["categories"][name] for r in per_image if r["categories"][name] is not None]
        passed = int(sum(outcomes))
        out[name] = {"score": passed / len(outcomes) if outcomes else None, "passed": passed,
                     "prompts": len(outcomes)}
        if with_descriptions:
            out[name]["description"] = description
    return out


def format_table(report: dict[str, Any]) -> str:
    """The per-category table of a report, as printed by ``lens-eval layout``."""
    lines = [f"{'category':<22} {'score':>6} {'passed':>7} / prompts",
             "-" * 46]
    for name, row in report["categories"].items():
        score = "   n/a" if row["score"] is None else f"{row['score']:6.3f}"
        lines.append(f"{name:<22} {score} {row['passed']:>7} / {row['prompts']}")
    lines.append("-" * 46)
    overall = "n/a" if report["overall"] is None else f"{report['overall']:6.3f}"
    lines.append(f"{'overall':<22} {overall}   ({report['num_images']} images)")
    by_count = report.get("by_object_count") or {}
    if by_count:
        counts = list(by_count)
        lines += ["", "by number of objects in the prompt (score, passed / prompts):",
                  f"{'category':<22} " + " ".join(f"{n + (' object' if n == '1' else ' objects'):>15}"
                                                  for n in counts)]
        for name in report["categories"]:
            cells = []
            for n in counts:
                row = by_count[n][name]
                cells.append(f"{'n/a':>15}" if row["score"] is None else
                             f"{row['score']:.2f} {row['passed']:>4}/{row['prompts']:<4}".rjust(15))
            lines.append(f"{name:<22} " + " ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Folders of generated images with JSON sidecars

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def _check_layout(layout: Any, where: str) -> None:
    if not isinstance(layout, dict):
        raise ValueError(f"{where}: expected a layout object, got {type(layout).__name__}")
    missing = [k for k in ("width", "height", "background", "objects") if k not in layout]
    if missing:
        raise ValueError(f"{where}: layout lacks {missing} (expected a synth_shapes layout)")
    rgb = layout["background"].get("rgb") if isinstance(layout["background"], dict) else None
    if not rgb or np.asarray(rgb).ndim != 2 or np.asarray(rgb).shape[-1] != 3:
        raise ValueError(f"{where}: background needs 'rgb': a list of 1 or 2 [r, g, b] colours")
    for k, obj in enumerate(layout["objects"]):
        lacking = [f for f in ("shape", "color", "center", "position") if f not in obj]
        if lacking:
            raise ValueError(f"{where}: object {k} lacks {lacking}")
        if obj["color"] not in OBJECT_COLORS and obj["color"] not in HELD_OUT_COLORS:
            raise ValueError(f"{where}: object {k} has unknown colour {obj['color']!r}")


def write_sidecar(path: str | os.PathLike, layout: dict[str, Any], caption: str = "",
                  short_caption: str = "", **extra: Any) -> None:
    """Writes the JSON sidecar of a generated image: ``{"layout", "caption", "short_caption",
    ...extra}`` (``IMG.png`` -> ``IMG.json``)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"layout": layout, "caption": caption, "short_caption": short_caption, **extra},
                  f, sort_keys=True)


PROMPT_KEYS = ("prompt", "caption", "short_caption")


def read_prompts_file(path: str | os.PathLike) -> dict[str, dict[str, Any] | None]:
    """Prompt text -> layout, from a JSONL file of ``lens-eval prompts`` (each line's
    ``prompt``, ``caption`` and ``short_caption`` all map to its ``layout``; None for a text
    that several different layouts share)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such prompts file")
    table: dict[str, dict[str, Any]] = {}
    from lens_jax.data.build import iter_jsonl_objects

    for line_no, row in iter_jsonl_objects(path):
        if "layout" not in row:
            raise ValueError(f"{path}:{line_no}: expected an object with a 'layout' key")
        _check_layout(row["layout"], f"{path}:{line_no}")
        for key in PROMPT_KEYS:
            text = row.get(key)
            if isinstance(text, str):
                # A text shared by different layouts (a short caption, typically) is
                # ambiguous: None, refused when looked up.
                if text in table and table[text] != row["layout"]:
                    table[text] = None
                else:
                    table.setdefault(text, row["layout"])
    if not table:
        raise ValueError(f"{path}: no prompts")
    return table


def load_folder(folder: str | os.PathLike, limit: int | None = None,
                prompts: dict[str, dict[str, Any] | None] | None = None
                ) -> tuple[list[np.ndarray], list[dict[str, Any]], list[str]]:
    """Images (uint8 RGB), layouts and file names of a folder of ``NAME.png`` + ``NAME.json``.

    The sidecar holds ``{"layout": {...}}`` (other keys such as ``caption`` are ignored; lens
    record metadata of ``synth-shapes`` has the same ``layout`` key), or, with ``prompts``
    (``read_prompts_file``), a ``prompt``/``caption`` whose layout is looked up there (sidecars
    of ``lens-sample``). Sorted by file name.
    """
    from PIL import Image

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a folder")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    if limit is not None:
        files = files[:limit]
    images, layouts = [], []
    for name in files:
        sidecar = os.path.join(folder, os.path.splitext(name)[0] + ".json")
        if not os.path.exists(sidecar):
            raise ValueError(f"{os.path.join(folder, name)}: sidecar {sidecar} is missing")
        try:
            with open(sidecar, encoding="utf-8") as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{sidecar}: not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{sidecar}: expected a JSON object")
        layout = meta.get("layout")
        if layout is None and prompts is not None:
            text = next((meta[k] for k in PROMPT_KEYS if isinstance(meta.get(k), str)), None)
            if text is None:
                raise ValueError(f"{sidecar}: no 'layout' and no prompt to look up")
            if text not in prompts:
                raise ValueError(f"{sidecar}: its prompt is not in the prompts file: "
                                 f"{text[:80]!r}")
            layout = prompts[text]
            if layout is None:
                raise ValueError(f"{sidecar}: its prompt {text[:80]!r} belongs to several layouts "
                                 "in the prompts file (sample the dense captions, or write the "
                                 "layout into the sidecar)")
        if layout is None:
            raise ValueError(f"{sidecar}: expected an object with a 'layout' key (or pass the "
                             "prompts file, --prompts, to look its prompt up)")
        _check_layout(layout, sidecar)
        try:
            with Image.open(os.path.join(folder, name)) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except OSError as e:
            raise ValueError(f"{os.path.join(folder, name)}: unreadable image ({e})") from None
        layouts.append(layout)
    return images, layouts, files


def render_eval_set(prompts: Sequence[EvalPrompt], out_dir: str | os.PathLike) -> list[str]:
    """Ground-truth renders of ``prompts`` with sidecars (``{index:05d}.png`` + ``.json``): what a
    perfect generator would produce; they score 1.0 (a check of the scorer and the format)."""
    from lens_jax.data.synth_shapes import encode_png

    os.makedirs(out_dir, exist_ok=True)
    names = []
    for index, p in enumerate(prompts):
        stem = os.path.join(os.fspath(out_dir), f"{index:05d}")
        with open(stem + ".png", "wb") as f:
            f.write(encode_png(render_layout(p.layout, p.width, p.height)))
        write_sidecar(stem + ".json", p.layout, p.caption, p.short_caption, index=index)
        names.append(stem + ".png")
    return names
