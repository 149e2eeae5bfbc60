"""``lens-data build`` / ``inspect`` / ``--help`` on small folders."""

import csv
import json

import pytest
from PIL import Image

from lens_jax.data import cli, records


def _save(path, size, fmt, color=(10, 120, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path.read_bytes()


@pytest.fixture
def image_folder(tmp_path):
    """3 good images (JPEG, PNG in a sub-folder, WebP) and 5 bad ones, with .txt captions."""
    root = tmp_path / "imgs"
    good = {
        "a.jpg": _save(root / "a.jpg", (64, 48), "JPEG"),
        "sub/b.png": _save(root / "sub" / "b.png", (32, 64), "PNG"),
        "c.webp": _save(root / "c.webp", (40, 40), "WEBP"),
    }
    (root / "a.txt").write_text("a blue picture with things in it\n")
    (root / "sub" / "b.txt").write_text("a tall blue picture")
    (root / "sub" / "b.short.txt").write_text("tall blue")
    (root / "c.webp.txt").write_text("a square blue picture")
    _save(root / "nocap.png", (16, 16), "PNG")                       # missing caption
    _save(root / "empty.png", (16, 16), "PNG")
    (root / "empty.txt").write_text("  \n")                           # empty caption
    (root / "corrupt.jpg").write_bytes(good["a.jpg"][:300])          # truncated JPEG
    (root / "corrupt.txt").write_text("broken")
    (root / "fake.png").write_bytes(b"this is not an image")          # not an image at all
    (root / "fake.txt").write_text("fake")
    _save(root / "anim.gif", (16, 16), "GIF")                         # unsupported format
    return root, good


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_build_txt_pairs_report_and_records(image_folder, tmp_path, capsys):
    root, good = image_folder
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "build", "--images", root, "--out", out, "--num-shards", 2,
                           "--workers", 1, "--source", "unit", "--no-progress")
    assert code == 0
    assert "written: 3" in stdout and "skipped: 5" in stdout
    for line in ("missing caption: 1", "empty caption: 1", "unreadable or corrupt image: 2",
                 "unsupported image format: 1", "nocap.png", "corrupt.jpg", "fake.png",
                 "anim.gif"):
        assert line in stdout, line
    manifest = records.read_manifest(out)
    assert manifest["build"] == {"written": 3, "skipped": {
        "empty caption": 1, "missing caption": 1, "unreadable or corrupt image": 2,
        "unsupported image format": 1}}
    examples = {e.id: e for e in records.read_examples(str(out))}
    assert set(examples) == set(good)
    for key, data in good.items():
        assert examples[key].image_bytes == data  # stored byte for byte
        assert examples[key].source == "unit"
    assert (examples["a.jpg"].width, examples["a.jpg"].height) == (64, 48)
    assert (examples["sub/b.png"].width, examples["sub/b.png"].height) == (32, 64)
    assert examples["sub/b.png"].short_caption == "tall blue"
    assert examples["a.jpg"].caption == "a blue picture with things in it"
    assert json.loads(examples["c.webp"].metadata)["format"] == "webp"

    # An existing output folder is refused (exit code 2, message on stderr).
    code, _, stderr = _run(capsys, "build", "--images", root, "--out", out, "--no-progress")
    assert code == 2 and "already exists" in stderr


def test_build_captions_files_parallel(image_folder, tmp_path, capsys):
    root, good = image_folder
    jsonl = tmp_path / "caps.jsonl"
    rows = [{"path": "a.jpg", "caption": "from jsonl", "short_caption": "j"},
            {"image": "sub/b.png", "text": "alias keys", "metadata": {"license": "cc0"}},
            {"path": "c.webp", "caption": ""},
            {"path": "missing.png", "caption": "no such file"},
            {"path": "a.jpg", "caption": "twice"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out_jsonl"
    code, stdout, _ = _run(capsys, "build", "--images", root, "--captions", jsonl, "--out", out,
                           "--workers", 2, "--no-progress")
    assert code == 0
    assert "written: 2" in stdout
    summary = records.read_manifest(out)["build"]["skipped"]
    # not in the file: nocap, empty, corrupt, fake (.png/.jpg) -> missing caption; gif unsupported
    assert summary == {"empty caption": 1, "image file missing": 1, "duplicate entry": 1,
                       "missing caption": 4, "unsupported image format": 1}
    examples = {e.id: e for e in records.read_examples(str(out))}
    assert examples["a.jpg"].caption == "from jsonl" and examples["a.jpg"].short_caption == "j"
    assert json.loads(examples["sub/b.png"].metadata) == {"format": "png", "license": "cc0"}

    # CSV without a header: path, caption, short_caption.
    csv_path = tmp_path / "caps.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([["a.jpg", "csv caption, with a comma", "s"],
                                 [str(root / "c.webp"), "absolute path"]])
    out_csv = tmp_path / "out_csv"
    code, stdout, _ = _run(capsys, "build", "--images", root, "--captions", csv_path, "--out",
                           out_csv, "--workers", 1, "--no-progress")
    assert code == 0 and "written: 2" in stdout
    examples = {e.id: e for e in records.read_examples(str(out_csv))}
    assert examples["a.jpg"].caption == "csv caption, with a comma"
    assert examples["c.webp"].caption == "absolute path"


def test_build_nothing_usable(tmp_path, capsys):
    root = tmp_path / "imgs"
    _save(root / "x.png", (8, 8), "PNG")
    out = tmp_path / "out"
    code, _, stderr = _run(capsys, "build", "--images", root, "--out", out, "--workers", 1,
                           "--no-progress")
    assert code == 2 and "every image was skipped" in stderr and "missing caption: 1" in stderr
    assert not out.exists()
    code, _, stderr = _run(capsys, "build", "--images", tmp_path / "nope", "--out", out)
    assert code == 2 and "nope: image folder not found" in stderr


def test_inspect(image_folder, tmp_path, capsys):
    root, _ = image_folder
    out = tmp_path / "out"
    assert _run(capsys, "build", "--images", root, "--out", out, "--num-shards", 2, "--workers",
                1, "--source", "unit", "--no-progress")[0] == 0
    code, stdout, _ = _run(capsys, "inspect", out, "--examples", 2)
    assert code == 0
    assert "records: 3 in 2 shard(s)" in stdout
    assert "data.array_record-00000-of-00002: 2" in stdout
    # caption words: 7 ("a blue picture with things in it"), 4, 4
    assert "dense caption words: min 4, mean 5.0, median 4, max 7" in stdout
    assert "short caption words: min 2, mean 2.0, median 2, max 2 (2 without" in stdout
    for text in ("64x48", "32x64", "40x40", "1:2", "4:3", "1:1", "jpeg", "png", "webp", "unit"):
        assert text in stdout, text
    assert stdout.count("example ") == 2
    code, _, stderr = _run(capsys, "inspect", tmp_path / "missing")
    assert code == 2 and "missing" in stderr


def test_aspect_bins():
    assert cli.aspect_bin(352, 704) == "1:2"
    assert cli.aspect_bin(1024, 576) == "16:9"
    assert cli.aspect_bin(100, 100) == "1:1"
    assert cli.aspect_bin(300, 100) == ">2:1"
    assert cli.aspect_bin(100, 300) == "<1:2"


@pytest.mark.parametrize("command", ["build", "inspect", "synth-shapes", "tfds-prepare",
                                     "caption"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"
        for flag in action.option_strings:
            assert flag in text


# ---------------------------------------------------------------------------------------------
# Issue 19 point 5: bad records are skipped and counted, never fatal; point 2: outputs vs inputs.


def test_undecodable_caption_files_are_skipped_and_named(image_folder, tmp_path, capsys):
    root, _ = image_folder
    (root / "c.webp.txt").write_bytes(b"caf\xe9 latin-1 caption")
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "build", "--images", root, "--out", out, "--workers", 1,
                           "--no-progress")
    assert code == 0 and "written: 2" in stdout
    assert "caption not UTF-8: 1" in stdout and str(root / "c.webp.txt") in stdout
    assert records.read_manifest(out)["build"]["skipped"]["caption not UTF-8"] == 1


def test_undecodable_jsonl_line_is_skipped_and_named(image_folder, tmp_path, capsys):
    root, _ = image_folder
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_bytes(b'{"path": "a.jpg", "caption": "fine"}\n'
                      b'{"path": "c.webp", "caption": "caf\xe9"}\n')
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "build", "--images", root, "--captions", jsonl, "--out", out,
                           "--workers", 1, "--no-progress")
    assert code == 0 and "written: 1" in stdout
    assert "caption not UTF-8: 1" in stdout and f"{jsonl}:2" in stdout


def test_malformed_csv_rows_are_counted_not_merged(image_folder, tmp_path, capsys):
    root, _ = image_folder
    csv_path = tmp_path / "caps.csv"
    csv_path.write_text('path,caption\n'
                        'a.jpg,"an unterminated quote\n'
                        'sub/b.png,a tall blue picture\n'
                        'c.webp,a square,with,too many fields\n')
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "build", "--images", root, "--captions", csv_path, "--out", out,
                           "--workers", 1, "--no-progress")
    assert code == 0 and "written: 1" in stdout
    assert "malformed captions row: 2" in stdout
    assert f"{csv_path}:2" in stdout and f"{csv_path}:4" in stdout
    [example] = records.read_examples(str(out))
    assert (example.id, example.caption) == ("sub/b.png", "a tall blue picture")


