"""``lens-data build`` on Apache Beam's DirectRunner: the same bytes, skip report and shard layout
as the local build; nothing left under the output name when it fails."""

import os
import socket
import tempfile

import pytest
from PIL import Image

from lens_jax.data import beam_build, build, cli, records


def _save(path, size, fmt, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 good images (2 pairs of equal bytes) and 5 bad ones, with .txt captions."""
    root = tmp_path_factory.mktemp("beam") / "imgs"
    for i in range(10):
        j = i % 8  # images 8 and 9 repeat 0 and 1: duplicates
        _save(root / f"{i:02d}.png", (16 + 8 * (j % 3), 24), "PNG", (20 * j, 100, 200))
        (root / f"{i:02d}.txt").write_text(f"picture number {i}")
    _save(root / "nocap.png", (8, 8), "PNG", (1, 2, 3))
    _save(root / "empty.png", (8, 8), "PNG", (1, 2, 4))
    (root / "empty.txt").write_text(" ")
    (root / "fake.png").write_bytes(b"not an image")
    (root / "fake.txt").write_text("fake")
    (root / "cut.png").write_bytes((root / "00.png").read_bytes()[:60])
    (root / "cut.txt").write_text("cut")
    _save(root / "anim.gif", (8, 8), "GIF", (1, 2, 5))
    return root


def _files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("num_shards,workers", [(3, 1), (20, 2)])
def test_same_bytes_and_report_as_local_build(folder, tmp_path, num_shards, workers):
    items = build.folder_items(folder)
    local = build.write_items(items, tmp_path / "local", what="imgs", num_shards=num_shards,
                              source="s", dedup=True)
    # Parts of 3 items: the order across parts and workers must not depend on the runner.
    report, counters = beam_build.run(beam_build.chunks(items, 3), beam_build.read_list,
                                      tmp_path / "beam", what="imgs", num_shards=num_shards,
                                      source="s", dedup=True, workers=workers)
    assert _files(tmp_path / "beam") == _files(tmp_path / "local")
    assert report.format() == local.format()
    assert report.summary() == {"written": 8, "skipped": {
        "duplicate image": 2, "empty caption": 1, "missing caption": 1,
        "unreadable or corrupt image": 2, "unsupported image format": 1}}
    # The Beam metrics counters count the same (one per reason, and the records written).
    assert counters == {**report.counts(), beam_build.WRITTEN: 8}
    assert len(records.list_shards(tmp_path / "beam")) == min(num_shards, 8)
    assert sorted(os.listdir(tmp_path)) == ["beam", "local"]  # no temporary folder left


def test_default_runner_stays_local(folder, tmp_path, monkeypatch):
    """The DirectRunner build runs on Beam's FnApiRunner: it never tries Prism, which looks up
    github.com for a binary at run time and, offline, leaves a beam-temp* folder behind."""
    looked_up = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        looked_up.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    options = beam_build.pipeline_options([], workers=1)
    assert type(beam_build.local_runner(options)).__name__ == "FnApiRunner"
    assert beam_build.local_runner(beam_build.pipeline_options(["--runner", "DataflowRunner"])) is None
    report, _ = beam_build.run(beam_build.chunks(build.folder_items(folder), 3), beam_build.read_list,
                               tmp_path / "beam", what="imgs", workers=1)
    assert report.summary()["written"] == 10
    assert [h for h in looked_up if h not in ("localhost", "127.0.0.1", "::1")] == []
    assert os.listdir(scratch) == []


def test_cli_default_runner_is_beam_and_matches_local(folder, tmp_path, capsys):
    common = ["build", "--images", str(folder), "--num-shards", "2", "--dedup", "--workers", "1"]
    assert cli.main([*common, "--out", str(tmp_path / "beam")]) == 0
    beam_out = capsys.readouterr().out
    assert cli.main([*common, "--out", str(tmp_path / "local"), "--runner", "local",
                     "--no-progress"]) == 0
    local_out = capsys.readouterr().out
    assert _files(tmp_path / "beam") == _files(tmp_path / "local")
    assert beam_out.replace("beam", "local") == local_out
    assert "  duplicate image: 2\n    08.png (same bytes as 00.png)" in beam_out


def test_failure_leaves_no_output(folder, tmp_path):
    def broken(part):
        yield from part
        raise OSError("disk on fire")

    items = build.folder_items(folder)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="disk on fire"):
        beam_build.run(beam_build.chunks(items, 4), broken, out, what="imgs")
    assert os.listdir(tmp_path) == []  # no output, no temporary folder
    # An existing output is left as it was when the rebuild fails.
    beam_build.run([items[:8]], beam_build.read_list, out, what="imgs")
    before = _files(out)
    with pytest.raises(Exception, match="disk on fire"):
        beam_build.run([items], broken, out, what="imgs", overwrite=True)
    assert _files(out) == before and os.listdir(tmp_path) == ["out"]
    # Every image skipped: an error with the report, nothing written.
    bad = [it for it in items if it.id in ("fake.png", "cut.png")]
    with pytest.raises(records.RecordError, match="every image was skipped") as e:
        beam_build.run([bad], beam_build.read_list, tmp_path / "none", what="imgs")
    assert "unreadable or corrupt image: 2" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_input_error_is_raised_as_record_error(tmp_path):
    def missing_column(part):
        raise records.RecordError(f"{part}: no column 'caption' (--caption-column)")
        yield

    with pytest.raises(records.RecordError, match="p1.parquet: no column 'caption'"):
        beam_build.run(["p1.parquet"], missing_column, tmp_path / "out", what="pq")
    assert os.listdir(tmp_path) == []


def test_pipeline_options_pass_through(folder, tmp_path, capsys):
    options = beam_build.pipeline_options(
        ["--runner", "DataflowRunner", "--project", "p", "--region", "us-central1",
         "--temp_location", "gs://b/tmp", "--setup_file", "./setup.py"], workers=4).get_all_options()
    assert (options["runner"], options["project"], options["region"], options["setup_file"]) == (
        "DataflowRunner", "p", "us-central1", "./setup.py")
    direct = beam_build.pipeline_options([], workers=4).get_all_options()
    assert (direct["runner"], direct["direct_num_workers"], direct["direct_running_mode"]) == (
        "DirectRunner", 4, "multi_processing")
    given = beam_build.pipeline_options(["--direct_num_workers", "3"], workers=4).get_all_options()
    assert given["direct_num_workers"] == 3
    # Unknown flags go to Beam for build only; --runner local takes none.
    with pytest.raises(SystemExit):
        cli.main(["inspect", str(tmp_path), "--project", "p"])
    assert "unrecognized arguments: --project p" in capsys.readouterr().err
    assert cli.main(["build", "--images", str(folder), "--out", str(tmp_path / "o"),
                     "--runner", "local", "--project", "p"]) == 2
    assert "--runner local takes no Beam pipeline options: --project p" in capsys.readouterr().err
