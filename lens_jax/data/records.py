"""The lens record format: the one module that reads and writes training records.

A dataset is a folder of ArrayRecord shards (``data.array_record-00000-of-00004``, ...). Every
record is one serialized ``tf.train.Example`` protocol buffer (the message class of
``lens_jax.data.example_proto``, built from the schema with protobuf alone: no TensorFlow) with these features (schema version 1):

==================  ==========  ===========================================================
key                 kind        meaning
==================  ==========  ===========================================================
``schema_version``  int64       version of this schema (``SCHEMA_VERSION``)
``image``           bytes       the image file exactly as stored (JPEG, PNG or WebP bytes)
``caption``         bytes       dense caption, UTF-8
``short_caption``   bytes       optional short caption, UTF-8 (empty when absent)
``width``           int64       width of the stored image in pixels
``height``          int64       height of the stored image in pixels
``id``              bytes       stable id, UTF-8 (e.g. the image path relative to the root)
``source``          bytes       source tag, UTF-8 (e.g. ``synth-shapes``, ``my-photos``)
``metadata``        bytes       free-form JSON object, UTF-8 (synth-shapes: ground-truth layout)
==================  ==========  ===========================================================

This is the encoding TFDS itself uses for a ``FeaturesDict`` of ``Scalar(int64)``, ``Text()``
and bytes ``Tensor`` features, so records written by TFDS for the ``lens_records`` builder
(``lens_jax.data.tfds_builder``) decode with ``decode_example`` too.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from lens_jax import output_guard, storage
# tf.train.Example built from its schema with protobuf alone (no TensorFlow, and no
# tensorflow-datasets import in the grain workers: example_proto says why)
from lens_jax.data import example_proto
from lens_jax.errors import RecordError

log = logging.getLogger(__name__)

SCHEMA_VERSION: int = 1

# Writer options: one record per chunk group, the layout that makes random access cheap
# (the same option TFDS and grain use).
WRITER_OPTIONS = "group_size:1"
SHARD_MARKER = ".array_record"
MANIFEST_NAME = "lens_records.json"

# The largest image (width x height) accepted, by lens-data build and by the training pipeline
# alike: PIL's default decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 1024^3 / 4 / 3).
MAX_IMAGE_PIXELS = 89_478_485

_TEXT_FIELDS = ("caption", "short_caption", "id", "source", "metadata")
_INT_FIELDS = ("width", "height")


@dataclasses.dataclass
class Example:
    """One training example. ``width``/``height`` are those of the stored image."""

    image_bytes: bytes
    caption: str
    short_caption: str = ""
    width: int = 0
    height: int = 0
    id: str = ""
    source: str = ""
    metadata: str = "{}"

    def metadata_dict(self) -> dict[str, Any]:
        """``metadata`` parsed as JSON (a dict; ``{}`` when empty)."""
        return json.loads(self.metadata) if self.metadata else {}


def image_format(data: bytes) -> str:
    """The container format of encoded image bytes from their magic number: ``jpeg``, ``png``,
    ``webp``, ``gif``, ``bmp``, ``tiff`` or ``unknown``."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "unknown"


