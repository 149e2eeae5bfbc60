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
    assert "``" not in text  # plain text, no reST markup
    for flag in ("--seed", "--batch-size", "--num-images-per-prompt", "--first-index"):
        options = text[text.index("\n  " + flag + " "):]
        entry = options[:options.index("\n  --", 3)]
        assert "(default: " in entry, flag


# Issue 19 point 4: every argument is checked before any weight is read. The model folder does not
# exist, so an error about the argument proves that nothing was loaded; --out is not created.
@pytest.mark.parametrize("flags, message", [
    (["--guidance", "nan"], "--guidance nan: must be a finite number"),
    (["--guidance", "inf"], "--guidance inf: must be a finite number"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--seed", "-1"], "--seed -1: must be in [0, 2^32)"),
    (["--seed", str(2 ** 32)], "must be in [0, 2^32)"),
    (["--first-index", "-3"], "--first-index -3"),
    (["--devices", "9"], "--devices 9: 8 local device(s)"),
    (["--devices", "0"], "--devices 0"),
    (["--date", "next tuesday"], "date 'next tuesday': expected a calendar date as YYYY-MM-DD"),
    (["--date", "2026-13-45"], "date '2026-13-45'"),
    (["--date", "2026-W49-1"], "date '2026-W49-1'"),
])
def test_arguments_are_checked_before_loading(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    rc = cli.main(["--model", str(tmp_path / "no-such-model"), "--prompt", "x", "--out", str(out)]
                  + flags)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def _sidecar(**changes):
    side = {"prompt": "a cube", "negative_prompt": "", "height": 32, "width": 32,
            "num_inference_steps": 2, "guidance_scale": 3.0, "seed": 5, "image_index": 1,
            "date": "2025-06-12"}
    side.update(changes)
    return {k: v for k, v in side.items() if v is not None}


@pytest.mark.parametrize("content, message", [
    (json.dumps(_sidecar(date=None)), "missing field(s) date"),
    (json.dumps(_sidecar(prompt=None, height=None, num_inference_steps=None)),
     "missing field(s) prompt, height, num_inference_steps"),
    (json.dumps([1, 2]), "expected a JSON object written by lens-sample, found a list"),
    (json.dumps(_sidecar(seed="5")), "wrong type: seed ('5')"),
    ("not json {", "not a JSON sidecar"),
    (json.dumps(_sidecar(guidance_scale=float("nan"))), "must be a finite number"),
])
def test_replay_sidecars_are_checked(tmp_path, capsys, content, message):
    replay = tmp_path / "side.json"
    replay.write_text(content)
    rc = cli.main(["--model", str(tmp_path / "no-such-model"), "--replay", str(replay),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    if "JSON" in message:
        assert str(replay) in err  # the file is named


def test_out_may_not_overlap_the_model(tiny_checkpoint, tmp_path, capsys):
    for out in (tiny_checkpoint, tiny_checkpoint / "samples", tiny_checkpoint.parent):
        rc = cli.main(["--model", str(tiny_checkpoint), "--prompt", "x", "--out", str(out)] + ARGS)
        assert rc == 2 and "the input --model" in capsys.readouterr().err
    assert not (tiny_checkpoint / "samples").exists()


def test_replay_file_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    replay = out / "00001.json"
    replay.write_text(json.dumps(_sidecar()))
    rc = cli.main(["--model", str(tmp_path / "m"), "--replay", str(replay), "--out", str(out),
                   "--overwrite"])
    assert rc == 2 and "is one of the files this run writes" in capsys.readouterr().err
    assert json.loads(replay.read_text()) == _sidecar()


def test_truncated_checkpoint_file_is_named_in_one_line(tiny_checkpoint, tmp_path, capsys):
    import shutil

    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    [weights] = sorted((model / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    rc = cli.main(["--model", str(model), "--prompt", "x", "--out", str(out)] + ARGS)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(weights) in err and "truncated" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("name", ["model_index.json", "scheduler/scheduler_config.json"])
def test_malformed_json_of_the_checkpoint_is_named(tiny_checkpoint, tmp_path, capsys, name):
    import shutil

    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    (model / name).write_text('{"_class_name": ')
    rc = cli.main(["--model", str(model), "--prompt", "x", "--out", str(tmp_path / "o")] + ARGS)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{model / name}: not valid JSON" in err and len(err.splitlines()) == 1, err
