"""Issue 19 points 1, 2 and 6 at the command lines: lens-train's config help and misspelled
fields, plain-text help everywhere, lens-train export's outputs and the workdir lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lens_jax.train import config_files, config_help
from lens_jax.train import cli as train_cli
from lens_jax.train import export

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def _train_main(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["lens-train", *argv])
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def test_misspelled_config_field_is_one_line_with_the_suggestion(tmp_path, capsys):
    code, _, err = _train_main(capsys, "--config", TINY, "--workdir", str(tmp_path / "w"),
                               "--config.optimizer.lrr=1e-3")
    assert code == 2
    assert err.strip() == ("lens-train: error: --config.optimizer.lrr: no such config field; "
                           "did you mean --config.optimizer.lr?")
    assert not (tmp_path / "w").exists()
    assert config_help.check_overrides([f"--config={TINY}", "--config.num_step=3"]).endswith(
        "did you mean --config.num_steps?")
    assert config_help.check_overrides(["--config", TINY, "--config.optimizer.lr=1e-3",
                                        "--config.model.num_layers=3"]) is None


def test_help_config_lists_every_field_with_default_and_comment(capsys):
    code, out, _ = _train_main(capsys, "--config", TINY, "--help_config")
    assert code == 0
    config = config_files.load(TINY)
    leaves = config_files.field_names(config)
    listed = [line.split(" = ")[0].strip() for line in out.splitlines()[1:]]
    assert listed == leaves
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("checkpoint.every ="))
    assert "[1000]" in line and "save every N steps" in line  # tiny's value, default, comment
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("init_from ="))
    assert "run:WORKDIR[:STEP]" in line  # a comment continued on the next source line
    commented = sum(1 for name in leaves if name in config_help.field_comments())
    assert commented >= 0.7 * len(leaves)


def _help_texts():
    from lens_jax.convert import cli as convert_cli
    from lens_jax.data import cli as data_cli
    from lens_jax.eval import cli as eval_cli
    from lens_jax.sampling import cli as sample_cli

    yield "lens-convert", convert_cli.build_parser()
    yield "lens-data", data_cli.build_parser()
    yield "lens-sample", sample_cli.build_parser()
    yield "lens-train export", export.build_parser()
    yield "lens-eval", eval_cli.build_parser()


def test_help_is_plain_text_everywhere():
    import argparse

    for name, parser in _help_texts():
        texts = [parser.format_help()]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                texts += [p.format_help() for p in action.choices.values()]
        for text in texts:
            assert "``" not in text, name
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "lens_jax.train.cli", "--help"], env=env,
                         capture_output=True, text=True, timeout=120).stdout
    assert "--help_config" in out and "``" not in out


# ----------------------------------------------------------------------------- lens-train export

def test_export_never_writes_over_the_run(tmp_path, capsys):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "10").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    for out in (workdir / "checkpoints", workdir / "checkpoints" / "export", workdir,
                workdir / "config.json"):
        assert export.main(["--workdir", str(workdir), "--out", str(out), "--overwrite"]) == 2
        assert "the input --workdir" in capsys.readouterr().err
    assert sorted(p.name for p in workdir.rglob("*")) == ["10", "checkpoints", "config.json"]


def test_export_overwrite_replaces_only_a_diffusers_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(out), "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").exists()


def test_export_into_a_workdir_in_use_is_refused(tmp_path, capsys):
    from lens_jax.train import workdir_lock

    workdir = tmp_path / "run"
    script = ("import sys\nfrom lens_jax.train import workdir_lock\n"
              "lock = workdir_lock.acquire(sys.argv[1], 'lens-train', heartbeat_s=0)\n"
              "print('held', flush=True)\nsys.stdin.read()\nlock.release()\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(workdir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout.readline().strip() == "held"
        rc = export.main(["--workdir", str(workdir), "--out", str(workdir / "exported")])
        err = capsys.readouterr().err
        assert rc == 2 and f"pid {proc.pid}" in err and "in use" in err
    finally:
        proc.communicate("")
    # Free again: the export gets past the lock (and stops at the missing config.json).
    assert export.main(["--workdir", str(workdir), "--out", str(workdir / "exported")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert not (workdir / workdir_lock.LOCK_NAME).exists()
