"""Issue 19 for lens-convert: outputs never destroy inputs, leftovers of killed runs, umask,
Ctrl-C, and an inspect that checks the files themselves."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from lens_jax import output_guard
from lens_jax.convert import cli
from lens_jax.checkpoints import transformer as tconv
from lens_jax.checkpoints.random_checkpoint import PRESETS, _write_transformer
from lens_jax.models import config as config_lib


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A checkpoint root holding transformer/ (tiny random, streamed: no model built) and vae/."""
    root = tmp_path_factory.mktemp("pristine") / "ckpt"
    cfg = config_lib.transformer_config(**PRESETS["tiny"].transformer)
    _write_transformer(cfg, root / "transformer", 0, "float32", streaming=True,
                       max_shard_bytes=400_000, progress=False)  # sharded: index + 4 files
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text("{}")
    return root


@pytest.fixture
def ckpt(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "ckpt")


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("out", [".", "transformer", "transformer/inner"])
def test_output_over_the_source_is_refused_and_nothing_moves(ckpt, capsys, out):
    before = tree(ckpt)
    rc = cli.main(["to-orbax", "--src", str(ckpt / "transformer"), "--out", str(ckpt / out),
                   "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and "the input --src" in err and len(err.strip().splitlines()) == 1, err
    assert tree(ckpt) == before


def test_overwrite_replaces_only_a_folder_the_command_wrote(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = cli.main(["to-diffusers", "--src", str(ckpt / "transformer"), "--out", str(out),
                   "--overwrite"])
    assert rc == 2 and "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert cli.main(["to-diffusers", "--src", str(ckpt / "transformer"), "--out", str(out),
                     "--overwrite"]) == 0
    assert cli.main(["to-diffusers", "--src", str(ckpt / "transformer"), "--out", str(out),
                     "--overwrite"]) == 0  # its own output may be replaced


def test_random_overwrite_keeps_foreign_files(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "data.csv").write_text("x")
    assert cli.main(["random", "--out", str(out), "--overwrite"]) == 2
    assert "data.csv" in capsys.readouterr().err and (out / "data.csv").exists()


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_runs_are_cleaned_or_reported(ckpt, tmp_path, caplog):
    out = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{_dead_pid()}@{socket.gethostname()}-abc123xy"
    foreign = tmp_path / ".out.tmp-77@other-host-zzzzzzzz"
    old_style = tmp_path / ".out.tmp-k2j4h5g6"
    for d in (dead, foreign, old_style):
        d.mkdir()
    with caplog.at_level(logging.WARNING, logger="lens_jax.output_guard"):
        assert cli.main(["to-orbax", "--src", str(ckpt / "transformer"), "--out", str(out)]) == 0
    assert not dead.exists() and "deleted" in caplog.text
    assert foreign.exists() and old_style.exists()
    assert "process 77 on other-host" in caplog.text and f"rm -r '{old_style}'" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == sorted(
        [foreign.name, old_style.name])


def test_output_follows_the_umask(ckpt, tmp_path):
    previous = os.umask(0o002)
    try:
        tconv.convert(ckpt / "transformer", tmp_path / "o", to="diffusers", progress=False)
    finally:
        os.umask(previous)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o775
    assert (tmp_path / "o" / "config.json").stat().st_mode & 0o777 == 0o664


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_swallowed_by_a_library_still_stops_the_conversion(ckpt, tmp_path, capsys,
                                                                     monkeypatch, signum):
    real_save = tconv._orbax_save

    def save_that_swallows(path, tree):  # what orbax's event loop does with a KeyboardInterrupt
        try:
            os.kill(os.getpid(), signum)
        except KeyboardInterrupt:
            pass
        real_save(path, tree)

    monkeypatch.setattr(tconv, "_orbax_save", save_that_swallows)
    # The handlers the process had before (an xdist worker may start with SIGINT ignored).
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    rc = cli.main(["to-orbax", "--src", str(ckpt / "transformer"), "--out", str(tmp_path / "o")])
    after = {s: signal.getsignal(s) for s in before}
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]  # no output, no temporary folder
    assert after == before  # handlers restored