def test_build_and_pipeline_share_the_largest_image(image_folder, tmp_path, capsys, monkeypatch):
    from lens_jax.data import build

    root, _ = image_folder
    assert records.MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS  # PIL's default bomb limit
    # The build reads the one constant (lowered here so a test image is "too large").
    monkeypatch.setattr(build, "MAX_IMAGE_PIXELS", 40 * 40)
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "build", "--images", root, "--out", out, "--workers", 1,
                           "--no-progress")
    assert code == 0 and "image too large: 2" in stdout  # a.jpg 64x48, sub/b.png 32x64
    assert [e.id for e in records.read_examples(str(out))] == ["c.webp"]

    # The training pipeline reads the same constant of lens_jax.data.records.
    import numpy as np

    from lens_jax.data.pipeline import make_pipeline
    from tests.data.test_pipeline import ListSource, _example, _tiny_config

    rng = np.random.default_rng(0)
    monkeypatch.setattr(records, "MAX_IMAGE_PIXELS", 60 * 60)
    raws = [records.encode_example(_example(rng, i, width=w, height=48))
            for i, w in enumerate((48, 96, 48, 80))]
    it = make_pipeline(_tiny_config(num_epochs=1), source=ListSource(raws))
    try:
        arrived = sorted(int(i) for b in it for i in b["example_index"].ravel() if i >= 0)
    finally:
        it.close()
    assert arrived == [0, 2]
    assert it.skip_counts()["too_large"] == 2


