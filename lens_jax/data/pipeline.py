"""The grain input pipeline: records -> decoded, bucketed, tokenized segments -> packed rows ->
global ``jax.Array`` batches. Batch schema and design notes: docs/data.md, section "Pipeline".

Stages (``grain`` dataset API):

1. Index stream (``MapDataset``, random access): ``range(n)`` -> global shuffle (seeded, a new
   permutation every epoch) -> repeat -> ``(global position, example index, epoch)`` -> this
   host's slice ``[process_index::process_count]``.
2. ``_ExampleLoader`` (a ``map_with_index``; runs in grain worker processes through
   ``mp_prefetch``): read the record, choose the caption (dropout / short / dense, deterministic per
   (seed, example index, epoch)), decode the image, bucket it, resize + centre-crop, patchify
   (uint8), tokenize. Bad examples become ``{"skip": reason}`` elements instead of raising.
3. ``_PackIterDataset`` (main process): counts skips, packs segments into ``rows_per_host`` rows
   (``StreamingPacker``) or batches one bucket (``BucketBatcher``), builds the numpy host batch.
4. ``LensDataIterator``: per-host batch -> global arrays with
   ``jax.make_array_from_process_local_data(NamedSharding(mesh, P(data_axes)), batch)``.

Checkpointing: ``LensDataIterator.get_state()/set_state()`` (JSON-serializable; works with
``grain.checkpoint.CheckpointSave/CheckpointRestore`` in orbax). The state holds the worker
iterators' state plus the host positions of the segments waiting in the packer's buffer, which are
re-loaded on restore (the loader is a pure function of the position), so a restored iterator
yields exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image, ImageOps

from lens_jax.data import records, sources
from lens_jax.data.buckets import (Bucket, assign_bucket, draft_size, make_buckets,
                                   patchify_image, resize_and_crop)
from lens_jax.data.packing import (BucketBatcher, PackingConfig, StreamingPacker, build_batch,
                                   check_fits)
from lens_jax.data.tokenize import CaptionTokenizer, load_caption_tokenizer
from lens_jax.errors import RecordError

log = logging.getLogger(__name__)

SKIP_REASONS = ("bad_record", "empty_caption", "corrupt_image", "too_large", "too_small",
                "extreme_aspect", "too_many_image_tokens", "too_many_text_tokens", "caption_too_long",
                "error")


def default_data_config() -> ml_collections.ConfigDict:
    """Every field of the input pipeline, with its default (see docs/data.md "Pipeline")."""
    c = ml_collections.ConfigDict()
    # --- source and order
    c.path = ""                 # records: folder / glob / file list, or "tfds:NAME[:SPLIT][@DIR]"
    c.seed = 0                  # shuffle + caption/bucket choices
    c.shuffle = True            # global shuffle, a different permutation every epoch
    c.num_epochs = 0            # 0 = repeat forever
    c.process_index = -1        # -1: jax.process_index() (override for tests)
    c.process_count = -1        # -1: jax.process_count()
    # --- workers
    c.worker_count = 2          # grain worker processes (0 = decode in the main process)
    c.worker_buffer_size = 2    # prefetched elements per worker
    c.read_threads = 2          # threads per worker reading + decoding ahead
    c.read_buffer_size = 8      # elements each worker's threads prefetch
    c.feed_nice = 19            # lens-train reads batches in a thread this much nicer (Linux; 0 = not)
    # --- filtering
    c.min_side = 64             # skip images whose shorter side is below this (pixels)
    c.max_aspect = 3.0          # skip images with long side / short side above this
    # --- buckets
    c.base_sizes = (512, 768, 1024)   # base sides (spec 2.8: 27 buckets = 3 bases x 9 ratios)
    c.base_probs = (0.6, 0.25, 0.15)  # per-base probability (per-GPU batch 24/10/6 of spec 5)
    c.bucket_scale = 1.0        # multiply bucket sides (tiny demos: 1/8, 1/16); rounded to 16 px
    c.aspect_ratios = ()        # keep only these ratio indices (0..8, buckets.ASPECT_RATIOS; () = all)
    c.max_upscale = 0.0         # drop bases needing more upscaling than this (0 = no limit)
    c.jpeg_draft = True         # let libjpeg decode at 1/2..1/8 scale when that still covers
    c.resample = "lanczos"      # resize filter: "lanczos" (high quality) | "bicubic" (~1.5x faster)
    # --- captions
    c.tokenizer = "bytes"       # "bytes" | "json:PATH" | "prompt:GPT_OSS_FOLDER" (harmony template)
    c.template_date = "2026-01-01"  # fixed date of the harmony template (same preamble always)
    c.caption_dropout = 0.1     # probability of the empty caption (classifier-free guidance)
    c.short_caption_prob = 0.1  # probability of the short caption when one exists
    # --- packing / batching
    c.mode = "pack"             # "pack" (mixed resolutions per row) | "bucket" (one per row)
    c.rows_per_host = 4         # rows of the per-host batch (global batch = rows x hosts)
    c.image_tokens = 8448       # N_img per packed row (>= the largest bucket, 4232)
    c.text_tokens = 1024        # N_txt per packed row
    c.max_segments = 16         # K: segments per row
    c.caption_length = 512      # L: caption_ids width (whole templated sequence, spec 2.1)
    c.lookahead = 64            # segments buffered by the packer
    c.max_wait = 4              # batches before a buffered segment is placed first
    c.pixel_dtype = "float32"   # image_patches: "float32" | "bfloat16" in [-1, 1]; "uint8" raw
    # --- output
    c.data_axes = ("data",)     # mesh axes the batch (row) axis is sharded over
    return c


# ---------------------------------------------------------------------------------------------
# Stage 2: per-example loading (runs in worker processes)


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


class _ExampleLoader:
    """``(host position, (global position, example index, epoch)) -> segment element``.

    A pure function of its input (all randomness from ``(seed, example index, epoch)``), so a
    position can be re-loaded on restore. Never raises for bad data: returns ``{"skip": reason}``.
    """

    def __init__(self, source, cfg: ml_collections.ConfigDict, buckets: Sequence[Bucket],
                 tokenizer: CaptionTokenizer):
        self.source = source
        self.seed = int(cfg.seed)
        self.min_side = int(cfg.min_side)
        self.max_aspect = float(cfg.max_aspect)
        self.base_probs = dict(zip((int(b) for b in cfg.base_sizes),
                                   (float(p) for p in cfg.base_probs)))
        self.max_upscale = float(cfg.max_upscale) if cfg.max_upscale > 0 else None
        self.jpeg_draft = bool(cfg.jpeg_draft)
        filters = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}
        if cfg.resample not in filters:
            raise ValueError(f"config.resample must be one of {sorted(filters)}, "
                             f"got {cfg.resample!r}")
        self.resample = filters[cfg.resample]
        self.caption_dropout = float(cfg.caption_dropout)
        self.short_caption_prob = float(cfg.short_caption_prob)
        self.caption_length = int(cfg.caption_length)
        self.text_tokens = int(cfg.text_tokens)
        self.buckets = list(buckets)
        self.tokenizer = tokenizer
        self.packing = PackingConfig(
            image_tokens=int(cfg.image_tokens), text_tokens=int(cfg.text_tokens),
            max_segments=int(cfg.max_segments), caption_length=int(cfg.caption_length))
        self.check_image_budget = cfg.mode == "pack"

    def choose_caption(self, caption: str, short_caption: str, rng: np.random.Generator) -> str:
        """Dropout -> "" (no denoiser text tokens, see ``_load``), else the short caption with ``short_caption_prob`` (when present),
        else the dense one (the short one when the dense is empty)."""
        u_drop, u_short = rng.random(2)
        if u_drop < self.caption_dropout:
            return ""
        if short_caption.strip() and (u_short < self.short_caption_prob or not caption.strip()):
            return short_caption
        return caption

    def __call__(self, host_position: int, item: tuple[int, int, int]) -> dict[str, Any]:
        position, example_index, epoch = (int(v) for v in item)
        try:
            return self._load(host_position, position, example_index, epoch)
        except Exception as e:  # noqa: BLE001 - bad data must never stop training
            log.warning("example %d: unexpected %s: %s", example_index, type(e).__name__, e)
            return {"skip": "error", "position": host_position, "example_index": example_index}

    def _load(self, host_position: int, position: int, example_index: int, epoch: int
              ) -> dict[str, Any]:
        def skip(reason: str) -> dict[str, Any]:
            return {"skip": reason, "position": host_position, "example_index": example_index}

        try:
            ex = records.decode_example(self.source[example_index])
        except RecordError:
            return skip("bad_record")
        if not ex.caption.strip() and not ex.short_caption.strip():
            return skip("empty_caption")
        rng = np.random.default_rng([self.seed, example_index, epoch])
        caption = self.choose_caption(ex.caption, ex.short_caption, rng)

        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(ex.image_bytes))
                width, height = image.size
                orientation = image.getexif().get(0x0112, 1)
            except (Image.DecompressionBombWarning, Image.DecompressionBombError):
                return skip("too_large")
            except Exception:  # noqa: BLE001 - PIL raises many types on bad files
                return skip("corrupt_image")
            if width * height > records.MAX_IMAGE_PIXELS:  # the limit lens-data build applies
                return skip("too_large")
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            if min(width, height) < self.min_side:
                return skip("too_small")
            if max(width, height) / min(width, height) > self.max_aspect:
                return skip("extreme_aspect")
            bucket = assign_bucket(width, height, self.buckets, base_probs=self.base_probs,
                                   rng=rng, max_upscale=self.max_upscale)
            try:
                if self.jpeg_draft and image.format == "JPEG":
                    dw, dh = draft_size(width, height, bucket)
                    if orientation in (5, 6, 7, 8):
                        dw, dh = dh, dw
                    image.draft("RGB", (dw, dh))
                image.load()
                if orientation != 1:
                    image = ImageOps.exif_transpose(image)
                image = _rgb(image)
            except Exception:  # noqa: BLE001 - truncated / corrupt data
                return skip("corrupt_image")
        patches = patchify_image(resize_and_crop(image, bucket, self.resample))

        ids = np.asarray(self.tokenizer.tokenize(caption), np.int32)[:self.caption_length]
        preamble = int(self.tokenizer.preamble_length)
        # A dropped caption ("") gives the denoiser no text tokens, whatever scaffold the tokenizer's
        # template puts around "": the sampler's unconditional branch is zero features under an
        # all-false mask (spec 2.1 step 6), i.e. no text token any image token can attend to.
        num_text = max(0, min(len(ids) - preamble, self.text_tokens)) if caption else 0
        ids = ids[:preamble + num_text]
        element = {
            "skip": "",
            "position": host_position,
            "example_index": example_index,
            "epoch": epoch,
            "patches": patches,
            "latent_hw": np.asarray(bucket.latent_hw, np.int32),
            "caption_ids": ids,
            "preamble": preamble,
            "num_text": num_text,
        }
        if self.check_image_budget:
            reason = check_fits(element, self.packing)
            if reason:
                return skip(reason)
        return element


# ---------------------------------------------------------------------------------------------
# Stage 3: packing (main process)


class _PackIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, host_ds: grain.MapDataset,
                 cfg: ml_collections.ConfigDict, process_index: int):
        super().__init__(parent)
        self.host_ds = host_ds
        self.cfg = cfg
        self.process_index = process_index

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self.host_ds, self.cfg, self.process_index)


class _PackIterator(grain.DatasetIterator):
    """Counts skips, packs segments into rows and builds numpy host batches."""

    def __init__(self, parent: grain.DatasetIterator, host_ds: grain.MapDataset,
                 cfg: ml_collections.ConfigDict, process_index: int):
        super().__init__(parent)
        self.host_ds = host_ds
        self.cfg = cfg
        self.process_index = process_index
        self.mode = cfg.mode
        self.rows = int(cfg.rows_per_host)
        self.packing = PackingConfig(
            image_tokens=int(cfg.image_tokens), text_tokens=int(cfg.text_tokens),
            max_segments=int(cfg.max_segments), caption_length=int(cfg.caption_length),
            lookahead=int(cfg.lookahead), max_wait=int(cfg.max_wait))
        if self.mode == "pack":
            self.packer: StreamingPacker | BucketBatcher = StreamingPacker(self.packing, self.rows)
        else:
            self.packer = BucketBatcher(self.rows)
        self.pixel_dtype = pixel_dtype(cfg.pixel_dtype)
        self.batches = 0
        self.segments = 0
        self.skips: dict[str, int] = {}
        self.real_tokens = [0, 0]   # image, text (since the start, for metrics)
        self.budget_tokens = [0, 0]

    def _pull(self) -> dict[str, Any] | None:
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                return None
            reason = element.get("skip", "")
            if not reason:
                return element
            self.skips[reason] = self.skips.get(reason, 0) + 1

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self.packer.next_rows(self._pull)
        if rows is None:
            raise StopIteration
        if self.mode == "pack":
            n_img, k = self.packing.image_tokens, self.packing.max_segments
        else:
            h, w = (int(v) for v in next(r for r in rows if r)[0]["latent_hw"])
            n_img, k = h * w, 1
        batch = build_batch(rows, image_tokens=n_img, text_tokens=self.packing.text_tokens,
                            max_segments=k, caption_length=self.packing.caption_length,
                            pixel_dtype=self.pixel_dtype)
        self.batches += 1
        self.segments += int(batch["segment_valid"].sum())
        self.real_tokens[0] += int((batch["image_segment_ids"] > 0).sum())
        self.real_tokens[1] += int((batch["text_segment_ids"] > 0).sum())
        self.budget_tokens[0] += batch["image_segment_ids"].size
        self.budget_tokens[1] += batch["text_segment_ids"].size
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "buffer": self.packer.buffered_positions(),
            "batches": self.batches,
            "segments": self.segments,
            "skips": dict(self.skips),
            "real_tokens": list(self.real_tokens),
            "budget_tokens": list(self.budget_tokens),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        if self.mode == "pack":
            entries = [(int(p), int(a)) for p, a in state["buffer"]]
            elements = [self.host_ds[p] for p, _ in entries]
            self.packer.restore(elements, [a for _, a in entries])
        else:
            self.packer.restore([self.host_ds[int(p)] for p in state["buffer"]])
        self.batches = int(state["batches"])
        self.segments = int(state["segments"])
        self.skips = {str(k): int(v) for k, v in state["skips"].items()}
        self.real_tokens = [int(v) for v in state["real_tokens"]]
        self.budget_tokens = [int(v) for v in state["budget_tokens"]]


def pixel_dtype(name: str):
    """``data.pixel_dtype`` ("float32" | "bfloat16" | "uint8") -> the numpy dtype of image patches."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in ("float32", "uint8"):
        raise ValueError(f"pixel_dtype must be float32, bfloat16 or uint8, got {name!r}")
    return np.dtype(name)


