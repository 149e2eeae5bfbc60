"""TensorFlow Datasets builder for lens records; works without TensorFlow installed.

``LensRecords`` (TFDS name ``lens_records``) is a ``GeneratorBasedBuilder`` writing ArrayRecord
files. Each config names its input: existing lens records (``records=``) or a folder of images
with captions (``images=``, ``captions=``, exactly as ``lens-data build`` reads them). Features::

    schema_version  Scalar(int64)
    image           Tensor(shape=(), dtype=object)   # encoded bytes as stored (JPEG/PNG/WebP)
    caption, short_caption, id, source, metadata      Text()
    width, height   Scalar(int64)

The image is a plain bytes tensor rather than ``tfds.features.Image`` so that reading returns the
stored bytes (``Image`` would decode every image to an array with a fixed channel count, and
re-encode arrays on write); the training pipeline decodes and resizes itself. TFDS serializes
this ``FeaturesDict`` as a ``tf.train.Example`` with exactly the keys and kinds of the lens
record format, so every raw record of a prepared split decodes with
``lens_jax.data.records.decode_example``.

Reading:

- ``tfds_source(name_or_dir, split)``: a grain ``ArrayRecordDataSource`` of raw record bytes
  (decode with ``records.decode_example``); ``lens_jax.data.sources.open_source("tfds:...")`` calls it.
- ``tfds.data_source("lens_records/CONFIG", data_dir=DIR, split="train")`` (after importing this
  module) or ``tfds.builder_from_directory(DIR/lens_records/CONFIG/1.0.0).as_data_source()``:
  TFDS' own decoded dicts (bytes for text fields).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lens_jax.data import records
from lens_jax.errors import RecordError

NAME = "lens_records"
_SPLIT_FILE_MARKER = "dataset_info.json"
# ":SPLIT" at the end of a spec: a split name, optionally sliced ("train[:95%]").
_SPLIT_SUFFIX = re.compile(r":([A-Za-z_]\w*(?:\[[^\]]*\])?)$")


def features() -> tfds.features.FeaturesDict:
    """The TFDS features of a lens record (same wire format as ``records.encode_example``)."""
    return tfds.features.FeaturesDict({
        "schema_version": tfds.features.Scalar(dtype=np.int64, doc="lens record schema version"),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_,
                                      doc="encoded image bytes as stored (JPEG, PNG or WebP)"),
        "caption": tfds.features.Text(doc="dense caption"),
        "short_caption": tfds.features.Text(doc="short caption (may be empty)"),
        "width": tfds.features.Scalar(dtype=np.int64, doc="stored image width in pixels"),
        "height": tfds.features.Scalar(dtype=np.int64, doc="stored image height in pixels"),
        "id": tfds.features.Text(doc="stable example id"),
        "source": tfds.features.Text(doc="source tag"),
        "metadata": tfds.features.Text(doc="free-form JSON object"),
    })


def example_to_features(ex: records.Example) -> dict[str, Any]:
    """A ``records.Example`` as the feature dict TFDS encodes."""
    return {"schema_version": records.SCHEMA_VERSION, "image": ex.image_bytes,
            "caption": ex.caption, "short_caption": ex.short_caption, "width": ex.width,
            "height": ex.height, "id": ex.id, "source": ex.source, "metadata": ex.metadata}


@dataclasses.dataclass
class LensRecordsConfig(tfds.core.BuilderConfig):
    """Where a ``lens_records`` config reads its examples from.

    Exactly one of ``records`` (lens records: folder, glob, file or comma-separated list) and
    ``images`` (image folder, captions from ``captions`` or ``.txt`` files) is set.
    ``validation_fraction`` of the examples (chosen by a hash of their id) go to a
    ``validation`` split, the rest to ``train``.
    """

    records: str | None = None
    images: str | None = None
    captions: str | None = None
    source: str = ""
    validation_fraction: float = 0.0


def _is_validation(example_id: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    digest = hashlib.sha256(example_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64 < fraction


class LensRecords(tfds.core.GeneratorBasedBuilder):
    """Lens image-caption records (see ``lens_jax.data.records``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Lens record schema version 1."}
    BUILDER_CONFIG_CLS = LensRecordsConfig

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS' default resolves package modules through `importlib_resources`, a package it
        # only declares for Python < 3.9; the file of this class is all it needs.
        from etils import epath

        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Image-caption pairs in the lens record format (lens_jax).",
            features=features(),
            homepage="https://github.com/microsoft/Lens",
        )

    def _config(self) -> LensRecordsConfig:
        config = self.builder_config
        if not isinstance(config, LensRecordsConfig) or (config.records is None) == (
                config.images is None):
            raise ValueError(f"{NAME}: the config must set exactly one of records= and images= "
                             f"(got {config!r})")
        return config

    def _split_generators(self, dl_manager):  # dl_manager is unused: inputs are local
        config = self._config()
        splits = {"train": self._generate_examples(config, validation=False)}
        if config.validation_fraction > 0:
            splits["validation"] = self._generate_examples(config, validation=True)
        return splits

    def _iter_examples(self, config: LensRecordsConfig) -> Iterator[records.Example]:
        if config.records is not None:
            yield from records.read_examples(config.records)
            return
        from lens_jax.data.build import Skip, collect_items, load_item

        source = config.source or os.path.basename(os.path.normpath(config.images))
        items, _ = collect_items(config.images, config.captions)
        for item in items:
            result = load_item(item, source)
            if not isinstance(result, Skip):
                yield result

    def _generate_examples(self, config: LensRecordsConfig, validation: bool):
        seen: set[str] = set()
        for index, ex in enumerate(self._iter_examples(config)):
            key = ex.id or f"#{index}"
            if key in seen:  # TFDS needs unique keys
                key = f"{key}#{index}"
            seen.add(key)
            if _is_validation(key, config.validation_fraction) == validation:
                yield key, example_to_features(ex)


