"""``lens-data build`` reads WebDataset shards and parquet from gs:// (issue 17 point 2), through
the in-memory emulator on 127.0.0.1."""

import io

import pyarrow as pa
import pyarrow.parquet as pq

from lens_jax import storage
from lens_jax.data import cli, records
from tests.data.test_build_inputs import _img, _tar


def test_build_from_gs_webdataset_and_parquet(gcs_bucket, tmp_path, capsys):
    for i in range(2):
        data = _tar(tmp_path / f"{i:05d}.tar", [(f"{i}.png", _img("PNG", color=(i, 0, 0))),
                                                (f"{i}.txt", f"image {i}".encode())])
        storage.write_bytes(f"{gcs_bucket}/shards/{i:05d}.tar", data)
    code = cli.main(["build", "--webdataset", f"{gcs_bucket}/shards/{{00000..00001}}.tar",
                     "--out", str(tmp_path / "wds"), "--workers", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert sorted((e.id, e.caption) for e in records.read_examples(str(tmp_path / "wds"))) == [
        ("00000/0", "image 0"), ("00001/1", "image 1")]
    # A gs:// output on Beam: shards written under gs://.../.wds.tmp-ID, then copied, manifest last.
    code = cli.main(["build", "--webdataset", f"{gcs_bucket}/shards/{{00000..00001}}.tar",
                     "--out", f"{gcs_bucket}/records/wds", "--workers", "1", "--num-shards", "2"])
    assert code == 0, capsys.readouterr().err
    assert storage.listdir(f"{gcs_bucket}/records") == ["wds"]  # no temporary folder left
    assert storage.listdir(f"{gcs_bucket}/records/wds") == sorted(
        [records.shard_name("data", i, 2) for i in range(2)] + [records.MANIFEST_NAME])
    assert sorted(e.id for e in records.read_examples(f"{gcs_bucket}/records/wds")) == [
        "00000/0", "00001/1"]

    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": [_img("JPEG")], "caption": ["a jpeg"]}), buffer)
    storage.write_bytes(f"{gcs_bucket}/pq/part-0.parquet", buffer.getvalue())
    code = cli.main(["build", "--parquet", f"{gcs_bucket}/pq/*.parquet", "--out",
                     str(tmp_path / "pq"), "--workers", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    [example] = records.read_examples(str(tmp_path / "pq"))
    assert (example.id, example.caption, example.source) == ("part-0:0", "a jpeg", "pq")