# ---------------------------------------------------------------------------------------------
# Stage 4: global arrays + the public iterator


class LensDataIterator(grain.DatasetIterator):
    """Yields batches (dicts, schema in docs/data.md): global ``jax.Array``s sharded over
    ``data_axes`` of ``mesh`` when one is given, else the per-host numpy batch.

    ``get_state``/``set_state`` (JSON-serializable) make it resumable; it is a
    ``grain.DatasetIterator``, so ``grain.checkpoint.CheckpointSave/CheckpointRestore`` work.
    """

    def __init__(self, parent: _PackIterator, mesh=None, data_axes: Sequence[str] = ("data",),
                 preamble_length: int = 0):
        super().__init__(parent)
        self.mesh = mesh
        self.data_axes = tuple(data_axes)
        # Leading ids of every caption_ids row that the denoiser does not see (97 for GPT-OSS).
        self.preamble_length = int(preamble_length)

    @property
    def pack_iterator(self) -> _PackIterator:
        return self._parent

    def __next__(self) -> dict[str, Any]:
        batch = next(self._parent)
        if self.mesh is None:
            return batch
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        axes = self.data_axes[0] if len(self.data_axes) == 1 else self.data_axes
        sharding = NamedSharding(self.mesh, PartitionSpec(axes))
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def skip_counts(self) -> dict[str, int]:
        """Examples skipped so far on this host, by reason (every reason listed, 0 if none)."""
        counts = {reason: 0 for reason in SKIP_REASONS}
        counts.update(self._parent.skips)
        return counts

    def metrics(self) -> dict[str, float]:
        """Scalars for logging: skips by reason, segments, batches, packing efficiency."""
        p = self._parent
        out: dict[str, float] = {f"data/skipped/{k}": float(v)
                                 for k, v in self.skip_counts().items()}
        out["data/skipped_total"] = float(sum(p.skips.values()))
        out["data/segments"] = float(p.segments)
        out["data/batches"] = float(p.batches)
        img_b, txt_b = p.budget_tokens
        img_r, txt_r = p.real_tokens
        out["data/packing_efficiency/image"] = img_r / img_b if img_b else 0.0
        out["data/packing_efficiency/text"] = txt_r / txt_b if txt_b else 0.0
        out["data/packing_efficiency/total"] = ((img_r + txt_r) / (img_b + txt_b)
                                                if img_b + txt_b else 0.0)
        return out


