"""``lens-data build`` from WebDataset shards, parquet and Hugging Face datasets (issue 17 point 2):
tiny inputs written here; bad samples skipped and counted by reason, never fatal."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lens_jax.data import build_inputs, cli, records
from lens_jax.data.records import RecordError


def _img(fmt: str, size=(24, 16), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def _tar(path, members: list[tuple[str, bytes]]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_expand_braces():
    assert build_inputs.expand_braces("s/{00008..00011}.tar") == [
        "s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert build_inputs.expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar",
                                                         "b/2.tar"]
    assert build_inputs.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(RecordError, match="empty range"):
        build_inputs.expand_braces("{5..2}")


@pytest.fixture
def shards(tmp_path):
    """img2dataset-style shards 00000..00002: 00002 is cut short in the middle of a member."""
    good_jpg, good_png, good_webp = _img("JPEG"), _img("PNG", (16, 32)), _img("WEBP")
    meta = {"url": "http://x/b.png", "key": "0001", "status": "success", "alt": "alt text b",
            "exif": "x" * 1000}
    _tar(tmp_path / "shards" / "00000.tar", [
        ("0000.jpg", good_jpg), ("0000.txt", b"a red jpeg"), ("0000.json", b'{"key": "0000"}'),
        ("0001.png", good_png), ("0001.json", json.dumps({**meta, "caption": "json caption"})
                                 .encode()),
        ("0002.txt", b"a caption without its image"),
        ("0003.jpg", good_jpg[:200]), ("0003.txt", b"truncated jpeg"),
        ("0004.webp", good_webp),                                   # no caption at all
        ("0005.gif", _img("GIF")), ("0005.txt", b"a gif"),
        ("0006.jpg", _img("JPEG", color=(1, 2, 3))), ("0006.txt", b"caf\xe9"),  # not UTF-8
    ])
    _tar(tmp_path / "shards" / "00001.tar", [
        ("sub/0100.webp", good_webp), ("sub/0100.txt", b"a webp"),
        ("sub/0100.short.txt", b"webp"), ("sub/0100.json", b'{"alt": "alt webp"}')])
    whole = _tar(tmp_path / "tmp.tar", [("0200.png", _img("PNG", color=(9, 9, 9))),
                                        ("0200.txt", b"kept"),
                                        ("0201.png", _img("PNG", (64, 64))),
                                        ("0201.txt", b"lost")])
    (tmp_path / "shards" / "00002.tar").write_bytes(whole[:2048 + 512])  # into 0201.png
    return tmp_path / "shards", {"jpg": good_jpg, "png": good_png, "webp": good_webp}


def test_webdataset_shards(shards, tmp_path, capsys):
    folder, images = shards
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "build", "--webdataset", f"{folder}/{{00000..00002}}.tar",
                                "--out", out, "--workers", 1, "--num-shards", 2, "--dedup",
                                "--no-progress")
    assert code == 0, stderr
    built = {e.id: e for e in records.read_examples(str(out))}
    assert sorted(built) == ["00000/0000", "00000/0001", "00001/sub/0100", "00002/0200"]
    assert built["00000/0000"].image_bytes == images["jpg"]
    assert built["00000/0000"].caption == "a red jpeg"
    assert built["00000/0001"].caption == "json caption"
    assert (built["00000/0001"].width, built["00000/0001"].height) == (16, 32)
    meta = json.loads(built["00000/0001"].metadata)
    assert meta["url"] == "http://x/b.png" and meta["shard"] == "00000" and "exif" not in meta
    assert built["00001/sub/0100"].short_caption == "webp"
    assert records.read_manifest(out)["source"] == "shards"
    skipped = records.read_manifest(out)["build"]["skipped"]
    assert skipped == {"no image in sample": 1, "unreadable or corrupt image": 1,
                       "missing caption": 1, "unsupported image format": 1,
                       "caption not UTF-8": 1, "unreadable input file": 1}
    assert "00002.tar (" in stdout and "(after 1 sample(s))" in stdout

    # --caption-field: the caption from a JSON field; samples without the field are skipped.
    out2 = tmp_path / "out2"
    code, stdout, _ = _run(capsys, "build", "--webdataset", f"{folder}/0000[01].tar",
                           "--caption-field", "alt", "--out", out2, "--workers", 1,
                           "--no-progress")
    assert code == 0
    built = {e.id: e.caption for e in records.read_examples(str(out2))}
    assert built == {"00000/0001": "alt text b", "00001/sub/0100": "alt webp"}


def test_webdataset_errors(tmp_path, capsys):
    code, _, stderr = _run(capsys, "build", "--webdataset", tmp_path / "s/{0..1}.tar", "--out",
                           tmp_path / "o", "--no-progress")
    assert code == 2 and "s/0.tar: no such file" in stderr
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 30)
    code, _, stderr = _run(capsys, "build", "--webdataset", tmp_path / "junk.tar", "--out",
                           tmp_path / "o", "--workers", 1, "--no-progress")
    assert code == 2 and "every image was skipped" in stderr
    assert "unreadable input file: 1" in stderr and not (tmp_path / "o").exists()


def _table(images) -> pa.Table:
    hf_image = {"bytes": images["webp"], "path": "c.webp"}
    return pa.table({
        "key": ["k0", "k1", "k2", "k3", "k4", "k5"],
        "image": [images["jpg"], None, images["jpg"][:100], images["png"], images["jpg"],
                  b"\x89PNG\r\n\x1a\nbroken"],
        "caption": ["a jpeg", "no image", "truncated", None, "the same jpeg again", "broken png"],
        "short": ["j", "", "", "", "", ""],
    }), pa.table({
        "image": [hf_image, {"bytes": None, "path": "only/a/path.jpg"}],
        "text": ["hugging face image", "path only"],
    })


def test_parquet(shards, tmp_path, capsys):
    _, images = shards
    plain, hf = _table(images)
    pq.write_table(plain, tmp_path / "p-0.parquet", row_group_size=2)
    pq.write_table(hf, tmp_path / "p-1.parquet")
    (tmp_path / "p-2.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "build", "--parquet", tmp_path / "p-0.parquet",
                                "--short-caption-column", "short", "--out", out, "--workers", 2,
                                "--dedup", "--no-progress")
    assert code == 0, stderr
    built = {e.id: e for e in records.read_examples(str(out))}
    assert sorted(built) == ["k0"] and built["k0"].short_caption == "j"
    assert built["k0"].image_bytes == images["jpg"]
    assert records.read_manifest(out)["build"]["skipped"] == {
        "no image bytes": 1, "unreadable or corrupt image": 2, "missing caption": 1,
        "duplicate image": 1}
    assert "k4 (same bytes as k0)" in stdout

    # Hugging Face's Image struct, another caption column, ids FILE:ROW; a corrupt file skipped.
    out2 = tmp_path / "out2"
    code, stdout, stderr = _run(capsys, "build", "--parquet", tmp_path / "p-{1,2}.parquet",
                                "--caption-column", "text", "--out", out2, "--workers", 1,
                                "--no-progress")
    assert code == 0, stderr
    [example] = records.read_examples(str(out2))
    assert (example.id, example.caption, example.image_bytes) == (
        "p-1:0", "hugging face image", images["webp"])
    assert "no image bytes: 1" in stdout and "unreadable input file: 1" in stdout
    assert "p-1:1 (column 'image': no bytes (path 'only/a/path.jpg'))" in stdout

    code, _, stderr = _run(capsys, "build", "--parquet", tmp_path / "p-1.parquet", "--out",
                           tmp_path / "o3", "--no-progress")
    assert code == 2 and "no column 'caption' (--caption-column); columns: image, text" in stderr


def _save_to_disk(folder, table: pa.Table) -> None:
    """The layout of ``datasets.Dataset.save_to_disk``: Arrow stream files + state.json."""
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=1)
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}))
    (folder / "dataset_info.json").write_text("{}")


def test_hf_dataset_saved_to_disk(shards, tmp_path, capsys):
    _, images = shards
    _, hf = _table(images)
    _save_to_disk(tmp_path / "ds" / "validation", hf)
    (tmp_path / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "build", "--hf-dataset", tmp_path / "ds", "--hf-split",
                                "validation", "--caption-column", "text", "--out", out,
                                "--workers", 1, "--no-progress")
    assert code == 0, stderr
    [example] = records.read_examples(str(out))
    assert (example.id, example.caption, example.source) == (
        "data-00000-of-00001:0", "hugging face image", "ds")
    assert "no image bytes: 1" in stdout
    code, _, stderr = _run(capsys, "build", "--hf-dataset", tmp_path / "ds", "--out",
                           tmp_path / "o2", "--no-progress")
    assert code == 2 and "no split 'train' (--hf-split); splits: validation" in stderr
    (tmp_path / "not_a_dataset").mkdir()
    code, _, stderr = _run(capsys, "build", "--hf-dataset", tmp_path / "not_a_dataset", "--out",
                           tmp_path / "o3", "--no-progress")
    assert code == 2 and "not a folder written by datasets' save_to_disk" in stderr


def test_other_inputs_never_overlap_the_output(shards, tmp_path, capsys):
    folder, _ = shards
    code, _, stderr = _run(capsys, "build", "--webdataset", f"{folder}/00000.tar", "--out",
                           folder, "--overwrite", "--no-progress")
    assert code == 2 and "contains the input --webdataset" in stderr
    assert (folder / "00000.tar").exists()
    code, _, stderr = _run(capsys, "build", "--webdataset", f"{folder}/00000.tar", "--captions",
                           tmp_path / "c.jsonl", "--out", tmp_path / "o", "--no-progress")
    assert code == 2 and "--captions goes with --images only" in stderr


def test_missing_shard_in_a_range_is_skipped(shards, tmp_path, capsys):
    folder, _ = shards
    (folder / "00002.tar").rename(folder / "00003.tar")  # 00002 missing in 00000..00003
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "build", "--webdataset", f"{folder}/{{00000..00003}}.tar",
                                "--out", out, "--workers", 1, "--no-progress")
    assert code == 0, stderr
    assert "unreadable input file: 2" in stdout and "00002.tar (FileNotFoundError" in stdout
    code, _, stderr = _run(capsys, "build", "--webdataset", f"{folder}/{{00000..00004}}.tar",
                           "--out", tmp_path / "o2", "--no-progress")
    assert code == 2 and "00004.tar: no such file" in stderr


def test_tfds_array_record_dataset(shards, tmp_path, capsys):
    """A TFDS dataset with an Image feature and a sequence of captions, prepared as ArrayRecord
    (no TensorFlow involved), read by feature name."""
    import numpy as np
    import tensorflow_datasets as tfds
    from etils import epath

    _, images = shards
    pictures = [images["png"], images["jpg"], b"not an image"]

    class Pictures(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):  # as in lens_jax.data.tfds_builder: no importlib_resources lookup
            return epath.Path(__file__)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="png"),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                "image/id": tfds.features.Scalar(np.int64)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, data in enumerate(pictures):
                yield i, {"image": data, "image/id": 100 + i,
                          "captions": {"text": [f"first caption {i}", f"second {i}"]}}

    Pictures(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "build", "--tfds", f"tfds:pictures:train@{tmp_path}/tfds",
                                "--caption-column", "captions/text", "--id-column", "image/id",
                                "--out", out, "--workers", 1, "--no-progress")
    assert code == 0, stderr
    built = {e.id: e for e in records.read_examples(str(out))}
    assert sorted(built) == ["100", "101"] and built["101"].image_bytes == images["jpg"]
    assert built["100"].caption == "first caption 0" and built["100"].source == "pictures"
    assert "unreadable or corrupt image: 1" in stdout and "102 (not an image file" in stdout
    code, _, stderr = _run(capsys, "build", "--tfds", f"tfds:pictures@{tmp_path}/tfds", "--out",
                           tmp_path / "o2", "--no-progress")
    assert code == 2 and "no column 'caption' (--caption-column); columns: captions/text" in stderr