def test_no_empty_shards(image_folder, tmp_path, capsys):
    root, _ = image_folder
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "build", "--images", root, "--out", out, "--num-shards", 10,
                           "--workers", 1, "--no-progress")
    assert code == 0 and "(3 shard(s)" in stdout
    shards = records.list_shards(str(out))
    assert len(shards) == 3 and all(len(records.open_source([s])) == 1 for s in shards)


@pytest.mark.parametrize("where", ["inside", "same", "parent", "captions_inside"])
def test_build_output_never_overlaps_inputs(image_folder, tmp_path, capsys, where):
    root, _ = image_folder
    captions = root / "caps.jsonl"
    captions.write_text(json.dumps({"path": "a.jpg", "caption": "x"}) + "\n")
    out = {"inside": root / "records", "same": root, "parent": tmp_path,
           "captions_inside": tmp_path / "o"}[where]
    if where == "captions_inside":
        out.mkdir()
        captions = out / "caps.jsonl"
        captions.write_text(json.dumps({"path": "a.jpg", "caption": "x"}) + "\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, stderr = _run(capsys, "build", "--images", root, "--captions", captions, "--out", out,
                           "--overwrite", "--workers", 1, "--no-progress")
    assert code == 2 and "the input --" in stderr, stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_only_records(image_folder, tmp_path, capsys):
    root, _ = image_folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("keep")
    code, _, stderr = _run(capsys, "build", "--images", root, "--out", out, "--overwrite",
                           "--workers", 1, "--no-progress")
    assert code == 2 and "notes.md" in stderr and (out / "notes.md").exists()
    (out / "notes.md").unlink()
    for _ in range(2):  # a folder of records may be replaced
        assert _run(capsys, "build", "--images", root, "--out", out, "--overwrite", "--workers",
                    1, "--no-progress")[0] == 0


# ---------------------------------------------------------------------------------------------
# Issue 17 point 4: --dedup drops exact duplicate images.


def test_dedup_drops_identical_bytes(image_folder, tmp_path, capsys):
    root, good = image_folder
    (root / "copy").mkdir()
    (root / "copy" / "a2.jpg").write_bytes(good["a.jpg"])
    (root / "copy" / "a2.txt").write_text("the same picture, another caption")
    (root / "copy" / "c2.webp").write_bytes(good["c.webp"])
    (root / "copy" / "c2.txt").write_text("again")
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "build", "--images", root, "--out", out, "--workers", 2,
                           "--dedup", "--no-progress")
    assert code == 0 and "written: 3" in stdout and "duplicate image: 2" in stdout
    assert "copy/a2.jpg (same bytes as a.jpg)" in stdout
    assert records.read_manifest(out)["build"]["skipped"]["duplicate image"] == 2
    assert {e.id for e in records.read_examples(str(out))} == set(good)
    # Without --dedup both copies are kept.
    code, stdout, _ = _run(capsys, "build", "--images", root, "--out", tmp_path / "all",
                           "--workers", 1, "--no-progress")
    assert code == 0 and "written: 5" in stdout and "duplicate image" not in stdout
