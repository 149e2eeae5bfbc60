"""Mixed-resolution packing of (image, caption) segments into fixed-size denoiser rows.

A packed row holds up to ``K`` segments in two fixed-length token sequences: ``N_img`` image tokens
and ``N_txt`` text tokens (the two streams of the dual-stream MMDiT). A segment is one image of
``h x w`` latent tokens (``h*w`` image tokens, each a 16x16x3 pixel patch) and its caption's
denoiser text tokens (the templated ids after the preamble). Budgets are separate per stream
because the model consumes two separately shaped sequences; a row is valid when both fit.

Per token: a segment id (1..K; 0 = padding) and a 3-axis RoPE position from
``lens_jax.models.positions`` (image tokens: ``image_positions(h, w)``; text tokens:
``text_positions(h, w, n)``, i.e. positions restart for every segment). Per segment: latent
``(h, w)``, image token offset, text offset/length, caption ids + mask, validity.

Two modes:
- packing: streaming best-fit-decreasing over a lookahead buffer (``StreamingPacker``);
- bucket: one image per row, all rows of a batch from the same bucket (``BucketBatcher``), so
  ``N_img`` is the bucket's token count (one compiled shape per bucket).

Segment elements are dicts (they travel through grain worker processes) with keys:
``patches [h*w, 768]`` (uint8 or float in [-1, 1]), ``latent_hw (h, w)``, ``caption_ids [L_c]``
int32 (full encoder ids, preamble included), ``preamble`` (int), ``num_text`` (denoiser text
tokens of this caption, ``<= L_c - preamble``), ``example_index`` and ``position`` (stream
position, the deterministic tie-breaker).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lens_jax.data.buckets import to_unit_range
from lens_jax.models.positions import image_positions, text_positions

Element = dict[str, Any]

PATCH_DIM = 16 * 16 * 3


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """Row geometry and packer knobs (see ``default_data_config`` for the defaults' rationale)."""

    image_tokens: int = 8448      # N_img per row
    text_tokens: int = 1024       # N_txt per row
    max_segments: int = 16        # K per row
    caption_length: int = 512     # L: width of caption_ids (whole templated sequence)
    lookahead: int = 64           # buffered segments the packer chooses from
    max_wait: int = 4             # batches a segment may wait before it is placed first
    patch_dim: int = PATCH_DIM

    def __post_init__(self):
        for name in ("image_tokens", "text_tokens", "max_segments", "caption_length",
                     "lookahead", "patch_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"PackingConfig.{name} must be >= 1, got {getattr(self, name)}")


def segment_size(element: Element) -> tuple[int, int]:
    """``(image tokens, text tokens)`` of a segment element."""
    h, w = element["latent_hw"]
    return int(h) * int(w), int(element["num_text"])


class _Row:
    __slots__ = ("img_left", "txt_left", "items")

    def __init__(self, cfg: PackingConfig):
        self.img_left = cfg.image_tokens
        self.txt_left = cfg.text_tokens
        self.items: list[Element] = []


def _best_row(rows: Sequence[_Row], n_img: int, n_txt: int, max_segments: int) -> int:
    """Index of the row where the segment fits leaving the least image room (-1: none)."""
    best, best_key = -1, None
    for i, row in enumerate(rows):
        if len(row.items) >= max_segments or n_img > row.img_left or n_txt > row.txt_left:
            continue
        key = (row.img_left - n_img, row.txt_left - n_txt, i)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def plan_rows(sizes: Sequence[tuple[int, int]], num_rows: int, cfg: PackingConfig
              ) -> tuple[list[list[int]], list[int]]:
    """Static best-fit-decreasing: assigns segments (``(n_img, n_txt)``) to ``num_rows`` rows.

    Returns ``(rows, leftover)``: per row the segment indices placed (in placement order), and
    the indices that did not fit.
    """
    rows = [_Row(cfg) for _ in range(num_rows)]
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], -sizes[i][1], i))
    placed: list[list[int]] = [[] for _ in range(num_rows)]
    leftover = []
    for i in order:
        n_img, n_txt = sizes[i]
        r = _best_row(rows, n_img, n_txt, cfg.max_segments)
        if r < 0:
            leftover.append(i)
            continue
        rows[r].img_left -= n_img
        rows[r].txt_left -= n_txt
        rows[r].items.append({})
        placed[r].append(i)
    return placed, sorted(leftover)


def check_fits(element: Element, cfg: PackingConfig) -> str:
    """'' when a segment fits an empty row, else the reason (``too_many_image_tokens``...)."""
    n_img, n_txt = segment_size(element)
    if n_img > cfg.image_tokens:
        return "too_many_image_tokens"
    if n_txt > cfg.text_tokens:
        return "too_many_text_tokens"
    if len(element["caption_ids"]) > cfg.caption_length:
        return "caption_too_long"
    return ""


