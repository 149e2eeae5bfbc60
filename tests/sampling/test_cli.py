"""``lens-sample`` on the tiny random checkpoint: PNG + JSON sidecar per image, replay, errors."""

import json

import numpy as np
import pytest
from PIL import Image

from lens_jax.sampling import cli
from tests.sampling.conftest import DATE

ARGS = ["--size", "32x32", "--steps", "2", "--guidance", "3", "--seed", "5", "--date", DATE,
        "--batch-size", "2", "--no-compilation-cache", "--devices", "1"]


def test_sample_writes_images_and_sidecars(tiny_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "two cats", "negative_prompt": "blurry"}) + "\n\n")
    out = tmp_path / "out"
    rc = cli.main(["--model", str(tiny_checkpoint), "--prompt", "a red cube on a wooden table",
                   "--prompts-file", str(prompts), "--out", str(out)] + ARGS)
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["00000.json", "00000.png", "00001.json", "00001.png"]
    side = json.loads((out / "00001.json").read_text())
    assert (side["prompt"], side["negative_prompt"], side["seed"], side["image_index"], side["size"],
            side["num_inference_steps"], side["guidance_scale"], side["date"], side["model"]) == (
        "two cats", "blurry", 5, 1, "32x32", 2, 3.0, DATE, str(tiny_checkpoint))
    assert side["lens_jax_version"] and side["preset"] == "lens"
    assert Image.open(out / "00000.png").size == (32, 32)

    # Replaying a sidecar regenerates the same image (same batch shape: the batch is filled).
    again = tmp_path / "again"
    assert cli.main(["--model", str(tiny_checkpoint), "--replay", str(out / "00001.json"),
                     "--out", str(again), "--batch-size", "2", "--no-compilation-cache",
                     "--devices", "1"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again / "00001.png")),
                                  np.asarray(Image.open(out / "00001.png")))
    # Existing files are not overwritten silently.
    assert cli.main(["--model", str(tiny_checkpoint), "--prompt", "x", "--out", str(out)] + ARGS) == 2
    assert "already exist" in capsys.readouterr().err


def test_bad_input_is_reported(tiny_checkpoint, tmp_path, capsys):
    base = ["--model", str(tiny_checkpoint), "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--prompt", "x", "--size", "30x32"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert cli.main(base) == 2
    assert "at least one --prompt" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    assert cli.main(base + ["--prompts-file", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(base + ["--prompt", "x", "--size", "32x32", "--bucket", "1024:1:1"])


def test_help_mentions_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--prompts-file", "--negative-prompt", "--preset", "--size",
                 "--bucket", "--steps", "--guidance", "--seed", "--batch-size", "--out", "--replay"):
        assert flag in text
