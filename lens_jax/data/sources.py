"""Which reader a record path names: the one place ``tfds:`` specs and record folders part ways.

``open_source(path)`` is what the input pipeline (``lens_jax.data.pipeline``) calls with
``data.path``: a ``tfds:NAME[:SPLIT][@DATA_DIR]`` / ``tfds:DATASET_DIR[:SPLIT]`` spec goes to the
``lens_records`` TFDS builder (``lens_jax.data.tfds_builder``), anything else to the ArrayRecord
shards of ``lens_jax.data.records``. Kept apart from both so that neither imports the other
(the TFDS builder reads record folders; records never needs TFDS).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lens_jax.data import records

TFDS_PREFIX = "tfds:"


def open_source(path_or_shards: str | os.PathLike | Sequence[str | os.PathLike]):
    """A grain ``RandomAccessDataSource`` of raw record bytes (decode with
    ``records.decode_example``).

    Accepts everything ``records.open_source`` does (a folder of shards, a glob, a shard file, a
    comma-separated list, ``gs://`` paths), or ``tfds:NAME[:SPLIT][@DATA_DIR]`` /
    ``tfds:DATASET_DIR[:SPLIT]`` for a dataset prepared by the ``lens_records`` TFDS builder.
    """
    if isinstance(path_or_shards, str) and path_or_shards.startswith(TFDS_PREFIX):
        from lens_jax.data.tfds_builder import tfds_source_from_spec

        return tfds_source_from_spec(path_or_shards)
    return records.open_source(path_or_shards)