class StreamingPacker:
    """Streaming best-fit-decreasing with a lookahead buffer.

    ``next_rows(pull)`` fills ``num_rows`` empty rows: it tops the buffer up to ``lookahead``
    segments from ``pull()`` (``None`` = stream exhausted), places buffered segments largest
    first (segments that waited ``max_wait`` batches go first) into the row with the tightest
    fit, refills the freed buffer slots and repeats until a pass places nothing. Unplaced
    segments stay buffered for the next batch. Deterministic given the stream.
    """

    def __init__(self, cfg: PackingConfig, num_rows: int):
        self.cfg = cfg
        self.num_rows = int(num_rows)
        self.buffer: list[Element] = []
        self.ages: list[int] = []

    def next_rows(self, pull: Callable[[], Element | None]) -> list[list[Element]] | None:
        """Rows of segments for one batch, or ``None`` when stream and buffer are empty."""
        cfg = self.cfg
        rows = [_Row(cfg) for _ in range(self.num_rows)]
        exhausted = False
        while True:
            while len(self.buffer) < cfg.lookahead and not exhausted:
                element = pull()
                if element is None:
                    exhausted = True
                else:
                    self.buffer.append(element)
                    self.ages.append(0)
            sizes = [segment_size(e) for e in self.buffer]
            # Overdue segments first (oldest first), then largest first.
            order = sorted(range(len(self.buffer)), key=lambda i: (
                (0, -self.ages[i], 0, 0) if self.ages[i] >= cfg.max_wait
                else (1, -sizes[i][0], -sizes[i][1], 0), self.buffer[i]["position"]))
            placed = set()
            for i in order:
                n_img, n_txt = sizes[i]
                r = _best_row(rows, n_img, n_txt, cfg.max_segments)
                if r < 0:
                    continue
                rows[r].img_left -= n_img
                rows[r].txt_left -= n_txt
                rows[r].items.append(self.buffer[i])
                placed.add(i)
            if placed:
                self.buffer = [e for i, e in enumerate(self.buffer) if i not in placed]
                self.ages = [a for i, a in enumerate(self.ages) if i not in placed]
            if not placed or not self.buffer and exhausted:
                break
        self.ages = [a + 1 for a in self.ages]
        if not any(row.items for row in rows):
            return None
        return [row.items for row in rows]

    def buffered_positions(self) -> list[list[int]]:
        """``[[position, age], ...]`` of the buffered segments (for checkpoints)."""
        return [[int(e["position"]), int(a)] for e, a in zip(self.buffer, self.ages)]

    def restore(self, elements: Sequence[Element], ages: Sequence[int]) -> None:
        self.buffer = list(elements)
        self.ages = [int(a) for a in ages]


class BucketBatcher:
    """One image per row; a batch is emitted as soon as one bucket has ``num_rows`` images.

    ``next_rows(pull)`` returns ``num_rows`` single-segment rows of one bucket (the last batch of a
    finite stream may hold fewer real rows; the rest are empty), or ``None`` at the end.
    """

    def __init__(self, num_rows: int):
        self.num_rows = int(num_rows)
        self.queues: dict[tuple[int, int], list[Element]] = {}

    def next_rows(self, pull: Callable[[], Element | None]) -> list[list[Element]] | None:
        while True:
            element = pull()
            if element is None:
                break
            key = tuple(int(v) for v in element["latent_hw"])
            queue = self.queues.setdefault(key, [])
            queue.append(element)
            if len(queue) == self.num_rows:
                del self.queues[key]
                return [[e] for e in queue]
        # End of a finite stream: flush the oldest partial queue.
        if not self.queues:
            return None
        key = min(self.queues, key=lambda k: self.queues[k][0]["position"])
        queue = self.queues.pop(key)
        return [[e] for e in queue] + [[] for _ in range(self.num_rows - len(queue))]

    def buffered_positions(self) -> list[int]:
        return sorted(int(e["position"]) for q in self.queues.values() for e in q)

    def restore(self, elements: Sequence[Element]) -> None:
        self.queues = {}
        for element in sorted(elements, key=lambda e: e["position"]):
            key = tuple(int(v) for v in element["latent_hw"])
            self.queues.setdefault(key, []).append(element)


@functools.lru_cache(maxsize=256)
def _image_pos(h: int, w: int) -> np.ndarray:
    pos = image_positions(h, w)
    pos.setflags(write=False)
    return pos


@functools.lru_cache(maxsize=256)
def _text_pos(h: int, w: int, n: int) -> np.ndarray:
    pos = text_positions(h, w, n)
    pos.setflags(write=False)
    return pos


