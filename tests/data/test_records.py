"""The lens record format: encode/decode, shards, sources, errors."""

import io
import json
import os
import pickle

import pytest
from PIL import Image

from lens_jax.data import records
from lens_jax.data.records import Example, RecordError


def _png(width=8, height=6, color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _examples(n):
    return [Example(image_bytes=_png(8 + i, 6), caption=f"caption number {i} — ünïcødé ✓",
                    short_caption=f"short {i}", width=8 + i, height=6, id=f"id-{i}",
                    source="unit", metadata=json.dumps({"i": i})) for i in range(n)]


def test_round_trip_all_fields():
    ex = _examples(1)[0]
    raw = records.encode_example(ex)
    assert isinstance(raw, bytes)
    assert records.decode_example(raw) == ex
    assert records.decode_example(raw).metadata_dict() == {"i": 0}


def test_round_trip_defaults_and_determinism():
    ex = Example(image_bytes=b"\xff\xd8\xff\xe0fakejpeg", caption="only a caption")
    raw = records.encode_example(ex)
    assert raw == records.encode_example(Example(b"\xff\xd8\xff\xe0fakejpeg", "only a caption"))
    back = records.decode_example(raw)
    assert back == ex
    assert (back.short_caption, back.width, back.height, back.id, back.source, back.metadata) == (
        "", 0, 0, "", "", "{}")


def test_tf_example_layout():
    # The wire format is a tf.train.Example with one value per feature (what TFDS writes).
    from tensorflow_datasets.proto import tf_example_pb2

    proto = tf_example_pb2.Example.FromString(records.encode_example(_examples(1)[0]))
    feature = proto.features.feature
    assert set(feature) == {"schema_version", "image", "caption", "short_caption", "width",
                            "height", "id", "source", "metadata"}
    assert feature["schema_version"].int64_list.value == [records.SCHEMA_VERSION]
    assert feature["width"].int64_list.value == [8]
    assert feature["caption"].bytes_list.value[0].decode() == _examples(1)[0].caption


def test_encode_rejects_bad_examples():
    with pytest.raises(RecordError, match="image_bytes"):
        records.encode_example(Example(image_bytes=b"", caption="x", id="e1"))
    with pytest.raises(RecordError, match="'caption' must be str"):
        records.encode_example(Example(image_bytes=b"abc", caption=None))
    with pytest.raises(RecordError, match="'width'"):
        records.encode_example(Example(image_bytes=b"abc", caption="x", width=-1))


def _proto(**features):
    from tensorflow_datasets.proto import tf_example_pb2

    proto = tf_example_pb2.Example()
    for key, value in features.items():
        if isinstance(value, int):
            proto.features.feature[key].int64_list.value.append(value)
        elif isinstance(value, float):
            proto.features.feature[key].float_list.value.append(value)
        else:
            proto.features.feature[key].bytes_list.value.append(value)
    return proto.SerializeToString(deterministic=True)


@pytest.mark.parametrize("raw, message", [
    (b"\x0a\xff\xff\xff", "not a serialized tf.train.Example"),
    (b"", "no 'schema_version'"),
    (_proto(schema_version=1, caption=b"x"), "missing feature 'image'"),
    (_proto(schema_version=1, image=b"img"), "missing feature 'caption'"),
    (_proto(schema_version=99, image=b"img", caption=b"x"), "schema_version 99"),
    (_proto(schema_version=1, image=b"img", caption=b"x", width=1.5), "'width' is float_list"),
    (_proto(schema_version=1, image=b"img", caption=b"\xff\xfe"), "not UTF-8"),
], ids=["garbage", "empty", "no-image", "no-caption", "newer-version", "wrong-kind", "bad-utf8"])
def test_malformed_records(raw, message):
    with pytest.raises(RecordError, match=message):
        records.decode_example(raw)
    with pytest.raises(RecordError):
        records.decode_example("not bytes")  # type: ignore[arg-type]


def test_image_format():
    assert records.image_format(_png()) == "png"
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    assert records.image_format(buffer.getvalue()) == "jpeg"
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="WEBP")
    assert records.image_format(buffer.getvalue()) == "webp"
    assert records.image_format(b"hello") == "unknown"


