"""``python -m lens_jax.demo lora`` (``make demo-lora``) end to end at a minimal size.

A 3-step tiny base run, then the LoRA subcommand on it (3 LoRA steps, 2 prompts, 2 sampler steps):
checks that the pieces connect (the new colour in the records' captions and in the extended
tokenizer with the old ids kept, before/after scores of both prompt sets, the exported LoRA file,
the printed table). The real run's figures, which show the learning, are in docs/demo.md.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from lens_jax import demo

TINY = ["--config.data.rows_per_host", "2", "--config.logging.every=1", "--config.samples.every=0"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from lens_jax.data.synth_shapes import write_dataset

    # the base: a 2-step run of configs/demo.py laid out as make demo leaves it (OUT/run,
    # OUT/word_tokenizer.json), without make demo's sampling, scoring and export
    base = tmp_path_factory.mktemp("base")
    overrides = ["--config.num_steps=2"] + TINY
    config = demo.load_config(demo.DEFAULT_CONFIG, overrides)
    demo.resolve_word_tokenizer([config], base)
    config.data.path = str(base / "data")
    write_dataset(config.data.path, 16, 0, *demo.data_sizes(config), short_style="places")
    demo.train_run(config, base / "run", demo.DEFAULT_CONFIG, overrides)
    out = tmp_path_factory.mktemp("lora")
    assert demo.main(["lora", "--base", str(base), "--out", str(out), "--concept", "lime",
                      "--train-num", "16", "--eval-num", "2", "--sample-steps", "2",
                      "--config.num_steps=3", "--config.checkpoint.every=3"] + TINY) == 0
    return base, out, json.loads((out / "summary.json").read_text())


def test_records_and_tokenizer_carry_the_new_colour(lora_run):
    from tokenizers import Tokenizer

    from lens_jax.data.records import read_examples

    base, out, summary = lora_run
    examples = list(read_examples(summary["outputs"]["train_records"]))
    # about 2/3 of the records (synth_shapes.NEW_COLOR_RECORD_SHARE) name the new colour, in their
    # caption exactly when their layout holds it; the others keep the old colours
    named = ["lime" in ex.short_caption.split() for ex in examples]
    held = [any(o["color"] == "lime" for o in json.loads(ex.metadata)["layout"]["objects"])
            for ex in examples]
    assert len(examples) == 16 and named == held and 6 <= sum(named) <= 15
    # the base run trained on 'places' short captions (make demo's default): the LoRA's records and
    # held-out prompts use the same style
    from lens_jax.data.synth_shapes import caption_short

    assert all(ex.short_caption == caption_short(json.loads(ex.metadata)["layout"], "places")
               for ex in examples)
    prompts = [json.loads(l) for l in (out / "eval_prompts_lime.jsonl").read_text().splitlines()]
    assert prompts and all(p["short_caption"] == caption_short(p["layout"], "places") for p in prompts)
    assert summary["new_words"] == ["lime"]
    old = Tokenizer.from_file(str(base / "word_tokenizer.json"))
    new = Tokenizer.from_file(summary["outputs"]["word_tokenizer"])
    assert new.get_vocab() == old.get_vocab() | {"lime": old.get_vocab_size()}
    assert old.encode("a lime circle").ids.count(0) == 1  # [UNK] for the base run
    assert new.encode("a lime circle").ids == [old.token_to_id("a"), old.get_vocab_size(),
                                               old.token_to_id("circle")]
    run_config = json.loads((Path(summary["outputs"]["workdir"]) / "config.json").read_text())
    assert run_config["init_from"] == f"run:{base / 'run'}" and run_config["lora"]["rank"] == 8
    assert run_config["data"]["tokenizer"] == f"json:{summary['outputs']['word_tokenizer']}"


def test_scores_before_and_after(lora_run):
    _, out, summary = lora_run
    assert set(summary["scores"]) == {"lime_before", "lime_after", "old_before", "old_after"}
    for key in summary["scores"]:
        report = json.loads(Path(summary["outputs"][f"scores_{key}"]).read_text())
        assert report["num_images"] == 2
        assert report["categories"]["single_object_colour"]["prompts"] == 2
        assert report["config"]["extra_colors"] == ["lime"]  # old prompts: lime found too
        layouts = [r["layout"] for r in map(json.loads, sorted(
            p.read_text() for p in Path(summary["outputs"][f"samples_{key}"]).glob("*.json")))]
        colors = {o["color"] for layout in layouts for o in layout["objects"]}
        assert (colors == {"lime"}) == key.startswith("lime")


def test_lora_file_and_table(lora_run, capsys):
    from safetensors.numpy import load_file

    _, out, summary = lora_run
    lora_dir = Path(summary["outputs"]["lora"])
    tensors = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("attn.txt_qkv.lora_A.weight") for k in tensors)
    assert all(np.isfinite(v).all() for v in tensors.values())
    assert json.loads((lora_dir / "adapter_config.json").read_text())["r"] == 8
    table = summary["table"].splitlines()
    assert "before (base)" in table[0] and "after (+LoRA)" in table[0]
    assert sum(line.startswith("new: lime") for line in table) == 3
    assert sum(line.startswith("old colours") for line in table) == 3


def test_scorer_palette_adds_held_out_colours_only_when_named():
    """A generator layout is scored with the eight colours (make demo's scores unchanged); a layout
    naming a held-out colour finds it."""
    from lens_jax.data.synth_shapes import (BACKGROUND_COLORS, HELD_OUT_COLORS, OBJECT_COLORS,
                                            render_layout, with_new_color)
    from lens_jax.eval.layout import (COLOR_NAMES, ScoreConfig, make_eval_set, palette,
                                      score_image)

    layout = make_eval_set(1, seed=3, base_size=96, groups=(512,))[0].layout
    assert palette(layout) == COLOR_NAMES
    cyan = with_new_color(layout, np.random.default_rng(0), "cyan")
    assert palette(cyan) == COLOR_NAMES + ("cyan",)
    image = render_layout(cyan)
    assert score_image(image, cyan)["categories"]["single_object_colour"] is True
    assert {d["color"] for d in score_image(image, cyan)["detections"]} == {"cyan"}
    # the same cyan image against the original layout: cyan is no object colour there, unless
    # the config adds it (lens-eval layout --held-out-colors cyan)
    assert score_image(image, layout)["categories"]["object_present"] is False
    found = score_image(image, layout, ScoreConfig(extra_colors=("cyan",)))
    assert [d["color"] for d in found["detections"]] == ["cyan"]
    assert found["categories"]["single_object_colour"] is False
    with pytest.raises(ValueError, match="not held-out colours"):
        palette(layout, ScoreConfig(extra_colors=("red",)))
    others = list(OBJECT_COLORS.values()) + list(BACKGROUND_COLORS.values())
    assert min(np.linalg.norm(np.subtract(c, o)) for c in HELD_OUT_COLORS.values() for o in others) > 95


def test_unknown_base_is_reported(tmp_path, capsys):
    assert demo.main(["lora", "--base", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no finished demo run" in capsys.readouterr().err


def test_config_is_the_demo_model_with_adapters():
    """configs/demo_lora.py adapts exactly the demo's model (init_from=run: checks the shapes) on
    the demo's data settings, and names its commands."""
    head = demo.LORA_CONFIG.read_text().splitlines()[:4]
    assert head[0].startswith("#") and any("lens_jax.demo lora" in l for l in head)
    assert any("lens-train" in l for l in head)
    config, base = demo.load_config(demo.LORA_CONFIG), demo.load_config(demo.DEFAULT_CONFIG)
    assert config.model.to_dict() == base.model.to_dict()
    assert config.data.to_dict() == base.data.to_dict()
    assert config.text_encoder.to_dict() == base.text_encoder.to_dict()
    assert config.lora.rank > 0 and config.ema.decay == 0 and config.init_from == ""


def test_other_concept_in_the_same_out_is_refused(lora_run, capsys):
    """A finished LoRA run is reused by a rerun, so a rerun with another concept must not be."""
    base, out, _ = lora_run
    assert demo.main(["lora", "--base", str(base), "--out", str(out), "--concept", "cyan",
                      "--train-num", "16"]) == 2
    assert "choose another --out" in capsys.readouterr().err
