"""From a folder of images with captions to lens records (used by ``lens-data build`` and TFDS).

Captions come from a JSONL or CSV file (``path, caption[, short_caption]``; paths relative to the
image folder or absolute) or, without such a file, from text files next to each image:
``photo.jpg`` + ``photo.txt`` (or ``photo.jpg.txt``), and optionally ``photo.short.txt``.
Images are stored byte for byte (no re-encode); PIL decodes each one fully to reject corrupt
files and to read its width and height. Bad inputs are skipped and counted by reason, never
fatal: captions that are not UTF-8 (the caption file is named), CSV rows that do not parse on
their own line (e.g. an unterminated quote; a field may not span lines), images larger than
``records.MAX_IMAGE_PIXELS`` (the limit the training pipeline applies too).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lens_jax.data.records import MAX_IMAGE_PIXELS, Example, image_format
from lens_jax.errors import RecordError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Other image files found in the folder are reported as skipped (unsupported format).
OTHER_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".jxl")
SUPPORTED_FORMATS = ("jpeg", "png", "webp")

# Skip reasons (keys of the build report).
MISSING_IMAGE = "image file missing"
UNREADABLE = "unreadable or corrupt image"
UNSUPPORTED = "unsupported image format"
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
DUPLICATE = "duplicate entry"
DUPLICATE_IMAGE = "duplicate image"  # --dedup: same bytes as an earlier image
UNDECODABLE_CAPTION = "caption not UTF-8"
MALFORMED_ROW = "malformed captions row"
TOO_LARGE = "image too large"

_PATH_KEYS = ("path", "image", "file_name", "filename", "file")
_CAPTION_KEYS = ("caption", "text", "dense_caption")
_SHORT_KEYS = ("short_caption", "short")


@dataclasses.dataclass
class Item:
    """One image to convert: where it is (a file ``path``, or its encoded bytes ``data`` for
    inputs read whole: tar shards, parquet), its id, and its captions (``None``: not found)."""

    path: str
    id: str
    caption: str | None
    short_caption: str = ""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: bytes = b""


@dataclasses.dataclass
class Skip:
    id: str
    reason: str
    detail: str = ""


@dataclasses.dataclass
class BuildReport:
    """What a build wrote and skipped (``skipped`` maps a reason to the skipped ids/details)."""

    written: int = 0
    skipped: dict[str, list[Skip]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))
    # Skips counted but not kept in ``skipped`` (the Beam build keeps the first few per reason).
    unlisted: dict[str, int] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(int))

    def add_skip(self, skip: Skip) -> None:
        self.skipped[skip.reason].append(skip)

    def counts(self) -> dict[str, int]:
        """Skips per reason, sorted by reason."""
        return {reason: len(self.skipped.get(reason, ())) + self.unlisted.get(reason, 0)
                for reason in sorted({*self.skipped, *self.unlisted})}

    @property
    def num_skipped(self) -> int:
        return sum(self.counts().values())

    def summary(self) -> dict[str, Any]:
        return {"written": self.written, "skipped": self.counts()}

    def format(self, max_listed: int = 5) -> str:
        lines = [f"written: {self.written}", f"skipped: {self.num_skipped}"]
        for reason, count in self.counts().items():
            lines.append(f"  {reason}: {count}")
            for skip in self.skipped.get(reason, [])[:max_listed]:
                lines.append(f"    {skip.id}" + (f" ({skip.detail})" if skip.detail else ""))
            if count > max_listed:
                lines.append(f"    ... and {count - max_listed} more")
        return "\n".join(lines)


class _Undecodable(Exception):
    """A caption file that is not UTF-8 (``args``: the file, the decoder's message)."""


def _read_text(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise _Undecodable(str(path), str(e)) from None


def _has_undecodable(text: str) -> bool:
    """Whether ``text`` (read with ``errors="surrogateescape"``) held bytes that are not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _scan_images(images_dir: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(images_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(suffixes):
                found.append(Path(root) / name)
    return found


def _rel_id(path: Path, images_dir: Path) -> str:
    try:
        return path.resolve().relative_to(images_dir.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    return None


def iter_jsonl_objects(path: str | os.PathLike, error: type[Exception] = ValueError,
                       on_bad_line: Callable[[int, str], None] | None = None
                       ) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_no, object)`` for every non-blank line of a JSONL file; ``error`` naming the file
    and line for a line that is not UTF-8 or not a JSON object, or, with ``on_bad_line``, that
    line passed to ``on_bad_line(line_no, why)`` and skipped."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if _has_undecodable(line):
                if on_bad_line is None:
                    raise error(f"{path}:{line_no}: not UTF-8 text")
                on_bad_line(line_no, "not UTF-8 text")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{line_no}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise error(f"{path}:{line_no}: expected a JSON object")
            yield line_no, row


def _read_caption_rows(captions_file: Path) -> tuple[list[dict[str, Any]], list[Skip]]:
    """The rows of a captions file, and the rows skipped (not UTF-8, or a CSV line that does not
    parse on its own), each named ``FILE:LINE``."""
    if not captions_file.is_file():
        raise RecordError(f"{captions_file}: captions file not found")
    rows: list[dict[str, Any]] = []
    bad: list[Skip] = []
    suffix = captions_file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        def skip_line(line_no: int, why: str) -> None:
            reason = UNDECODABLE_CAPTION if why == "not UTF-8 text" else MALFORMED_ROW
            bad.append(Skip(f"{captions_file}:{line_no}", reason, why))

        for line_no, row in iter_jsonl_objects(captions_file, RecordError, on_bad_line=skip_line):
            row["_line"] = line_no
            rows.append(row)
    elif suffix in (".csv", ".tsv"):
        table = _read_csv_lines(captions_file, "\t" if suffix == ".tsv" else ",", bad)
        if not table:
            return rows, bad
        header = [h.strip().lower() for _, h_cells in table[:1] for h in h_cells]
        has_header = (any(h in _PATH_KEYS for h in header)
                      and any(h in _CAPTION_KEYS for h in header))
        if not has_header:
            header = ["path", "caption", "short_caption"][:max(len(r) for _, r in table)]
        for line_no, cells in (table[1:] if has_header else table):
            if len(cells) > len(header):
                bad.append(Skip(f"{captions_file}:{line_no}", MALFORMED_ROW,
                                f"{len(cells)} fields, the header has {len(header)}"))
                continue
            row: dict[str, Any] = dict(zip(header, cells))
            row["_line"] = line_no
            rows.append(row)
    else:
        raise RecordError(f"{captions_file}: captions file must be .jsonl, .json (JSON lines), "
                          ".csv or .tsv")
    for row in rows:
        if _pick(row, _PATH_KEYS) is None:
            raise RecordError(f"{captions_file}:{row['_line']}: no image path column "
                              f"(one of {_PATH_KEYS})")
    return rows, bad


def _read_csv_lines(path: Path, delimiter: str, bad: list[Skip]) -> list[tuple[int, list[str]]]:
    """``(line_no, cells)`` of every non-blank line, each parsed on its own (strict quoting), so
    an unterminated quote spoils one row instead of merging the next rows into a caption."""
    table = []
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if _has_undecodable(line):
                bad.append(Skip(f"{path}:{line_no}", UNDECODABLE_CAPTION, "not UTF-8 text"))
                continue
            try:
                cells = next(csv.reader([line], delimiter=delimiter, strict=True))
            except csv.Error as e:
                bad.append(Skip(f"{path}:{line_no}", MALFORMED_ROW, str(e)))
                continue
            if any(c.strip() for c in cells):
                table.append((line_no, cells))
    return table


def collect_items(images_dir: str | os.PathLike, captions_file: str | os.PathLike | None = None,
                  ) -> tuple[list[Item], list[Skip]]:
    """The images to convert and the entries skipped before reading any image.

    With ``captions_file`` every row names an image; images of the folder without a row are
    skipped as ``missing caption``. Without it, every image of the folder (recursively) is an item
    whose captions come from ``.txt`` files beside it.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise RecordError(f"{images_dir}: image folder not found")
    items: list[Item] = []
    skips: list[Skip] = []
    if captions_file is not None:
        seen: set[str] = set()
        rows, skips = _read_caption_rows(Path(captions_file))
        for row in rows:
            raw_path = str(_pick(row, _PATH_KEYS))
            path = Path(raw_path) if os.path.isabs(raw_path) else images_dir / raw_path
            item_id = _rel_id(path, images_dir)
            if item_id in seen:
                skips.append(Skip(item_id, DUPLICATE, f"line {row['_line']}"))
                continue
            seen.add(item_id)
            if not path.is_file():
                skips.append(Skip(item_id, MISSING_IMAGE, f"line {row['_line']}"))
                continue
            caption = _pick(row, _CAPTION_KEYS)
            short = _pick(row, _SHORT_KEYS)
            metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
            items.append(Item(str(path), item_id, None if caption is None else str(caption).strip(),
                              "" if short is None else str(short).strip(), metadata))
        for path in _scan_images(images_dir):
            item_id = _rel_id(path, images_dir)
            if item_id not in seen:
                skips.append(Skip(item_id, MISSING_CAPTION, "not in the captions file"))
    else:
        for path in _scan_images(images_dir):
            try:
                caption = _read_text(path.with_suffix(".txt"))
                if caption is None:
                    caption = _read_text(path.with_name(path.name + ".txt"))
                short = _read_text(path.with_suffix(".short.txt")) or ""
            except _Undecodable as e:
                skips.append(Skip(_rel_id(path, images_dir), UNDECODABLE_CAPTION,
                                  f"{e.args[0]}: {e.args[1]}"))
                continue
            items.append(Item(str(path), _rel_id(path, images_dir), caption, short))
    for path in _scan_images(images_dir, OTHER_IMAGE_SUFFIXES):
        skips.append(Skip(_rel_id(path, images_dir), UNSUPPORTED,
                          f"{path.suffix}; supported: {', '.join(IMAGE_SUFFIXES)}"))
    return items, skips


def caption_skip(item_id: str, caption: str | None) -> Skip | None:
    """Why an item with this caption is skipped before its image is read (``None``: it is not)."""
    if caption is None:
        return Skip(item_id, MISSING_CAPTION, "no caption text found for this image")
    if not caption.strip():
        return Skip(item_id, EMPTY_CAPTION)
    return None


def load_item(item: Item, source: str = "") -> Example | Skip:
    """Reads one item into an ``Example`` (original bytes), or says why it is skipped."""
    skip = caption_skip(item.id, item.caption)
    if skip is not None:
        return skip
    try:
        data = Path(item.path).read_bytes()
    except OSError as e:
        return Skip(item.id, MISSING_IMAGE, str(e))
    return load_bytes(dataclasses.replace(item, path="", data=data), source)


def load_bytes(item: Item, source: str = "") -> Example | Skip:
    """An ``Example`` of ``item.data`` (the encoded image, stored as it is) or why it is skipped:
    every input (folder, WebDataset, parquet, Hugging Face) makes its records here."""
    from PIL import Image

    skip = caption_skip(item.id, item.caption)
    if skip is not None:
        return skip
    data = item.data
    fmt = image_format(data)
    if fmt not in SUPPORTED_FORMATS:
        if fmt == "unknown":
            return Skip(item.id, UNREADABLE, "not an image file (unknown magic bytes)")
        return Skip(item.id, UNSUPPORTED, f"{fmt}; supported: {', '.join(SUPPORTED_FORMATS)}")
    too_large = Skip(item.id, TOO_LARGE, f"more than {MAX_IMAGE_PIXELS:,} pixels (the training "
                                         "pipeline's limit)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    return dataclasses.replace(too_large, detail=f"{width}x{height}: "
                                               + too_large.detail)
                orientation = img.getexif().get(0x0112, 1)
                img.load()  # full decode: catches truncated / corrupt data
    except Image.DecompressionBombError:
        return too_large
    except Exception as e:  # PIL raises many exception types on bad data
        return Skip(item.id, UNREADABLE, f"{type(e).__name__}: {e}")
    metadata = {"format": fmt, **item.metadata}
    if orientation not in (1, None):
        metadata["exif_orientation"] = int(orientation)
    return Example(image_bytes=data, caption=item.caption, short_caption=item.short_caption,
                   width=int(width), height=int(height), id=item.id, source=source,
                   metadata=json.dumps(metadata, sort_keys=True))


def load_any(item: Item, source: str = "") -> Example | Skip:
    """``load_bytes`` for an item read whole, ``load_item`` for one on disk."""
    return load_bytes(item, source) if item.data else load_item(item, source)


def load_items(items: Iterable[Item | Skip], source: str = "", workers: int = 1,
               progress: Callable[[Iterable], Iterable] | None = None) -> Iterator[Example | Skip]:
    """``load_any`` over ``items`` in order (a ``Skip`` among them passes through), in ``workers``
    processes (1: in this process), at most ``8 * workers`` items in flight (a stream of tar or
    parquet images is never held whole)."""
    wrap = progress or (lambda it: it)
    if workers <= 1 or (isinstance(items, list) and len(items) < 2):
        yield from wrap(it if isinstance(it, Skip) else load_any(it, source) for it in items)
        return
    # spawn: forking a process that has JAX (threads) loaded can deadlock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        def results() -> Iterator[Example | Skip]:
            pending: collections.deque = collections.deque()
            for it in items:
                pending.append(it if isinstance(it, Skip) else pool.submit(load_any, it, source))
                if len(pending) >= 8 * workers:
                    head = pending.popleft()
                    yield head if isinstance(head, Skip) else head.result()
            for head in pending:
                yield head if isinstance(head, Skip) else head.result()

        yield from wrap(results())


def examples_with_report(results: Iterable[Example | Skip], report: BuildReport,
                         dedup: bool = False) -> Iterator[Example]:
    """Yields the examples of ``results`` and records skips and the count in ``report``; with
    ``dedup`` an image whose bytes (sha256) equal an earlier one's is skipped as
    ``duplicate image``."""
    first_id: dict[bytes, str] = {}
    for result in results:
        if isinstance(result, Skip):
            report.add_skip(result)
            continue
        if dedup:
            digest = hashlib.sha256(result.image_bytes).digest()
            if digest in first_id:
                report.add_skip(Skip(result.id, DUPLICATE_IMAGE,
                                     f"same bytes as {first_id[digest]}"))
                continue
            first_id[digest] = result.id
        report.written += 1
        yield result


def write_items(items: Iterable[Item | Skip], out_dir: str | os.PathLike, what: str,
                total: int | None = None, num_shards: int = 1, workers: int = 1,
                source: str = "", overwrite: bool = False, show_progress: bool = False,
                dedup: bool = False) -> BuildReport:
    """Loads ``items`` (``load_items``) into sharded lens records in ``out_dir``; returns the
    report. ``what`` names the input in errors; ``total`` sizes the progress bar. Nothing is
    written when no image is usable (``RecordError``)."""
    from lens_jax.data.records import write_shards

    report = BuildReport()
    progress = None
    if show_progress:
        from tqdm import tqdm

        def progress(it):
            return tqdm(it, total=total, desc="build", unit="img")

    results = load_items(items, source=source, workers=workers, progress=progress)
    examples = examples_with_report(results, report, dedup=dedup)

    class _NoExamples(Exception):
        pass

    def checked() -> Iterator[Example]:
        yield from examples
        if report.written == 0:
            raise _NoExamples

    try:
        write_shards(checked(), out_dir, num_shards, overwrite=overwrite,
                     extra_manifest=lambda: {"source": source, "build": report.summary()})
    except _NoExamples:
        raise nothing_written(what, report) from None
    return report


def nothing_written(what: str, report: BuildReport) -> RecordError:
    """The error of a build whose every image was skipped."""
    return RecordError(f"{what}: every image was skipped, nothing written\n{report.format()}")


def folder_items(images_dir: str | os.PathLike, captions_file: str | os.PathLike | None = None,
                 ) -> list[Item | Skip]:
    """What a folder build loads, in order: the entries skipped before reading any image, then
    the items (``collect_items``); ``RecordError`` with the report when there is no item."""
    items, early_skips = collect_items(images_dir, captions_file)
    if not items:
        report = BuildReport()
        for skip in early_skips:
            report.add_skip(skip)
        raise RecordError(f"{images_dir}: no image to convert\n{report.format()}")
    return [*early_skips, *items]


def build_records(images_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  captions_file: str | os.PathLike | None = None, num_shards: int = 1,
                  workers: int = 1, source: str = "", overwrite: bool = False,
                  show_progress: bool = False, dedup: bool = False) -> BuildReport:
    """Converts an image folder with captions to sharded lens records; returns the report.

    Nothing is written when no image is usable (``RecordError``).
    """
    items = folder_items(images_dir, captions_file)
    return write_items(items, out_dir, what=str(images_dir), total=len(items),
                       num_shards=num_shards,
                       workers=workers, source=source, overwrite=overwrite,
                       show_progress=show_progress, dedup=dedup)
