"""Synthetic "coloured shapes" dataset with ground-truth layouts (``lens-data synth-shapes``).

Every image shows 1-4 flat geometric shapes (circle, square, triangle, diamond, star, hexagon)
in well-separated named colours and three size classes (or, with ``placement="grid"``, one size
at the centres of distinct ninths of the image), on a plain or two-colour gradient
background, at one of the 27 training-bucket sizes of the spec (section 2.8), optionally scaled
down (``base_size``). Each record gets a dense caption (60-120 words: every object with its
colour, size and position, relations between objects, the background), a short caption
("a red circle and two blue squares") and, in ``metadata``, the full layout, so that generated
images can be scored against it.

Generation is a pure function of ``(seed, index)``: the same seed gives identical bytes, whatever
the number of worker processes. Images are stored as PNG.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lens_jax.data.records import Example, write_shards

LAYOUT_VERSION = 1
SOURCE_TAG = "synth-shapes"

# The 27 training buckets of spec section 2.8, as (width, height), grouped by base size.
TRAINING_BUCKETS: dict[int, tuple[tuple[int, int], ...]] = {
    512: ((352, 704), (384, 672), (416, 640), (448, 608), (512, 512), (608, 448), (640, 416),
          (672, 384), (704, 352)),
    768: ((544, 1088), (576, 1024), (640, 960), (672, 896), (768, 768), (896, 672), (960, 640),
          (1024, 576), (1088, 544)),
    1024: ((736, 1472), (768, 1376), (832, 1248), (864, 1152), (1024, 1024), (1152, 864),
           (1248, 832), (1376, 768), (1472, 736)),
}

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
# Object colours: saturated and far apart from each other and from the background palette.
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 215, 35),
    "green": (40, 160, 60),
    "blue": (35, 80, 215),
    "purple": (135, 55, 180),
    "pink": (240, 110, 180),
    "brown": (130, 75, 35),
}
# Colours the generator never draws (``sample_layout`` picks from OBJECT_COLORS only): new concepts
# for a LoRA to learn (``python -m lens_jax.demo lora``, ``with_new_color``). Each is more than 95
# RGB units from every object and background colour, so ``lens-eval layout`` tells it apart.
HELD_OUT_COLORS: dict[str, tuple[int, int, int]] = {
    "cyan": (0, 200, 210),
    "lime": (150, 230, 20),
}
# Share of the records of ``generate_example(new_color=...)`` that get the new colour; the others
# are plain records, which keep the old colours in the data (a LoRA on them forgets less).
NEW_COLOR_RECORD_SHARE = 2 / 3
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (232, 218, 185),
    "pale blue": (180, 212, 240),
    "mint green": (190, 235, 205),
}
# Side of an object's bounding square as a fraction of the image's shorter side.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.16, "medium": 0.26, "large": 0.38}
SIZE_ORDER = ("small", "medium", "large")

POSITION_NAMES = (("upper left", "top centre", "upper right"),
                   ("left", "centre", "right"),
                   ("lower left", "bottom centre", "lower right"))
_POSITION_PHRASES = {
    "upper left": "in the upper left corner", "top centre": "at the top centre",
    "upper right": "in the upper right corner", "left": "on the left side",
    "centre": "in the centre", "right": "on the right side",
    "lower left": "in the lower left corner", "bottom centre": "at the bottom centre",
    "lower right": "in the lower right corner",
}
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
            "diamond": "diamonds", "star": "stars", "hexagon": "hexagons"}
_SHAPE_DETAILS = {
    "circle": "a round disc", "square": "an upright square with straight sides",
    "triangle": "an upward-pointing triangle", "diamond": "a square turned on its corner",
    "star": "a five-pointed star", "hexagon": "a six-sided hexagon with a pointed top",
}
_VERBS = ("sits", "is placed", "appears", "is drawn")


# ---------------------------------------------------------------------------------------------
# Buckets


# Which of each group's nine aspect ratios the images take (``bucket_sizes``): "all" (the
# default, Lens's mixed-resolution buckets) or "square" only. With one size the image tokens'
# RoPE offsets to the text tokens (spec 1.6: text at max(h//2, w//2) + j) are the same in every
# image, so a small model learns where "upper left" is within minutes (docs/demo.md, trial 17).
ASPECTS = ("all", "square")


def bucket_sizes(base_size: int = 512, groups: Sequence[int] = (512, 768, 1024),
                 multiple: int = 16, aspect: str = "all") -> list[tuple[int, int]]:
    """The training buckets of ``groups`` as (width, height), scaled by ``base_size / 512`` and
    rounded to multiples of ``multiple`` (duplicates after rounding removed, order kept); with
    ``aspect`` "square" only those with width == height.

    With ``aspect`` "all", the same sizes as
    ``lens_jax.data.buckets.make_buckets(groups, scale=base_size / 512)``.
    """
    if aspect not in ASPECTS:
        raise ValueError(f"aspect {aspect!r}: expected one of {ASPECTS}")
    scale = base_size / 512
    sizes: list[tuple[int, int]] = []
    for group in groups:
        if group not in TRAINING_BUCKETS:
            raise ValueError(f"unknown bucket group {group}; known: {sorted(TRAINING_BUCKETS)}")
        for w, h in TRAINING_BUCKETS[group]:
            if scale != 1.0 or w % multiple or h % multiple:  # round half up, like buckets.py
                w = max(multiple, int(math.floor(w * scale / multiple + 0.5)) * multiple)
                h = max(multiple, int(math.floor(h * scale / multiple + 0.5)) * multiple)
            size = (w, h)
            if size not in sizes and (aspect == "all" or w == h):
                sizes.append(size)
    return sizes


# ---------------------------------------------------------------------------------------------
# Layout sampling


def _position_name(cx: float, cy: float, width: int, height: int) -> str:
    col = min(2, max(0, int(3 * cx / width)))
    row = min(2, max(0, int(3 * cy / height)))
    return POSITION_NAMES[row][col]


def _overlaps(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0]
                or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _place(rng: np.random.Generator, side: int, width: int, height: int, margin: int,
           taken: list[list[int]], tries: int = 60) -> list[int] | None:
    lo_x, hi_x = margin, width - margin - side
    lo_y, hi_y = margin, height - margin - side
    if hi_x < lo_x or hi_y < lo_y:
        return None
    for _ in range(tries):
        x0 = int(rng.integers(lo_x, hi_x + 1))
        y0 = int(rng.integers(lo_y, hi_y + 1))
        box = [x0, y0, x0 + side, y0 + side]
        if not any(_overlaps(box, other, margin) for other in taken):
            return box
    return None


# Where objects go (``sample_layout``): "free" anywhere that fits, in three size classes (the
# default); "grid" each at the centre of its own ninth of the image, one size (GRID_SIDE_FRACTION),
# so that a caption naming each object's ninth ("places" short captions) fixes the whole image but
# the background. A small model learns "grid" layouts within minutes; "free" ones need it to make
# neighbouring latent tokens agree on where an edge runs (docs/demo.md, "Towards shapes").
PLACEMENTS = ("free", "grid")
# Side of a "grid" object's bounding square as a fraction of the image's shorter side: a ninth's
# shorter side is 1/3 of it for every bucket, so 0.3 leaves a margin of 1/60 of it on each side.
GRID_SIDE_FRACTION = 0.3
GRID_SIZE_CLASS = "medium"  # the class of SIZE_FRACTIONS nearest 0.3, as dense captions name it


def sample_layout(rng: np.random.Generator, width: int, height: int,
                  placement: str = "free") -> dict[str, Any]:
    """A random layout for a ``width`` x ``height`` image: background and 1-4 objects.

    Objects never overlap and keep a margin to the borders; they are listed in reading order
    (top to bottom by row of thirds, then left to right). Every object has ``shape``, ``color``
    (name), ``rgb``, ``size`` (class), ``bbox`` ([x0, y0, x1, y1) pixels), ``center`` and
    ``position`` (one of nine named regions). ``placement``: see ``PLACEMENTS``.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: expected one of {PLACEMENTS}")
    short_side = min(width, height)
    margin = max(1, round(0.03 * short_side))
    background_names = list(BACKGROUND_COLORS)
    if rng.random() < 0.6:
        name = background_names[int(rng.integers(len(background_names)))]
        background = {"kind": "plain", "colors": [name], "rgb": [list(BACKGROUND_COLORS[name])],
                      "direction": None}
    else:
        first, second = (background_names[i] for i in rng.choice(len(background_names), 2,
                                                                  replace=False))
        background = {"kind": "gradient", "colors": [first, second],
                      "rgb": [list(BACKGROUND_COLORS[first]), list(BACKGROUND_COLORS[second])],
                      "direction": "vertical" if rng.random() < 0.5 else "horizontal"}
    count = int(rng.integers(1, 5))
    color_names = list(OBJECT_COLORS)
    objects: list[dict[str, Any]] = []
    taken: list[list[int]] = []
    cells = rng.choice(9, count, replace=False) if placement == "grid" else None  # row-major ninths
    for k in range(count):
        if objects and rng.random() < 0.3:  # sometimes repeat a shape+colour ("two blue squares")
            template = objects[int(rng.integers(len(objects)))]
            shape, color = template["shape"], template["color"]
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = color_names[int(rng.integers(len(color_names)))]
        if cells is not None:  # the centre of its ninth, one size
            row, col = divmod(int(cells[k]), 3)
            side = round(GRID_SIDE_FRACTION * short_side)
            x0 = round((col + 0.5) * width / 3 - side / 2)
            y0 = round((row + 0.5) * height / 3 - side / 2)
            box, size = [x0, y0, x0 + side, y0 + side], GRID_SIZE_CLASS
        else:  # anywhere it fits, shrunk when it does not
            size_index = int(rng.integers(len(SIZE_ORDER)))
            box = None
            while box is None and size_index >= 0:
                side = max(4, round(SIZE_FRACTIONS[SIZE_ORDER[size_index]] * short_side))
                box = _place(rng, side, width, height, margin, taken)
                if box is None:
                    size_index -= 1
            if box is None:
                continue
            size = SIZE_ORDER[size_index]
        taken.append(box)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        objects.append({"shape": shape, "color": color, "rgb": list(OBJECT_COLORS[color]),
                        "size": size, "bbox": box, "center": [cx, cy],
                        "position": _position_name(cx, cy, width, height)})
    objects.sort(key=lambda o: (min(2, int(3 * o["center"][1] / height)), o["center"][0]))
    return {"version": LAYOUT_VERSION, "width": width, "height": height,
            "background": background, "objects": objects}


