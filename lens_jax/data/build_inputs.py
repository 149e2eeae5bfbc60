"""The inputs people already have, read as streams of build items (``lens-data build``; the records
a pipeline reads are opened by ``lens_jax.data.sources``).

- WebDataset tar shards (img2dataset's output): ``shards/{00000..00099}.tar``. The members of a
  sample share a key (the member name up to the first dot of its file name): ``KEY.jpg`` (or
  ``.jpeg``/``.png``/``.webp``), the caption in ``KEY.txt`` or in a field of ``KEY.json``
  (``caption_field``), optionally ``KEY.short.txt``. Scalar fields of ``KEY.json`` (``url``,
  ``key``, ``status``...) go to the record's metadata.
- Parquet files with an image-bytes column and a caption column (Hugging Face's ``Image``
  feature, a struct ``{bytes, path}``, is read too).
- A Hugging Face dataset saved with ``save_to_disk`` (its Arrow files, read with pyarrow; the
  ``datasets`` library is not needed), or the parquet files of one on the Hub (``--parquet``).
- A TFDS dataset prepared as ArrayRecord (``tfds:NAME[:SPLIT][@DATA_DIR]``, read through
  ``lens_jax.data.tfds_builder.tfds_source`` without TensorFlow): its ``tf.train.Example``
  records, the image feature (``tfds.features.Image`` stores the encoded bytes) and a text
  feature by their flattened names (``image``, ``captions/text``; a feature holding several
  values gives its first).

Each item carries the encoded image bytes; ``lens_jax.data.build.load_bytes`` makes the records,
exactly as for an image folder. Nothing here is fatal but a wrong flag (a column that does not
exist): unreadable files and tar members, samples without an image, rows without image bytes are
yielded as ``Skip``s, counted by reason in the build report. Every path may be ``gs://``
(``lens_jax.storage``).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from lens_jax import storage
from lens_jax.data.build import MISSING_CAPTION, UNDECODABLE_CAPTION, Item, Skip
from lens_jax.errors import RecordError

# Skip reasons of these inputs (besides the build's own).
UNREADABLE_FILE = "unreadable input file"
UNREADABLE_MEMBER = "unreadable tar member"
NO_IMAGE = "no image in sample"
NO_IMAGE_BYTES = "no image bytes"
BAD_TFDS_RECORD = "unreadable TFDS record"

# Member extensions taken as the image of a WebDataset sample; load_bytes rejects the formats
# the build does not store (gif, bmp, tiff) by name.
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_BRACE = re.compile(r"\{([^{}]*)\}")
_METADATA_MAX_CHARS = 256  # longer JSON string fields (exif dumps) are not copied


# ---------------------------------------------------------------------------------------------
# paths


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as WebDataset writes shard lists: ``{000..099}`` (zero padding kept,
    inclusive) and ``{a,b}``; several braces multiply out, left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        if int(hi) < int(lo):
            raise RecordError(f"{pattern}: empty range {{{body}}}")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def expand_paths(patterns: Sequence[str], flag: str) -> list[str]:
    """The files named by ``patterns``: braces expanded, then globs (``*?[``) matched, local or
    ``gs://``. A glob matching nothing, or the first or last file of a pattern missing (a typo),
    raises ``RecordError`` naming ``flag``; the files between are not looked up one by one (100k
    shards on GCS), a missing one is skipped and counted when read."""
    files: list[str] = []
    for pattern in patterns:
        expanded = expand_braces(pattern)
        for i, p in enumerate(expanded):
            if glob.has_magic(p):
                if storage.is_remote(p):
                    parent = storage.path(p).parent
                    found = sorted(os.fspath(f) for f in parent.glob(storage.path(p).name))
                else:
                    found = sorted(glob.glob(os.path.expanduser(p)))
                if not found:
                    raise RecordError(f"{flag} {p}: glob matches no file")
                files.extend(found)
            else:
                if i in (0, len(expanded) - 1) and not storage.exists(p):
                    raise RecordError(f"{flag} {p}: no such file")
                files.append(p)
    if not files:
        raise RecordError(f"{flag}: no input file given")
    return files


def _open(path: str):
    return storage.path(path).open("rb")


def _name(path: str) -> str:
    """A file's name without its extension: the prefix of its item ids."""
    base = os.path.basename(os.fspath(path).rstrip("/"))
    return base.split(".", 1)[0] or base


# ---------------------------------------------------------------------------------------------
# WebDataset


def _split_key(member_name: str) -> tuple[str, str]:
    """``("dir/KEY", "ext")``: WebDataset's key is the name up to the first dot of the file name."""
    folder, base = os.path.split(member_name)
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def _sample_item(shard: str, key: str, members: dict[str, bytes],
                 caption_field: str | None) -> Item | Skip:
    item_id = f"{shard}/{key}"
    image_ext = next((e for e in _IMAGE_EXTS if e in members), None)
    if image_ext is None:
        return Skip(item_id, NO_IMAGE, "members: " + ", ".join(f".{e}" for e in sorted(members)))
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if caption_field:
                return Skip(item_id, MISSING_CAPTION, f"{key}.json is not valid JSON ({e})")
        meta = meta if isinstance(meta, dict) else {}
    try:
        if caption_field:
            caption = meta.get(caption_field)
            caption = None if caption is None else str(caption).strip()
        elif "txt" in members:
            caption = members["txt"].decode("utf-8").strip()
        else:
            caption = meta.get("caption")
            caption = None if caption is None else str(caption).strip()
        short = members["short.txt"].decode("utf-8").strip() if "short.txt" in members else ""
    except UnicodeDecodeError as e:
        return Skip(item_id, UNDECODABLE_CAPTION, f"{key}.txt: {e}")
    metadata = {"shard": shard, "key": key}
    metadata.update({k: v for k, v in meta.items()
                     if k != caption_field and k != "caption"
                     and (isinstance(v, (int, float, bool)) or
                          (isinstance(v, str) and len(v) <= _METADATA_MAX_CHARS))})
    return Item(path="", id=item_id, caption=caption, short_caption=short, metadata=metadata,
                data=members[image_ext])


def iter_webdataset(shards: Iterable[str], caption_field: str | None = None
                    ) -> Iterator[Item | Skip]:
    """The samples of WebDataset tar shards (streamed, each read once), as items or skips."""
    for path in shards:
        shard = _name(path)
        done = 0
        try:
            with _open(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                members = (m for m in tar if m.isfile())
                for key, group in itertools.groupby(members, key=lambda m: _split_key(m.name)[0]):
                    data: dict[str, bytes] = {}
                    bad = None
                    for m in group:
                        try:
                            data[_split_key(m.name)[1]] = tar.extractfile(m).read()
                        except (OSError, tarfile.TarError) as e:
                            bad = Skip(f"{shard}/{key}", UNREADABLE_MEMBER, f"{m.name}: {e}")
                    yield bad or _sample_item(shard, key, data, caption_field)
                    done += 1
        except (OSError, tarfile.TarError, EOFError, zlib.error) as e:
            yield Skip(os.fspath(path), UNREADABLE_FILE,
                       f"{type(e).__name__}: {e} (after {done} sample(s))")


# ---------------------------------------------------------------------------------------------
# parquet and Arrow tables (Hugging Face)


def _image_bytes(value: Any) -> tuple[bytes | None, str]:
    """The encoded bytes of an image cell (bytes, or Hugging Face's ``{bytes, path}``), or
    ``None`` and why not."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], ""
        return None, f"no bytes (path {value.get('path')!r})"
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value), ""
    if isinstance(value, str):
        return None, f"a string ({value[:80]!r}), not image bytes"
    return None, "empty" if value in (None, b"") else f"a {type(value).__name__}"


def _check_columns(name: str, available: Sequence[str], wanted: dict[str, str | None]) -> None:
    for flag, column in wanted.items():
        if column is not None and column not in available:
            raise RecordError(f"{name}: no column {column!r} ({flag}); columns: "
                              f"{', '.join(available)}")


def _rows_to_items(batches: Iterable, name: str, image_column: str, caption_column: str,
                   short_column: str | None, id_column: str | None) -> Iterator[Item | Skip]:
    """Items from Arrow record batches (one row, one image)."""
    row = 0
    for batch in batches:
        columns = {c: batch.column(c).to_pylist() for c in batch.schema.names}
        for i in range(batch.num_rows):
            item_id = (str(columns[id_column][i]) if id_column and columns[id_column][i] is not None
                       else f"{name}:{row}")
            row += 1
            data, why = _image_bytes(columns[image_column][i])
            if data is None:
                yield Skip(item_id, NO_IMAGE_BYTES, f"column {image_column!r}: {why}")
                continue
            caption = columns[caption_column][i]
            short = columns[short_column][i] if short_column else None
            yield Item(path="", id=item_id, data=data,
                       caption=None if caption is None else str(caption).strip(),
                       short_caption="" if short is None else str(short).strip())


def _table_columns(image_column: str, caption_column: str, short_column: str | None,
                   id_column: str | None, available: Sequence[str], name: str) -> list[str]:
    _check_columns(name, available, {"--image-column": image_column,
                                     "--caption-column": caption_column,
                                     "--short-caption-column": short_column})
    return [c for c in dict.fromkeys((image_column, caption_column, short_column, id_column))
            if c is not None and c in available]


def iter_parquet(files: Iterable[str], image_column: str = "image",
                 caption_column: str = "caption", short_column: str | None = None,
                 id_column: str | None = "key", batch_size: int = 64) -> Iterator[Item | Skip]:
    """The rows of parquet files as items (``id_column``, when the file has it, gives the ids;
    otherwise ``FILE:ROW``)."""
    import pyarrow.parquet as pq

    for path in files:
        name = _name(path)
        done = 0
        try:
            with _open(path) as f:
                pf = pq.ParquetFile(f)
                available = pf.schema_arrow.names
                columns = _table_columns(image_column, caption_column, short_column, id_column,
                                         available, os.fspath(path))
                for result in _rows_to_items(pf.iter_batches(batch_size=batch_size,
                                                             columns=columns),
                                             name, image_column, caption_column, short_column,
                                             id_column if id_column in available else None):
                    done += 1
                    yield result
        except RecordError:
            raise
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError... on a corrupt file
            yield Skip(os.fspath(path), UNREADABLE_FILE,
                       f"{type(e).__name__}: {e} (after {done} row(s))")


def hf_arrow_files(folder: str, split: str = "train") -> list[str]:
    """The Arrow files of a Hugging Face dataset saved with ``save_to_disk`` (a ``Dataset``
    folder with ``state.json``, or a ``DatasetDict`` folder with ``dataset_dict.json``, of
    which ``split``)."""
    root = storage.path(folder)
    if (root / "dataset_dict.json").exists():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise RecordError(f"--hf-dataset {folder}: no split {split!r} (--hf-split); splits: "
                              f"{', '.join(splits)}")
        root = root / split
    state = root / "state.json"
    if not state.exists():
        raise RecordError(f"--hf-dataset {folder}: no state.json or dataset_dict.json (not a "
                          "folder written by datasets' save_to_disk)")
    files = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    if not files:
        raise RecordError(f"--hf-dataset {folder}: state.json lists no data files")
    return [os.fspath(root / f) for f in files]


def iter_hf_dataset(folder: str, split: str = "train", image_column: str = "image",
                    caption_column: str = "caption", short_column: str | None = None,
                    id_column: str | None = None) -> Iterator[Item | Skip]:
    """The rows of a dataset saved by ``datasets``' ``save_to_disk`` as items (ids
    ``FILE:ROW`` unless ``id_column``). A folder that is not such a dataset raises
    ``RecordError`` at once."""
    files = hf_arrow_files(folder, split)
    return _iter_arrow_files(files, image_column, caption_column, short_column, id_column)


def _iter_arrow_files(files: list[str], image_column: str, caption_column: str,
                      short_column: str | None, id_column: str | None) -> Iterator[Item | Skip]:
    import pyarrow as pa

    for path in files:
        name = _name(path)
        done = 0
        try:
            with _open(path) as f:
                try:
                    reader = pa.ipc.open_stream(f)  # what datasets writes
                except pa.ArrowInvalid:
                    f.seek(0)
                    reader = pa.ipc.open_file(f)
                available = reader.schema.names
                _table_columns(image_column, caption_column, short_column, id_column, available,
                               os.fspath(path))
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) \
                    if isinstance(reader, pa.ipc.RecordBatchFileReader) else reader
                for result in _rows_to_items(batches, name, image_column, caption_column,
                                             short_column,
                                             id_column if id_column in available else None):
                    done += 1
                    yield result
        except RecordError:
            raise
        except Exception as e:  # corrupt Arrow data
            yield Skip(os.fspath(path), UNREADABLE_FILE,
                       f"{type(e).__name__}: {e} (after {done} row(s))")


# ---------------------------------------------------------------------------------------------
# TFDS (ArrayRecord)


def _first_value(feature_map, key: str | None) -> Any:
    """The first value of feature ``key`` of a ``tf.train.Example`` (``None``: absent or empty)."""
    if key is None or key not in feature_map:
        return None
    feature = feature_map[key]
    kind = feature.WhichOneof("kind")
    values = getattr(feature, kind).value if kind else []
    return values[0] if len(values) else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8").strip() if isinstance(value, bytes) else str(value).strip()


def iter_tfds(spec: str, image_column: str = "image", caption_column: str = "caption",
              short_column: str | None = None, id_column: str | None = None
              ) -> Iterator[Item | Skip]:
    """The examples of an ArrayRecord TFDS dataset (``tfds:NAME[:SPLIT][@DATA_DIR]``) as items;
    ids from ``id_column`` when the records have it, else ``NAME:INDEX``. A dataset that is not
    found or not ArrayRecord raises ``RecordError`` at once."""
    from lens_jax.data import tfds_builder

    source = tfds_builder.tfds_source_from_spec(spec)
    name = os.path.basename(os.path.normpath(tfds_builder.parse_spec(spec)[0]))
    return _iter_tf_examples(source, spec, name, image_column, caption_column, short_column,
                             id_column)


def _iter_tf_examples(source, spec: str, name: str, image_column: str, caption_column: str,
                      short_column: str | None, id_column: str | None) -> Iterator[Item | Skip]:
    from google.protobuf.message import DecodeError
    from lens_jax.data.example_proto import Example

    checked = False
    for index in range(len(source)):
        item_id = f"{name}:{index}"
        try:
            features = Example.FromString(source[index]).features.feature
        except DecodeError as e:
            yield Skip(item_id, BAD_TFDS_RECORD, f"not a tf.train.Example ({e})")
            continue
        if not checked:
            _check_columns(spec, sorted(features), {"--image-column": image_column,
                                                    "--caption-column": caption_column,
                                                    "--short-caption-column": short_column})
            checked = True
        key = _first_value(features, id_column)
        item_id = _text(key) or item_id
        data = _first_value(features, image_column)
        if not isinstance(data, bytes) or not data:
            yield Skip(item_id, NO_IMAGE_BYTES, f"feature {image_column!r} holds no bytes")
            continue
        try:
            caption = _text(_first_value(features, caption_column))
            short = _text(_first_value(features, short_column)) or ""
        except UnicodeDecodeError as e:
            yield Skip(item_id, UNDECODABLE_CAPTION, f"feature {caption_column!r}: {e}")
            continue
        yield Item(path="", id=item_id, caption=caption, short_caption=short, data=data)