def prepare(data_dir: str | os.PathLike, config_name: str, *, records: str | None = None,
            images: str | None = None, captions: str | None = None, source: str = "",
            validation_fraction: float = 0.0) -> LensRecords:
    """Prepares ``lens_records/config_name`` in ``data_dir`` (ArrayRecord); returns the builder."""
    config = LensRecordsConfig(name=config_name, records=records, images=images,
                               captions=captions, source=source,
                               validation_fraction=validation_fraction,
                               description=f"records={records}" if records else f"images={images}")
    builder = LensRecords(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def _read_only_builder(name_or_dir: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    path = Path(os.path.expanduser(name_or_dir))
    if path.is_dir():
        if (path / _SPLIT_FILE_MARKER).is_file():
            return tfds.builder_from_directory(str(path))
        versions = sorted(p for p in path.iterdir() if (p / _SPLIT_FILE_MARKER).is_file())
        if versions:  # a dataset or config folder: take the newest version
            return tfds.builder_from_directory(str(versions[-1]))
        raise RecordError(f"{path}: not a prepared TFDS dataset folder (no "
                                  f"{_SPLIT_FILE_MARKER} in it or in a version folder below)")
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR")
    if data_dir is None:
        raise RecordError(f"tfds dataset {name_or_dir!r}: give its data_dir "
                                  "(tfds:NAME[:SPLIT]@DATA_DIR) or set TFDS_DATA_DIR")
    # Read from the prepared files: configs of lens_records are not registered by name.
    dataset_name, _, config = name_or_dir.partition("/")
    config, _, version = config.partition(":")
    base = Path(data_dir) / dataset_name / config if config else Path(data_dir) / dataset_name
    if version:
        base = base / version
    if base.is_dir():
        return _read_only_builder(str(base), None)
    try:
        return tfds.builder(name_or_dir, data_dir=data_dir)
    except Exception as e:
        raise RecordError(f"tfds dataset {name_or_dir!r} not found in {data_dir} "
                                  f"({type(e).__name__}: {e})") from e


def tfds_source(name_or_dir: str, split: str = "train", data_dir: str | None = None,
                decoded: bool = False):
    """A random-access data source over a prepared TFDS dataset (ArrayRecord files).

    ``name_or_dir``: a dataset folder (``DATA_DIR/lens_records/CONFIG[/1.0.0]``) or a TFDS name
    (``lens_records/CONFIG``, any ArrayRecord TFDS dataset) with ``data_dir``. ``split`` takes
    the TFDS split syntax (``train``, ``train[:90%]``, ...). Returns a grain
    ``ArrayRecordDataSource`` of raw record bytes (``records.decode_example`` decodes
    ``lens_records`` ones), or with ``decoded=True`` TFDS' own source of decoded feature dicts.
    """
    import grain

    builder = _read_only_builder(name_or_dir, data_dir)
    file_format = builder.info.file_format
    if file_format is not None and "array_record" not in str(file_format).lower():
        raise RecordError(f"tfds dataset {name_or_dir!r} is stored as {file_format}; "
                                  "random access needs file_format=array_record")
    if decoded:
        return builder.as_data_source(split=split)
    try:
        instructions = builder.info.splits[split].file_instructions
    except (KeyError, ValueError) as e:
        raise RecordError(f"tfds dataset {name_or_dir!r}: no split {split!r} "
                                  f"(has {sorted(builder.info.splits)})") from e
    return grain.sources.ArrayRecordDataSource(list(instructions))


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """``tfds:NAME_OR_DIR[:SPLIT][@DATA_DIR]`` -> (name_or_dir, split, data_dir).

    ``NAME`` may carry a config (``lens_records/photos``); the split defaults to ``train`` and may
    use TFDS slicing (``train[:95%]``).
    """
    if not spec.startswith("tfds:"):
        raise RecordError(f"{spec!r}: a TFDS source spec starts with 'tfds:'")
    body = spec[len("tfds:"):]
    body, at, data_dir = body.partition("@")
    name, split = body, "train"
    match = _SPLIT_SUFFIX.search(body)
    if match and match.start() > 0:
        name, split = body[:match.start()], match.group(1)
    if not name:
        raise RecordError(f"{spec!r}: no dataset name (tfds:NAME[:SPLIT][@DATA_DIR])")
    return name, split, (data_dir or None) if at else None


def tfds_source_from_spec(spec: str):
    """``tfds_source`` for a ``tfds:NAME_OR_DIR[:SPLIT][@DATA_DIR]`` string (raw bytes)."""
    name, split, data_dir = parse_spec(spec)
    return tfds_source(name, split, data_dir)
