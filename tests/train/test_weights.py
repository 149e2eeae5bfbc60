"""Weights in (config.init_from = a diffusers folder) and out (lens-train export -> diffusers folder)."""

import jax
import numpy as np

from tests.train.helpers import tiny_config


def _flat(tree):
    from lens_jax.checkpoints import keymap

    return {k: np.asarray(v) for k, v in keymap.flatten(jax.device_get(tree)).items()}


def test_init_from_and_export_roundtrip(tmp_path):
    from flax import nnx

    from lens_jax.checkpoints.transformer import load_transformer, model_params, save_transformer
    from lens_jax.models.transformer import LensTransformer
    from lens_jax.train.checkpoint import Checkpointer
    from lens_jax.train.export import main as export_main
    from lens_jax.train.trainer import Trainer

    # a "converted PyTorch checkpoint": a diffusers folder with every tensor random
    config = tiny_config(zero_init_modulation=False)
    source = LensTransformer(config.model, rngs=nnx.Rngs(7))
    save_transformer(source, tmp_path / "pretrained")
    config.init_from = str(tmp_path / "pretrained")
    trainer = Trainer(config)
    state = trainer.init_state()
    want = {k: np.asarray(v) for k, v in model_params(source).items()}
    for name in ("params", "ema"):
        got = _flat(state[name])
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])

    # a run directory with one checkpoint whose EMA differs from its raw parameters
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    state["ema"] = jax.tree.map(lambda x: x * 0.5, state["ema"])
    ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint)
    ckpt.save(3, state)
    ckpt.wait()
    ckpt.close()
    for flag, name in (("--ema", "ema"), ("--raw", "params")):
        out = tmp_path / f"export_{name}"
        assert export_main(["--workdir", str(workdir), "--step", "3", flag, "--out", str(out)]) == 0
        exported = {k: np.asarray(v) for k, v in model_params(load_transformer(out)).items()}
        expected = _flat(state[name])
        for k in expected:
            np.testing.assert_array_equal(exported[k], expected[k])
    assert export_main(["--workdir", str(workdir), "--step", "9", "--out", str(tmp_path / "x")]) == 2