def build_batch(rows: Sequence[Sequence[Element]], *, image_tokens: int, text_tokens: int,
                max_segments: int, caption_length: int, patch_dim: int = PATCH_DIM,
                pixel_dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Host batch (numpy, leading axis = rows) of packed rows; schema in docs/data.md "Pipeline".

    uint8 patches are mapped to ``[-1, 1]`` (``x / 127.5 - 1``) in ``pixel_dtype``; float patches
    are taken as already in ``[-1, 1]``. With ``pixel_dtype=uint8`` the raw 0..255 values are
    kept (the consumer maps them to ``[-1, 1]``).
    """
    b, n_img, n_txt, k, length = len(rows), image_tokens, text_tokens, max_segments, caption_length
    out = {
        "image_patches": np.zeros((b, n_img, patch_dim), pixel_dtype),
        "image_segment_ids": np.zeros((b, n_img), np.int32),
        "image_positions": np.zeros((b, n_img, 3), np.int32),
        "text_segment_ids": np.zeros((b, n_txt), np.int32),
        "text_positions": np.zeros((b, n_txt, 3), np.int32),
        "text_index": np.zeros((b, n_txt, 2), np.int32),
        "caption_ids": np.zeros((b, k, length), np.int32),
        "caption_mask": np.zeros((b, k, length), bool),
        "segment_valid": np.zeros((b, k), bool),
        "latent_hw": np.zeros((b, k, 2), np.int32),
        "token_offset": np.zeros((b, k), np.int32),
        "num_image_tokens": np.zeros((b, k), np.int32),
        "text_offset": np.zeros((b, k), np.int32),
        "text_length": np.zeros((b, k), np.int32),
        "caption_length": np.zeros((b, k), np.int32),
        "example_index": np.full((b, k), -1, np.int32),
    }
    for r, segments in enumerate(rows):
        if len(segments) > k:
            raise ValueError(f"row {r} holds {len(segments)} segments > max_segments {k}")
        img_off = txt_off = 0
        for s, seg in enumerate(segments):
            h, w = (int(v) for v in seg["latent_hw"])
            n = h * w
            patches = seg["patches"]
            if patches.shape != (n, patch_dim):
                raise ValueError(f"segment {seg.get('example_index')}: patches {patches.shape} "
                                 f"!= ({n}, {patch_dim}) for latent grid {h}x{w}")
            ids = np.asarray(seg["caption_ids"], np.int32)
            n_t = int(seg["num_text"])
            pre = int(seg["preamble"])
            if img_off + n > n_img or txt_off + n_t > n_txt:
                raise ValueError(f"row {r} overflows: image {img_off + n}/{n_img}, "
                                 f"text {txt_off + n_t}/{n_txt}")
            if len(ids) > length or pre + n_t > len(ids):
                raise ValueError(f"segment {seg.get('example_index')}: {len(ids)} caption ids, "
                                 f"preamble {pre}, {n_t} text tokens do not fit caption_length "
                                 f"{length}")
            sl = slice(img_off, img_off + n)
            if patches.dtype == np.uint8 and out["image_patches"].dtype != np.uint8:
                out["image_patches"][r, sl] = to_unit_range(patches)
            else:
                out["image_patches"][r, sl] = patches
            out["image_segment_ids"][r, sl] = s + 1
            out["image_positions"][r, sl] = _image_pos(h, w)
            tl = slice(txt_off, txt_off + n_t)
            out["text_segment_ids"][r, tl] = s + 1
            out["text_positions"][r, tl] = _text_pos(h, w, n_t)
            out["text_index"][r, tl, 0] = s
            out["text_index"][r, tl, 1] = np.arange(n_t, dtype=np.int32)
            out["caption_ids"][r, s, :len(ids)] = ids
            out["caption_mask"][r, s, :len(ids)] = True
            out["segment_valid"][r, s] = True
            out["latent_hw"][r, s] = (h, w)
            out["token_offset"][r, s] = img_off
            out["num_image_tokens"][r, s] = n
            out["text_offset"][r, s] = txt_off
            out["text_length"][r, s] = n_t
            out["caption_length"][r, s] = len(ids)
            out["example_index"][r, s] = int(seg.get("example_index", -1))
            img_off += n
            txt_off += n_t
    return out


def packing_efficiency(batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Real tokens / budget of a batch: ``image``, ``text`` and ``total`` (both streams)."""
    img = np.asarray(batch["image_segment_ids"])
    txt = np.asarray(batch["text_segment_ids"])
    img_real, txt_real = int((img > 0).sum()), int((txt > 0).sum())
    return {
        "image": img_real / max(img.size, 1),
        "text": txt_real / max(txt.size, 1),
        "total": (img_real + txt_real) / max(img.size + txt.size, 1),
    }


def extract_images(batch: dict[str, np.ndarray], row: int) -> list[np.ndarray]:
    """The ``[H, W, 3]`` images (in ``[-1, 1]``) of one packed row, in segment order."""
    from lens_jax.data.buckets import unpatchify_image

    images = []
    for s in np.nonzero(np.asarray(batch["segment_valid"][row]))[0]:
        h, w = (int(v) for v in batch["latent_hw"][row, s])
        off = int(batch["token_offset"][row, s])
        images.append(unpatchify_image(np.asarray(batch["image_patches"][row, off:off + h * w]),
                                       h, w))
    return images
