"""The newcomer demo (lens_jax/demo.py, ``make demo``) end to end at a minimal size.

A few training steps on 40 tiny records, 4 evaluation prompts, 2 sampler steps: checks that every
output the demo promises exists and is well formed (the real run's scores are in docs/demo.md).
"""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lens_jax import demo

CATEGORIES = ("object_present", "count", "colour", "single_object_colour", "shape", "position",
              "region", "colour_binding")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["--out", str(out), "--train-num", "40", "--heldout-num", "16", "--eval-num", "4",
            "--sample-steps", "2", "--heldout-batches", "1", "--grid", "4",
            "--config.num_steps=3", "--config.data.rows_per_host", "2", "--config.logging.every=1",
            "--config.samples.every=0"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert demo.main(argv) == 0
    return out, json.loads((out / "summary.json").read_text()), printed.getvalue()


def test_outputs_exist(demo_run):
    out, summary, _ = demo_run
    o = {k: Path(v) for k, v in summary["outputs"].items()}
    for key in ("train_records", "heldout_records"):
        assert (o[key] / "lens_records.json").is_file(), key
    prompts = [json.loads(l) for l in o["eval_prompts"].read_text().splitlines()]
    assert len(prompts) == 4
    # --short-captions scene, --placement grid, --aspect square (the defaults): prompts and records
    # name each object's ninth and the background; every object at the centre of its own ninth,
    # every image square
    from lens_jax.data.records import read_examples, read_manifest
    from lens_jax.data.synth_shapes import GRID_SIZE_CLASS, caption_short

    assert (summary["short_captions"], summary["placement"], summary["aspect"]) == (
        "scene", "grid", "square")
    assert all(p["short_caption"] == caption_short(p["layout"], "scene") for p in prompts)
    assert all(p["width"] == p["height"] == 128 for p in prompts)
    example = next(iter(read_examples(o["train_records"])))
    layout = json.loads(example.metadata)["layout"]
    assert example.short_caption == caption_short(layout, "scene")
    assert (example.width, example.height) == (128, 128)
    assert all(obj["size"] == GRID_SIZE_CLASS for obj in layout["objects"])
    settings = read_manifest(o["train_records"])["synth_shapes"]
    assert (settings["placement"], settings["aspect"]) == ("grid", "square")
    metrics = [json.loads(l) for l in o["metrics"].read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics)
    assert any(o["tensorboard"].iterdir())
    grid = np.asarray(Image.open(o["grid"]))
    assert grid.ndim == 3 and grid.shape[1] > grid.shape[0]
    for which in ("trained", "untrained"):
        pngs = sorted(o[f"samples_{which}"].glob("*.png"))
        assert len(pngs) == 4
        for png, p in zip(pngs, prompts):
            assert Image.open(png).size == (p["width"], p["height"])
            side = json.loads(png.with_suffix(".json").read_text())
            assert side["layout"] == p["layout"] and side["model"] == which
        report = json.loads(o[f"scores_{which}"].read_text())
        assert set(CATEGORIES) <= set(report["categories"]) and report["num_images"] == 4
        assert set(CATEGORIES) | {"overall"} == set(summary["scores"][which])
    # configs/demo.py asks for data.tokenizer = "words": the driver writes the word-level tokenizer
    # into the output folder and the run trains (and samples) with it
    run_config = json.loads((o["workdir"] / "config.json").read_text())
    assert run_config["data"]["tokenizer"] == f"json:{out / 'word_tokenizer.json'}"
    from tokenizers import Tokenizer

    words = Tokenizer.from_file(str(out / "word_tokenizer.json"))
    assert words.encode("a purple circle and two blue squares").ids.count(0) == 0  # no [UNK]
    losses = json.loads(o["heldout_loss"].read_text())
    assert set(losses) == {"0", "3"}
    assert set(summary["timings_s"]) >= {"data", "train", "heldout_loss", "sample", "score", "export", "total"}
    assert [(r["objects"], r["category"]) for r in summary["targets"]] == [
        (objects, category) for objects, category, _ in demo.TARGETS]
    by_count = summary["scores_by_object_count"]["trained"]
    assert set(by_count) <= {"1", "2", "3", "4"} and by_count
    assert all(set(cats) == set(CATEGORIES) for cats in by_count.values())


def test_by_object_count_table_reads_the_reports():
    cell = lambda score: {"score": score, "passed": 0, "prompts": 0}
    reports = {"trained": {"by_object_count": {"1": {"single_object_colour": cell(0.9), "shape": cell(0.5)},
                                               "2": {"count": cell(0.25), "position": cell(None)}}},
               "untrained": {"by_object_count": {}}}
    table = demo.by_object_count_table(reports, rows=(("1", "single_object_colour"), ("1", "shape"),
                                                      ("2", "count"), ("2", "position")))
    lines = table.splitlines()
    assert lines[0].split() == ["objects:", "category", "trained", "untrained"]
    assert lines[1].split() == ["1:", "single_object_colour", "0.900", "n/a"]
    assert lines[3].split() == ["2:", "count", "0.250", "n/a"]
    assert lines[4].split() == ["2:", "position", "n/a", "n/a"]



def test_target_check_reads_issue_18s_targets():
    cell = lambda score: {"score": score, "passed": 0, "prompts": 0}
    reports = {"trained": {"by_object_count": {"1": {"single_object_colour": cell(0.9), "shape": cell(0.59)},
                                               "2": {"count": cell(0.4), "position": cell(None)}}},
               "untrained": {"by_object_count": {"1": {"shape": cell(0.1)}}}}
    rows = {(r["objects"], r["category"]): r for r in demo.target_check(reports)}
    assert set(rows) == {("1", "single_object_colour"), ("1", "shape"), ("2", "count"), ("2", "position")}
    assert rows["1", "single_object_colour"]["met"] and rows["2", "count"]["met"]  # at the bound
    assert not rows["1", "shape"]["met"] and rows["1", "shape"]["untrained"] == 0.1
    assert not rows["2", "position"]["met"] and rows["2", "position"]["trained"] == 0.0  # no score


def test_export_loads_back(demo_run):
    out, summary, _ = demo_run
    folder = Path(summary["outputs"]["exported_transformer"])
    assert (folder / "config.json").is_file()
    assert summary["export_check"]["equal"] and summary["export_check"]["max_rel_err"] <= 1e-6
    import lens_jax

    model = lens_jax.load_transformer(str(folder))
    assert model.config.in_channels == summary_model_channels(out)


def summary_model_channels(out: Path) -> int:
    return json.loads((out / "run" / "config.json").read_text())["model"]["in_channels"]


def test_the_run_ends_with_the_targets_and_what_the_task_leaves_out(demo_run):
    _, summary, printed = demo_run
    tail = printed[printed.rindex("7/7 done"):]
    for row in summary["targets"]:
        assert f"target: {row['category']} on {row['objects']}-object prompts >= {row['at_least']}" in tail
    assert tail.rstrip().endswith(demo.TASK_IS_EASIER)


def test_rerun_reuses_finished_run(demo_run, capsys):
    """A second run in the same folder reuses the records and does not retrain."""
    out, summary, _ = demo_run
    from lens_jax.demo import make_records

    make_records(Path(summary["outputs"]["train_records"]), 40, 0,
                 *demo.data_sizes(demo.load_config(demo.DEFAULT_CONFIG)), short_style="scene",
                 placement="grid", aspect="square")
    assert "reusing" in capsys.readouterr().out


def test_bad_override_is_reported(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--config.num_step=1"]) == 2
    err = capsys.readouterr().err
    assert "num_step" in err and "did you mean --config.num_steps" in err
    assert demo.main(["--out", str(tmp_path), "--config.num_steps=many"]) == 2
    assert "--config.num_steps=many" in capsys.readouterr().err


def test_config_flags_as_lens_train_reads_them(tmp_path):
    """The demo's config flags are lens-train's: ``--config FILE[:ARG]``, ``--config.FIELD=VALUE``
    and ``--config.FIELD VALUE``, with the types of the config's fields."""
    from lens_jax.train import config_files

    path, overrides, rest = config_files.split_config_args(
        ["run", "--config", f"{demo.ABLATION_CONFIG}:short", "--config.num_steps", "7",
         "--config.optimizer.lr=0.5", "--out", "x"])
    assert (path, rest) == (f"{demo.ABLATION_CONFIG}:short", ["run", "--out", "x"])
    config = demo.load_config(path, overrides)
    assert (config.num_steps, config.optimizer.lr, config.data.short_caption_prob) == (7, 0.5, 1.0)


@pytest.mark.parametrize("name,arg", [("demo.py", None), ("ablation_captions.py", "dense"),
                                      ("ablation_captions.py", "short"),
                                      ("ablation_captions.py", "dense_toy_lm"),
                                      ("ablation_captions.py", "short_toy_lm")])
def test_configs_load_and_name_their_command(name, arg):
    path = demo.REPO_ROOT / "configs" / name
    head = path.read_text().splitlines()[:4]
    assert head[0].startswith("#") and any("lens_jax.demo" in l for l in head)
    assert any("lens-train" in l for l in head)
    config = demo.load_config(path if arg is None else f"{path}:{arg}")
    assert config.num_steps > 0 and config.model.in_channels == 4 * config.model.out_channels
    if arg is not None:
        assert config.data.short_caption_prob == (0.0 if arg.startswith("dense") else 1.0)
        toy = arg.endswith("toy_lm")
        assert config.text_encoder.kind == ("gpt_oss" if toy else "embedding")
        assert (config.text_encoder.path == "toy") == toy
    from configs import ablation_captions

    with pytest.raises(ValueError, match="expected one of"):
        ablation_captions.get_config("toy")


def test_word_tokenizer_is_resolved_once(tmp_path):
    """``data.tokenizer = "words"`` -> ``json:OUT/word_tokenizer.json`` for every config asking for
    it; other tokenizers are left alone; the file is written once and reused."""
    configs = [demo.load_config(f"{demo.ABLATION_CONFIG}:{arm}") for arm in ("dense", "short")]
    configs[1].data.tokenizer = "bytes"
    path = demo.resolve_word_tokenizer(configs, tmp_path)
    assert path == tmp_path / "word_tokenizer.json" and path.is_file()
    assert configs[0].data.tokenizer == f"json:{path}" and configs[1].data.tokenizer == "bytes"
    stamp = path.stat().st_mtime_ns
    again = demo.load_config(demo.DEFAULT_CONFIG)
    assert demo.resolve_word_tokenizer([again], tmp_path) == path and path.stat().st_mtime_ns == stamp
    assert demo.resolve_word_tokenizer([configs[1]], tmp_path) is None