def test_write_list_open(tmp_path):
    examples = _examples(7)
    out = tmp_path / "recs"
    shards = records.write_shards(examples, out, num_shards=3, prefix="train")
    assert [os.path.basename(s) for s in shards] == [
        f"train.array_record-0000{i}-of-00003" for i in range(3)]
    assert records.list_shards(str(out)) == shards
    assert records.list_shards(str(out / "train.array_record-*")) == shards
    assert records.list_shards(shards[1]) == [shards[1]]
    assert records.list_shards(f"{shards[2]},{shards[0]}") == [shards[2], shards[0]]
    assert records.list_shards([shards[0], shards[1]]) == shards[:2]
    manifest = records.read_manifest(out)
    assert manifest["num_examples"] == 7 and manifest["schema_version"] == records.SCHEMA_VERSION
    assert list(manifest["shards"].values()) == [3, 2, 2]  # round-robin

    source = records.open_source(str(out))
    assert len(source) == 7
    decoded = [records.decode_example(source[i]) for i in range(len(source))]
    assert sorted(decoded, key=lambda e: e.id) == examples
    # Shard order: shard 0 holds examples 0, 3, 6.
    assert [d.id for d in decoded[:3]] == ["id-0", "id-3", "id-6"]
    # grain workers pickle the source.
    clone = pickle.loads(pickle.dumps(source))
    assert records.decode_example(clone[4]) == decoded[4]
    assert [e.id for e in records.read_examples(shards, limit=2)] == ["id-0", "id-3"]


def test_more_shards_than_examples_writes_no_empty_shard(tmp_path):
    shards = records.write_shards(_examples(2), tmp_path / "r", num_shards=4)
    assert [os.path.basename(s) for s in shards] == ["data.array_record-00000-of-00002",
                                                     "data.array_record-00001-of-00002"]
    assert sorted(os.listdir(tmp_path / "r")) == sorted([os.path.basename(s) for s in shards]
                                                        + [records.MANIFEST_NAME])
    assert [len(records.open_source([s])) for s in shards] == [1, 1]
    manifest = records.read_manifest(tmp_path / "r")
    assert manifest["num_examples"] == 2 and list(manifest["shards"].values()) == [1, 1]


def test_list_shards_errors(tmp_path):
    with pytest.raises(RecordError, match="nope"):
        records.list_shards(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordError, match="empty: folder holds no ArrayRecord shards"):
        records.list_shards(str(tmp_path / "empty"))
    with pytest.raises(RecordError, match=r"glob matches no file"):
        records.list_shards(str(tmp_path / "*.array_record*"))
    with pytest.raises(RecordError, match="no record path"):
        records.list_shards(" , ")
    records.write_shards(_examples(2), tmp_path / "bad", num_shards=2)
    broken = tmp_path / "bad" / "data.array_record-00001-of-00002"
    broken.write_bytes(b"not an array record file")
    with pytest.raises(RecordError, match="data.array_record-00001-of-00002: not a readable"):
        records.open_source(str(tmp_path / "bad"))


def test_write_is_atomic(tmp_path):
    def failing():
        yield from _examples(3)
        raise RuntimeError("source broke")

    out = tmp_path / "recs"
    with pytest.raises(RuntimeError, match="source broke"):
        records.write_shards(failing(), out, num_shards=2)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind

    records.write_shards(_examples(2), out, num_shards=1)
    with pytest.raises(FileExistsError):
        records.write_shards(_examples(2), out, num_shards=1)
    records.write_shards(_examples(5), out, num_shards=1, overwrite=True)
    assert len(records.open_source(str(out))) == 5
    with pytest.raises(RecordError, match="num_shards"):
        records.write_shards(_examples(1), tmp_path / "x", num_shards=0)