def test_sigterm_of_a_conversion_leaves_no_temporary(ckpt, tmp_path):
    script = ("import os, signal, sys\n"
              "from lens_jax.checkpoints import transformer as t\n"
              "from lens_jax.convert import cli\n"
              "real = t._orbax_save\n"
              "def save(p, tree):\n"
              "    real(p, tree)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "t._orbax_save = save\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "to-orbax", "--src",
                           str(ckpt / "transformer"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]


# ----------------------------------------------------------------------------- inspect

def _inspect(src, capsys):
    rc = cli.main(["inspect", "--src", str(src)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_inspect_checks_a_good_checkpoint(ckpt, tmp_path, capsys):
    rc, out, _ = _inspect(ckpt / "transformer", capsys)
    assert rc == 0 and "all present, shapes checked" in out
    assert cli.main(["to-orbax", "--src", str(ckpt / "transformer"), "--out", str(tmp_path / "o")]) == 0
    rc, out, _ = _inspect(tmp_path / "o", capsys)
    assert rc == 0 and "orbax" in out


def _shards(folder):
    return sorted(folder.glob("*.safetensors"))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"),
    ("pickle", "pickled checkpoints are refused"),
    ("drop_shard", "points to missing file"),
    ("garbage_header", "truncated or not a safetensors file"),
    ("num_layers_two", 'num_layers is "two", expected an integer >= 1'),
    ("config_list", "expected a JSON object, found list"),
])
def test_inspect_fails_on_a_broken_checkpoint(ckpt, capsys, damage, message):
    folder = ckpt / "transformer"
    shard = _shards(folder)[-1]
    if damage == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[:len(data) // 2])
    elif damage == "pickle":
        for f in folder.glob("*.safetensors*"):
            f.unlink()
        (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    elif damage == "drop_shard":
        shard.unlink()
    elif damage == "garbage_header":
        shard.write_bytes(b"\xff" * 64)
    elif damage == "num_layers_two":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(config, num_layers="two")))
    elif damage == "config_list":
        (folder / "config.json").write_text("[1, 2]")
    rc, _, err = _inspect(folder, capsys)
    assert rc == 2 and message in err, err
    assert "Traceback" not in err
    if damage in ("truncate", "garbage_header"):
        assert str(shard) in err and len(err.strip().splitlines()) == 1


def test_inspect_fails_on_a_broken_orbax_checkpoint(ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["to-orbax", "--src", str(ckpt / "transformer"), "--out", str(out)]) == 0
    shutil.rmtree(out / "layers" / "001")
    rc, _, err = _inspect(out, capsys)
    assert rc == 2 and "layers/001: missing orbax item" in err


def test_truncated_file_is_named_when_converting(ckpt, tmp_path, capsys):
    shard = _shards(ckpt / "transformer")[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    rc = cli.main(["to-orbax", "--src", str(ckpt / "transformer"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and str(shard) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_check_output_cases(tmp_path):
    src = tmp_path / "a" / "b"
    src.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    for out in (src, tmp_path / "a", src / "c", tmp_path / "link" / "b"):
        with pytest.raises(output_guard.OutputError):
            output_guard.check_output(out, {"--src": src})
    output_guard.check_output(tmp_path / "a" / "bb", {"--src": src})  # a sibling is fine
    output_guard.check_output(tmp_path / "x", {"--src": None, "--other": ""})
    with pytest.raises(output_guard.OutputError, match="lies inside"):
        output_guard.check_output("gs://b/run/out", {"--src": "gs://b/run"})


def test_wrong_config_types_are_one_line_errors_for_every_component(tmp_path):
    from lens_jax.checkpoints import text_encoder, vae
    from lens_jax.checkpoints.random_checkpoint import _TINY_TEXT, text_encoder_config_json
    from lens_jax.errors import CheckpointError
    from lens_jax.models.text_encoder import GptOssConfig

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"layers_per_block": "two"}))
    with pytest.raises(CheckpointError, match=r'vae/config.json: layers_per_block is "two", '
                                              "expected an integer$"):
        vae.load_vae(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [16, "x"]}))
    with pytest.raises(CheckpointError, match="expected a list of integers"):
        vae.load_vae(tmp_path / "vae")
    (tmp_path / "te").mkdir()
    config = dict(text_encoder_config_json(GptOssConfig(**_TINY_TEXT)), num_hidden_layers="two")
    (tmp_path / "te" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"te/config.json: .*'two'"):
        text_encoder.read_config(tmp_path / "te")


def test_file_cut_after_the_check_is_still_named(ckpt):
    from lens_jax.checkpoints.safetensors_io import SafetensorsFolder
    from lens_jax.errors import CheckpointError

    folder = SafetensorsFolder(ckpt / "transformer")
    key = folder.keys()[-1]
    path = folder.file_of(key)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{path}: cannot read tensor"):
        folder.read(key)