def with_new_color(layout: dict[str, Any], rng: np.random.Generator, color: str,
                   share: float = 0.5) -> dict[str, Any]:
    """``layout`` with some objects recoloured to the held-out ``color``: each with probability
    ``share``, and at least one (a copy; the captions are written from the result)."""
    if color not in HELD_OUT_COLORS:
        raise ValueError(f"unknown held-out colour {color!r}; known: {sorted(HELD_OUT_COLORS)}")
    objects = [dict(o) for o in layout["objects"]]
    if not objects:
        return dict(layout, objects=objects)
    chosen = rng.random(len(objects)) < share
    chosen[int(rng.integers(len(objects)))] = True
    for obj, change in zip(objects, chosen):
        if change:
            obj.update(color=color, rgb=list(HELD_OUT_COLORS[color]))
    return dict(layout, objects=objects)


# ---------------------------------------------------------------------------------------------
# Rendering


def _regular_polygon(cx: float, cy: float, rx: float, ry: float, sides: int,
                     start_deg: float = -90.0) -> list[tuple[float, float]]:
    return [(cx + rx * math.cos(math.radians(start_deg + 360.0 * k / sides)),
             cy + ry * math.sin(math.radians(start_deg + 360.0 * k / sides)))
            for k in range(sides)]


def _shape_points(shape: str, x0: float, y0: float, x1: float, y1: float
                  ) -> list[tuple[float, float]]:
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "hexagon":
        return _regular_polygon(cx, cy, rx, ry, 6)
    if shape == "star":
        points = []
        for k in range(10):
            angle = math.radians(-90.0 + 36.0 * k)
            scale = 1.0 if k % 2 == 0 else 0.45
            points.append((cx + rx * scale * math.cos(angle), cy + ry * scale * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _background(background: dict[str, Any], width: int, height: int) -> np.ndarray:
    rgb = np.asarray(background["rgb"], dtype=np.float64)  # [1 or 2, 3]
    if background["kind"] == "plain":
        return np.broadcast_to(rgb[0].astype(np.uint8), (height, width, 3)).copy()
    if background["kind"] != "gradient":
        raise ValueError(f"unknown background kind {background['kind']!r}")
    vertical = background["direction"] == "vertical"
    steps = height if vertical else width
    t = np.linspace(0.0, 1.0, steps)[:, None]  # [steps, 1]
    ramp = np.round(rgb[0] * (1.0 - t) + rgb[1] * t).astype(np.uint8)  # [steps, 3]
    if vertical:
        return np.broadcast_to(ramp[:, None, :], (height, width, 3)).copy()
    return np.broadcast_to(ramp[None, :, :], (height, width, 3)).copy()


def render_layout(layout: dict[str, Any], width: int | None = None, height: int | None = None
                  ) -> np.ndarray:
    """The image of ``layout`` as a uint8 array [height, width, 3].

    ``width``/``height`` default to the layout's own; other sizes scale every coordinate.
    """
    from PIL import Image, ImageDraw

    width = int(width or layout["width"])
    height = int(height or layout["height"])
    sx, sy = width / layout["width"], height / layout["height"]
    image = Image.fromarray(_background(layout["background"], width, height), mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in layout["objects"]:
        x0, y0, x1, y1 = obj["bbox"]
        x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
        fill = tuple(int(c) for c in obj["rgb"])
        if obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            draw.polygon(_shape_points(obj["shape"], x0, y0, x1 - 1, y1 - 1), fill=fill)
    return np.asarray(image, dtype=np.uint8).copy()


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 [H, W, 3] array (deterministic)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _references(objects: list[dict[str, Any]]) -> list[str]:
    """A unique-as-possible name for every object ("the red circle", "the large red circle")."""
    refs = []
    for obj in objects:
        base = f"{obj['color']} {obj['shape']}"
        same = [o for o in objects if o["color"] == obj["color"] and o["shape"] == obj["shape"]]
        if len(same) == 1:
            refs.append(f"the {base}")
        elif sum(o["size"] == obj["size"] for o in same) == 1:
            refs.append(f"the {obj['size']} {base}")
        else:
            refs.append(f"the {base} {_POSITION_PHRASES[obj['position']]}")
    return refs


def _relation(a: dict[str, Any], b: dict[str, Any], ref_a: str, ref_b: str, width: int,
              height: int) -> str:
    dx = (b["center"][0] - a["center"][0]) / width
    dy = (b["center"][1] - a["center"][1]) / height
    horizontal = "to the left of" if dx > 0 else "to the right of"
    vertical = "above" if dy > 0 else "below"
    if abs(dx) > 0.15 and abs(dy) > 0.15:
        where = f"{vertical} and {horizontal}"
    elif abs(dx) >= abs(dy):
        where = horizontal
    else:
        where = vertical
    sentence = f"{ref_a.capitalize()} is {where} {ref_b}"
    size_a, size_b = SIZE_ORDER.index(a["size"]), SIZE_ORDER.index(b["size"])
    if size_a != size_b:
        sentence += f" and is {'larger' if size_a > size_b else 'smaller'} than it"
    return sentence + "."


def _background_phrase(background: dict[str, Any]) -> str:
    if background["kind"] == "plain":
        return f"a plain {background['colors'][0]} background"
    first, second = background["colors"]
    if background["direction"] == "vertical":
        return (f"a smooth vertical gradient background that fades from {first} at the top "
                f"to {second} at the bottom")
    return (f"a smooth horizontal gradient background that fades from {first} on the left "
            f"to {second} on the right")


def _words(sentences: list[str]) -> int:
    return sum(len(s.split()) for s in sentences)


def caption_dense(layout: dict[str, Any], min_words: int = 60, max_words: int = 120) -> str:
    """A detailed caption (``min_words``-``max_words`` words) of every object and the background."""
    objects = layout["objects"]
    width, height = layout["width"], layout["height"]
    n = len(objects)
    refs = _references(objects)
    count = _NUMBER_WORDS.get(n, str(n))
    noun = "shape" if n == 1 else "shapes"
    head = [f"A simple synthetic image showing {count} flat geometric {noun} on "
            f"{_background_phrase(layout['background'])}."]

    def object_sentences(detailed: bool) -> list[str]:
        sentences = []
        for i, obj in enumerate(objects):
            lead = "It is" if n == 1 else "There is"
            what = _article(f"{obj['size']} {obj['color']} {obj['shape']}")
            where = _POSITION_PHRASES[obj["position"]]
            if detailed:
                sentences.append(f"{lead} {what}, {_SHAPE_DETAILS[obj['shape']]}, that "
                                 f"{_VERBS[i % len(_VERBS)]} {where} of the image.")
            else:
                sentences.append(f"{lead} {what} {where}.")
        return sentences

    aspect = width / height
    if aspect > 1.05:
        frame = "The picture is in a wide landscape format."
    elif aspect < 0.95:
        frame = "The picture is in a tall portrait format."
    else:
        frame = "The picture is square."
    tail = ["All shapes are solid coloured with crisp edges, no outlines, no shadows and no "
            "texture." if n > 1 else "The shape is solid coloured with crisp edges, no outline, "
            "no shadow and no texture.", frame]
    # Relations: neighbours in reading order first, then the other pairs.
    pairs = [(i, i + 1) for i in range(n - 1)] + [(i, j) for i in range(n) for j in range(i + 2, n)]
    candidates = [_relation(objects[i], objects[j], refs[i], refs[j], width, height)
                  for i, j in pairs]
    # Shape details only while they leave room for the first two relations.
    head += object_sentences(detailed=True)
    if n > 1 and _words(head + tail + candidates[:2]) > max_words:
        head = head[:1] + object_sentences(detailed=False)
    relations: list[str] = []
    for sentence in candidates:
        if _words(head + relations + tail) + len(sentence.split()) <= max_words:
            relations.append(sentence)
    fillers = [
        "The shapes do not overlap or touch each other." if n > 1 else
        "The shape is fully visible and does not touch the edges of the image.",
        "There is no text, no people and no other objects in the scene.",
        "Apart from the " + (noun) + ", the background is empty and evenly lit.",
        "The overall look is clean and minimal, like a diagram or a page from a children's "
        "picture book.",
        "The colours are bright and saturated and stand out clearly against the background.",
        "Nothing is blurred, and the whole image is sharp and in focus.",
    ]
    extra: list[str] = []
    for sentence in fillers:
        if _words(head + relations + tail + extra) >= min_words:
            break
        extra.append(sentence)
    return " ".join(head + relations + tail + extra)


# Styles of the short caption: "plain" names the objects ("a red circle and two blue squares"),
# "places" also names each one's ninth of the image ("a red circle upper left and a blue square
# centre"), so that a short caption carries positions too (~4 words per object); "scene" is
# "places" followed by the dense caption's background phrase ("... centre on a plain beige
# background"), so that with "grid" placement the caption fixes the whole image.
SHORT_CAPTION_STYLES = ("plain", "places", "scene")


def caption_short(layout: dict[str, Any], style: str = "plain") -> str:
    """A few words naming the objects, e.g. "a red circle and two blue squares" (``style``
    "plain"), or each object with its place, "a red circle upper left and a blue square centre"
    ("places": ``POSITION_NAMES``, objects in layout order), and with the background ("scene":
    "... centre on a plain beige background")."""
    if style not in SHORT_CAPTION_STYLES:
        raise ValueError(f"short caption style {style!r}: expected one of {SHORT_CAPTION_STYLES}")
    if style in ("places", "scene"):
        parts = [_article(f"{o['color']} {o['shape']}") + f" {o['position']}" for o in layout["objects"]]
        if not parts:
            objects = "an empty background"
        else:
            objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        if style == "places":
            return objects
        return f"{objects} on {_background_phrase(layout['background'])}"
    groups: dict[tuple[str, str], int] = {}
    for obj in layout["objects"]:
        key = (obj["color"], obj["shape"])
        groups[key] = groups.get(key, 0) + 1
    parts = []
    for (color, shape), k in groups.items():
        parts.append(_article(f"{color} {shape}") if k == 1
                     else f"{_NUMBER_WORDS.get(k, str(k))} {color} {_PLURALS[shape]}")
    if not parts:
        return "an empty background"
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# ---------------------------------------------------------------------------------------------
# Dataset


def generate_example(seed: int, index: int, sizes: Sequence[tuple[int, int]],
                     new_color: str | None = None, short_style: str = "plain",
                     placement: str = "free") -> Example:
    """Example ``index`` of the dataset with ``seed`` (a pure function of its arguments).

    ``new_color``: a held-out colour (``HELD_OUT_COLORS``) given to some objects
    (``with_new_color``) of a ``NEW_COLOR_RECORD_SHARE`` of the layouts; None (the default) draws
    the plain dataset. ``short_style``: of the short caption (``caption_short``); the layout and
    the image do not depend on it. ``placement``: of the objects (``PLACEMENTS``)."""
    rng = np.random.default_rng([seed, index])
    width, height = sizes[int(rng.integers(len(sizes)))]
    layout = sample_layout(rng, width, height, placement)
    if new_color is not None and rng.random() < NEW_COLOR_RECORD_SHARE:
        layout = with_new_color(layout, rng, new_color)
    image = render_layout(layout, width, height)
    metadata = {"generator": SOURCE_TAG, "seed": seed, "index": index, "layout": layout}
    return Example(image_bytes=encode_png(image), caption=caption_dense(layout),
                   short_caption=caption_short(layout, short_style), width=width, height=height,
                   id=f"{SOURCE_TAG}-{seed}-{index:08d}", source=SOURCE_TAG,
                   metadata=json.dumps(metadata, sort_keys=True, separators=(",", ":")))


def _generate_star(args: tuple[int, int, tuple[tuple[int, int], ...], str | None, str, str]
                   ) -> Example:
    return generate_example(*args)


def iter_examples(num: int, seed: int, sizes: Sequence[tuple[int, int]], workers: int = 1,
                  show_progress: bool = False, new_color: str | None = None,
                  short_style: str = "plain", placement: str = "free") -> Iterator[Example]:
    """Examples ``0..num-1`` in order, generated in ``workers`` processes."""
    if short_style not in SHORT_CAPTION_STYLES:
        raise ValueError(f"short caption style {short_style!r}: expected one of {SHORT_CAPTION_STYLES}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: expected one of {PLACEMENTS}")
    sizes = tuple(tuple(s) for s in sizes)
    jobs = [(seed, i, sizes, new_color, short_style, placement) for i in range(num)]
    wrap = (lambda it: it)
    if show_progress:
        from tqdm import tqdm

        def wrap(it):
            return tqdm(it, total=num, desc="synth-shapes", unit="img")

    if workers <= 1 or num < 2:
        yield from wrap(map(_generate_star, jobs))
        return
    import concurrent.futures
    import multiprocessing

    # spawn: forking a process that has JAX (threads) loaded can deadlock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from wrap(pool.map(_generate_star, jobs,
                                 chunksize=max(1, min(64, num // (4 * workers)))))


def write_dataset(out_dir: str | os.PathLike, num: int, seed: int = 0, base_size: int = 512,
                  groups: Sequence[int] = (512, 768, 1024), num_shards: int = 1, workers: int = 1,
                  overwrite: bool = False, show_progress: bool = False,
                  new_color: str | None = None, short_style: str = "plain",
                  placement: str = "free", aspect: str = "all") -> list[str]:
    """Writes ``num`` synthetic examples as lens records in ``out_dir``; returns the shards.

    ``new_color``, ``short_style``, ``placement``: see ``generate_example``; ``aspect``: of the
    image sizes (``bucket_sizes``); each recorded in the manifest when not the default."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    sizes = bucket_sizes(base_size, groups, aspect=aspect)
    settings = {"seed": seed, "num": num, "base_size": base_size, "groups": list(groups),
                "sizes": [list(s) for s in sizes]}
    if new_color is not None:
        settings["new_color"] = new_color
    if short_style != "plain":
        settings["short_style"] = short_style
    if placement != "free":
        settings["placement"] = placement
    if aspect != "all":
        settings["aspect"] = aspect
    return write_shards(iter_examples(num, seed, sizes, workers, show_progress, new_color, short_style,
                                      placement),
                        out_dir,
                        num_shards, overwrite=overwrite,
                        extra_manifest={"source": SOURCE_TAG, "synth_shapes": settings})