def encode_example(ex: Example) -> bytes:
    """Serializes ``ex`` into one record (deterministic bytes for equal examples)."""
    if not isinstance(ex.image_bytes, (bytes, bytearray, memoryview)) or len(ex.image_bytes) == 0:
        raise RecordError(f"example {ex.id!r}: image_bytes must be non-empty bytes")
    proto = example_proto.Example()
    feature = proto.features.feature
    feature["schema_version"].int64_list.value.append(SCHEMA_VERSION)
    feature["image"].bytes_list.value.append(bytes(ex.image_bytes))
    for name in _TEXT_FIELDS:
        value = getattr(ex, name)
        if not isinstance(value, str):
            raise RecordError(f"example {ex.id!r}: field {name!r} must be str, got "
                              f"{type(value).__name__}")
        feature[name].bytes_list.value.append(value.encode("utf-8"))
    for name in _INT_FIELDS:
        value = getattr(ex, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RecordError(f"example {ex.id!r}: field {name!r} must be an int >= 0, "
                              f"got {value!r}")
        feature[name].int64_list.value.append(value)
    return proto.SerializeToString(deterministic=True)


def _single(feature_map, key: str, kind: str, required: bool, default):
    if key not in feature_map:
        if required:
            raise RecordError(f"malformed lens record: missing feature {key!r} "
                              f"(present: {sorted(feature_map)})")
        return default
    feature = feature_map[key]
    found = feature.WhichOneof("kind")
    if found is None and not required:
        return default
    if found != kind:
        raise RecordError(f"malformed lens record: feature {key!r} is {found}, expected {kind}")
    values = getattr(feature, kind).value
    if len(values) != 1:
        raise RecordError(f"malformed lens record: feature {key!r} holds {len(values)} values, "
                          "expected 1")
    return values[0]


def decode_example(raw: bytes) -> Example:
    """Parses one record written by ``encode_example`` (or by the TFDS builder).

    Raises ``RecordError`` naming the problem when ``raw`` is not a valid lens record.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise RecordError(f"malformed lens record: expected bytes, got {type(raw).__name__}")
    try:
        proto = example_proto.Example.FromString(bytes(raw))
    except DecodeError as e:
        raise RecordError(f"malformed lens record ({len(raw)} bytes): not a serialized "
                          f"tf.train.Example ({e})") from e
    feature_map = proto.features.feature
    if "schema_version" not in feature_map:
        raise RecordError(f"malformed lens record ({len(raw)} bytes): no 'schema_version' "
                          "feature (not a lens record?)")
    version = _single(feature_map, "schema_version", "int64_list", True, None)
    if version > SCHEMA_VERSION or version < 1:
        raise RecordError(f"lens record has schema_version {version}, this code reads versions "
                          f"1..{SCHEMA_VERSION} (upgrade lens_jax?)")
    image = _single(feature_map, "image", "bytes_list", True, None)
    if not image:
        raise RecordError("malformed lens record: empty 'image' feature")
    fields: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        required = name == "caption"
        default = b"{}" if name == "metadata" else b""
        value = _single(feature_map, name, "bytes_list", required, default)
        try:
            fields[name] = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(f"malformed lens record: feature {name!r} is not UTF-8 ({e})") from e
    for name in _INT_FIELDS:
        fields[name] = int(_single(feature_map, name, "int64_list", False, 0))
    return Example(image_bytes=image, **fields)


# ---------------------------------------------------------------------------------------------
# Shards


def _is_shard(path: str) -> bool:
    name = os.path.basename(path)
    return SHARD_MARKER in name and not name.startswith(".")


def list_shards(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The ArrayRecord shard files named by ``path``, sorted within each part.

    ``path`` is a folder of shards (every ``*.array_record*`` file in it), a glob pattern, a single
    file, a comma-separated list of any of these, or a list of them; each local or ``gs://``
    (a ``gs://`` glob matches file names in one folder only). Raises ``RecordError`` naming the
    path when nothing is found.
    """
    if isinstance(path, (list, tuple)):
        parts = [os.fspath(p) for p in path]
    else:
        parts = [p.strip() for p in os.fspath(path).split(",") if p.strip()]
    if not parts:
        raise RecordError(f"no record path given ({path!r})")
    shards: list[str] = []
    for part in parts:
        if storage.is_remote(part):
            shards.extend(_list_remote_shards(part))
            continue
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            pattern = os.path.join(glob.escape(part), f"*{SHARD_MARKER}*")
            found = sorted(p for p in glob.glob(pattern) if _is_shard(p) and os.path.isfile(p))
            if not found:
                raise RecordError(f"{part}: folder holds no ArrayRecord shards "
                                  f"(no file matching *{SHARD_MARKER}*)")
        elif os.path.isfile(part):
            found = [part]
        elif glob.has_magic(part):
            found = sorted(p for p in glob.glob(part) if os.path.isfile(p))
            if not found:
                raise RecordError(f"{part}: glob matches no file")
        else:
            raise RecordError(f"{part}: no such file or folder of records")
        shards.extend(found)
    return shards


def _list_remote_shards(part: str) -> list[str]:
    """``list_shards`` of one ``gs://`` folder, glob or file."""
    p = storage.path(part)
    if glob.has_magic(p.name):
        found = sorted(os.fspath(f) for f in p.parent.glob(p.name))
        if not found:
            raise RecordError(f"{part}: glob matches no file")
    elif p.is_dir():
        found = [os.fspath(p / name) for name in storage.listdir(p) if _is_shard(name)]
        if not found:
            raise RecordError(f"{part}: folder holds no ArrayRecord shards "
                              f"(no file matching *{SHARD_MARKER}*)")
    elif p.exists():
        found = [os.fspath(p)]
    else:
        raise RecordError(f"{part}: no such file or folder of records")
    return found


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    """``{prefix}.array_record-{index:05d}-of-{num_shards:05d}`` (the TFDS naming style)."""
    return f"{prefix}{SHARD_MARKER}-{index:05d}-of-{num_shards:05d}"


def write_shards(examples: Iterable[Example], out_dir: str | os.PathLike, num_shards: int,
                 prefix: str = "data", overwrite: bool = False,
                 extra_manifest: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
                 ) -> list[str]:
    """Writes ``examples`` round-robin into ``num_shards`` ArrayRecord shards in ``out_dir``.

    Example ``i`` goes to shard ``i % num_shards``; with fewer examples than shards only as many
    shards as examples are written (no empty shard). The folder is written under a temporary name
    and renamed at the end, so a failure leaves nothing half-written. Besides the shards, the
    folder gets ``lens_records.json`` (schema version, per-shard counts, and ``extra_manifest``,
    a dict or a function returning one, called once all examples are written).
    Returns the shard paths.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if num_shards < 1:
        raise RecordError(f"num_shards must be >= 1, got {num_shards}")
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise RecordError(f"invalid shard prefix {prefix!r}")
    names = [shard_name(prefix, i, num_shards) for i in range(num_shards)]
    counts = [0] * num_shards
    with output_guard.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writers = [ArrayRecordWriter(str(tmp / name), WRITER_OPTIONS) for name in names]
        try:
            for i, ex in enumerate(examples):
                writers[i % num_shards].write(encode_example(ex))
                counts[i % num_shards] += 1
        finally:
            for writer in writers:
                writer.close()
        # Round-robin leaves only trailing shards empty (fewer examples than shards): drop them
        # and renumber the rest, so that every shard holds data.
        kept = sum(1 for c in counts if c) or 1
        if kept < num_shards:
            log.info("%d example(s): writing %d shard(s) instead of %d", sum(counts), kept,
                     num_shards)
            for name in names[kept:]:
                (tmp / name).unlink()
            names = [shard_name(prefix, i, kept) for i in range(kept)]
            for i, name in enumerate(names):
                os.replace(tmp / shard_name(prefix, i, num_shards), tmp / name)
            counts = counts[:kept]
        if callable(extra_manifest):
            extra_manifest = extra_manifest()
        write_manifest(tmp, dict(zip(names, counts)), extra_manifest)
    out = Path(out_dir).absolute()
    return [str(out / name) for name in names]


def write_manifest(folder: str | os.PathLike, shards: dict[str, int],
                   extra: dict[str, Any] | None = None) -> None:
    """Writes ``lens_records.json`` into ``folder`` (local or ``gs://``): schema version, the
    record count of each shard (``shards``: name -> count) and their sum, and ``extra``."""
    manifest = {
        "format": "lens_records",
        "schema_version": SCHEMA_VERSION,
        "num_examples": sum(shards.values()),
        "shards": shards,
        **(extra or {}),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    if storage.is_remote(folder):
        storage.write_text(storage.path(folder) / MANIFEST_NAME, text)
    else:
        Path(folder, MANIFEST_NAME).write_text(text)


# What ``write_shards`` puts in its folder (``--overwrite`` replaces a folder holding only these).
OUTPUT_PATTERNS = (MANIFEST_NAME, f"*{SHARD_MARKER}-*")


def open_source(path_or_shards: str | os.PathLike | Sequence[str | os.PathLike]):
    """A grain ``RandomAccessDataSource`` of raw record bytes (decode with ``decode_example``).

    Accepts everything ``list_shards`` does (``tfds:`` specs: ``lens_jax.data.sources``).
    ArrayRecord's reader opens local files only (it cannot read ``gs://``): ``gs://`` shards are
    copied once into the local cache (``lens_jax.storage.local_file``: ``$LENS_CACHE_DIR``, default
    ``~/.cache/lens_jax``; a copy is reused while its size matches) and read from there.
    """
    import grain

    shards = list_shards(path_or_shards)
    if any(storage.is_remote(s) for s in shards):
        log.info("reading %d gs:// record shard(s) through the local cache %s", len(shards), storage.cache_dir())
        shards = [storage.local_file(s) for s in shards]
    try:
        return grain.sources.ArrayRecordDataSource(shards)
    except (RuntimeError, OSError, ValueError) as e:
        from array_record.python.array_record_module import ArrayRecordReader

        for shard in shards:  # name the broken shard
            try:
                ArrayRecordReader(shard).close()
            except (RuntimeError, OSError, ValueError) as shard_error:
                raise RecordError(f"{shard}: not a readable ArrayRecord file "
                                  f"({shard_error})") from e
        raise RecordError(f"cannot open the record shards {shards}: {e}") from e


def read_examples(path_or_shards, limit: int | None = None) -> Iterator[Example]:
    """Decoded examples of a record path, in source order (``limit`` caps how many)."""
    source = open_source(path_or_shards)
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(n):
        yield decode_example(source[i])


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``lens_records.json`` of a folder written by ``write_shards`` (``None`` if absent)."""
    path = storage.native(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from e