def _ensure_absl_flags_parsed() -> None:
    # grain 0.2.x reads an absl flag in its worker-prefetch path and raises UnparsedFlagAccessError
    # in programs that do not start through absl.app (google/grain#1355); use the defaults there.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def host_index_dataset(num_examples: int, seed: int, shuffle: bool, num_epochs: int,
                       process_index: int, process_count: int) -> grain.MapDataset:
    """This host's ``(global position, example index, epoch)`` stream (random access)."""
    if num_examples < 1:
        raise ValueError("the record source is empty")
    ds = grain.MapDataset.range(num_examples)
    if shuffle:
        ds = ds.shuffle(seed=seed % 2**32)  # a new permutation for every epoch (index // n)
    ds = ds.repeat(num_epochs if num_epochs > 0 else None)
    n = num_examples
    ds = ds.map_with_index(lambda p, ex: (p, int(ex), p // n))
    return ds[process_index::process_count]


def make_pipeline(config: ml_collections.ConfigDict, mesh=None, *,
                  source=None, tokenizer: CaptionTokenizer | None = None,
                  process_index: int | None = None, process_count: int | None = None
                  ) -> LensDataIterator:
    """Builds the input pipeline and returns its iterator (see ``default_data_config``).

    ``source`` overrides ``config.path`` (any random-access source of raw record bytes);
    ``tokenizer`` overrides ``config.tokenizer``; ``process_index/count`` override the config and
    ``jax.process_index()/process_count()``.
    """
    cfg = config
    if process_index is None:
        process_index = int(cfg.process_index)
    if process_count is None:
        process_count = int(cfg.process_count)
    if process_index < 0 or process_count < 1:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if cfg.mode not in ("pack", "bucket"):
        raise ValueError(f"config.mode must be 'pack' or 'bucket', got {cfg.mode!r}")
    if cfg.mode == "bucket" and process_count > 1:
        raise ValueError("mode='bucket' needs one global shape per step, which hosts cannot agree "
                         "on without communication; use mode='pack' with several hosts")
    if len(cfg.base_probs) != len(cfg.base_sizes):
        raise ValueError(f"base_probs {tuple(cfg.base_probs)} must match base_sizes "
                         f"{tuple(cfg.base_sizes)}")
    if source is None:
        if not cfg.path:
            raise ValueError("config.path is empty: give a records folder/glob or a tfds: spec")
        source = sources.open_source(cfg.path)
    if tokenizer is None:
        tokenizer = load_caption_tokenizer(cfg.tokenizer, cfg.template_date, cfg.caption_length)
    buckets = make_buckets(tuple(cfg.base_sizes), float(cfg.bucket_scale))
    if tuple(cfg.aspect_ratios):
        keep = {int(i) for i in cfg.aspect_ratios}
        if not keep <= set(range(9)):
            raise ValueError(f"data.aspect_ratios {tuple(cfg.aspect_ratios)}: indices must be in 0..8")
        buckets = [b for b in buckets if b.ratio_index in keep]
    if cfg.mode == "pack":
        largest = max(b.num_tokens for b in buckets)
        if largest > cfg.image_tokens:
            log.warning("image_tokens %d < largest bucket (%d tokens): those images are skipped",
                        cfg.image_tokens, largest)

    index_ds = host_index_dataset(len(source), int(cfg.seed), bool(cfg.shuffle),
                                  int(cfg.num_epochs), process_index, process_count)
    host_ds = index_ds.map_with_index(_ExampleLoader(source, cfg, buckets, tokenizer))
    ds = host_ds.to_iter_dataset(grain.ReadOptions(num_threads=max(int(cfg.read_threads), 0),
                                                   prefetch_buffer_size=int(cfg.read_buffer_size)))
    if cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(cfg.worker_count),
            per_worker_buffer_size=int(cfg.worker_buffer_size)))
    packed = _PackIterDataset(ds, host_ds, cfg, process_index)
    return LensDataIterator(packed.__iter__(), mesh, tuple(cfg.data_axes),
                            int(tokenizer.preamble_length))


def batch_images(batch: dict[str, Any]) -> list[list[np.ndarray]]:
    """Per row, the ``[H, W, 3]`` float images of a (host) batch: the trainer-side reassembly."""
    from lens_jax.data.packing import extract_images

    host = {k: np.asarray(v) for k, v in batch.items()}
    return [extract_images(host, r) for r in range(host["segment_valid"].shape[0])]


__all__ = ["default_data_config", "make_pipeline", "LensDataIterator",
           "host_index_dataset", "batch_images", "SKIP_REASONS"]
