"""``python -m lens_jax.demo ablation`` (``make ablation``) end to end at a minimal size: one
word-table arm and one toy-LM arm (its own file, so that pytest-xdist's --dist loadfile runs it
beside tests/test_demo.py rather than after it)."""

import json

from lens_jax import demo


def test_ablation_runs_every_arm_it_is_asked_for(tmp_path, monkeypatch):
    """``ablation --arms short,short_toy_lm``: the word-table arm and the toy-LM arm (its encoder
    trained once, 2 steps here) both train, sample in their caption style and are compared."""
    import dataclasses

    from lens_jax.train import toy_text_encoder

    original = toy_text_encoder.train_or_reuse

    def quick(texts, spec, out, settings=toy_text_encoder.ToyLMSettings(), **kw):
        return original(texts, spec, out, dataclasses.replace(settings, steps=2), progress=False, log=kw.get("log", print))

    monkeypatch.setattr(toy_text_encoder, "train_or_reuse", quick)
    argv = ["ablation", "--out", str(tmp_path), "--arms", "short,short_toy_lm", "--train-num", "24",
            "--eval-num", "2", "--sample-steps", "1", "--config.num_steps=2",
            "--config.data.rows_per_host", "2", "--config.data.text_tokens=64"]
    assert demo.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["scores"]) == {"short", "short_toy_lm"}
    assert (tmp_path / "text_encoder" / "config.json").is_file()
    assert "toy_text_encoder" in summary["timings_s"]
    for arm in ("short", "short_toy_lm"):
        assert len(list((tmp_path / "samples" / arm).glob("*.png"))) == 2
