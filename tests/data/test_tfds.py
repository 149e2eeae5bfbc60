"""The lens_records TFDS builder, read back without TensorFlow."""

import importlib.util
import io
import pickle
import sys

import pytest
from PIL import Image

from lens_jax.data import records, sources


def _is_tensorflow(name: str) -> bool:
    return name == "tensorflow" or name.startswith("tensorflow.")


class _HideTensorFlow:
    """Wraps an import finder so that it never finds TensorFlow (as if not installed)."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if _is_tensorflow(name):
            return None
        find_spec = getattr(self._finder, "find_spec", None)
        return find_spec(name, path, target) if find_spec else None

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


@pytest.fixture
def no_tensorflow(monkeypatch):
    """``import tensorflow`` fails and ``find_spec('tensorflow')`` is None during the test."""
    monkeypatch.setattr(sys, "meta_path", [_HideTensorFlow(f) for f in sys.meta_path])
    for name in [m for m in sys.modules if _is_tensorflow(m)]:
        monkeypatch.delitem(sys.modules, name)
    assert importlib.util.find_spec("tensorflow") is None
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401
    yield
    assert not any(_is_tensorflow(m) for m in sys.modules)


def _png(i):
    buffer = io.BytesIO()
    Image.new("RGB", (16 + i, 8), (i * 20, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _examples(n):
    return [records.Example(image_bytes=_png(i), caption=f"caption {i}", short_caption=f"s{i}",
                            width=16 + i, height=8, id=f"id-{i}", source="unit",
                            metadata=f'{{"i": {i}}}') for i in range(n)]


def test_tfds_from_records_without_tensorflow(no_tensorflow, tmp_path):
    import tensorflow_datasets as tfds

    from lens_jax.data import tfds_builder

    examples = {e.id: e for e in _examples(6)}
    records.write_shards(examples.values(), tmp_path / "recs", num_shards=2)
    data_dir = tmp_path / "tfds"
    builder = tfds_builder.prepare(data_dir, "unit", records=str(tmp_path / "recs"))
    assert builder.info.splits["train"].num_examples == 6
    assert str(builder.info.file_format).lower().endswith("array_record")

    # Raw records of the TFDS files decode as lens records.
    source = tfds_builder.tfds_source("lens_records/unit", "train", data_dir=str(data_dir))
    decoded = [records.decode_example(source[i]) for i in range(len(source))]
    assert {e.id: e for e in decoded} == examples

    # Same through sources.open_source specs (name@data_dir, dataset folder, sliced split).
    spec_source = sources.open_source(f"tfds:lens_records/unit:train@{data_dir}")
    assert len(spec_source) == 6
    clone = pickle.loads(pickle.dumps(spec_source))  # grain worker processes pickle sources
    assert records.decode_example(clone[5]) == records.decode_example(spec_source[5])
    assert len(sources.open_source(f"tfds:{data_dir}/lens_records/unit/1.0.0:train[:50%]")) == 3

    # TFDS' own data source decodes the features (text fields as bytes).
    ds = tfds.data_source("lens_records/unit", data_dir=str(data_dir), split="train")
    assert len(ds) == 6
    row = ds[0]
    ex = examples[row["id"].decode()]
    assert row["image"] == ex.image_bytes
    assert row["caption"].decode() == ex.caption
    assert (row["width"], row["height"], row["schema_version"]) == (ex.width, ex.height, 1)
    reread = tfds.builder_from_directory(str(data_dir / "lens_records" / "unit" / "1.0.0"))
    assert len(reread.as_data_source(split="train")) == 6
    assert "tensorflow" not in sys.modules


def test_tfds_from_image_folder_with_validation(no_tensorflow, tmp_path):
    from lens_jax.data import tfds_builder

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(10):
        (root / f"im{i}.png").write_bytes(_png(i))
        (root / f"im{i}.txt").write_text(f"caption {i}")
    (root / "nocap.png").write_bytes(_png(0))  # skipped: no caption
    builder = tfds_builder.prepare(tmp_path / "tfds", "folder", images=str(root),
                                   validation_fraction=0.3)
    splits = builder.info.splits
    assert splits["train"].num_examples + splits["validation"].num_examples == 10
    assert splits["validation"].num_examples > 0
    train = tfds_builder.tfds_source(str(tmp_path / "tfds" / "lens_records" / "folder"), "train")
    validation = tfds_builder.tfds_source(str(tmp_path / "tfds" / "lens_records" / "folder"),
                                          "validation")
    ids = [records.decode_example(s[i]).id for s in (train, validation) for i in range(len(s))]
    assert sorted(ids) == sorted(f"im{i}.png" for i in range(10))
    ex = records.decode_example(train[0])
    assert ex.source == "imgs" and ex.image_bytes == _png(int(ex.id[2:-4]))
    with pytest.raises(records.RecordError, match="no split 'test'"):
        tfds_builder.tfds_source(str(tmp_path / "tfds" / "lens_records" / "folder"), "test")
    assert "tensorflow" not in sys.modules


def test_parse_spec():
    from lens_jax.data.tfds_builder import parse_spec

    assert parse_spec("tfds:lens_records/a") == ("lens_records/a", "train", None)
    assert parse_spec("tfds:lens_records/a:validation@/d") == ("lens_records/a", "validation", "/d")
    assert parse_spec("tfds:/x/y:train[:10%]") == ("/x/y", "train[:10%]", None)
    assert parse_spec("tfds:lens_records/a:1.0.0@/d") == ("lens_records/a:1.0.0", "train", "/d")
    with pytest.raises(records.RecordError):
        parse_spec("tfds:")


def test_tfds_errors(tmp_path):
    from lens_jax.data import tfds_builder

    with pytest.raises(records.RecordError, match="not a prepared TFDS dataset folder"):
        tfds_builder.tfds_source(str(tmp_path))
    with pytest.raises(ValueError, match="exactly one of records= and images="):
        tfds_builder.prepare(tmp_path / "t", "bad")
