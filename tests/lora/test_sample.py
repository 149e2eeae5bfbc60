"""lens-sample --lora and LensPipeline.load_lora on the tiny random checkpoint: PEFT and kohya files
with the same numbers give the same images; a file that does not fit is refused by name."""

import json

import numpy as np
import pytest
from PIL import Image

from lens_jax.sampling import cli

ARGS = ["--size", "32x32", "--steps", "2", "--guidance", "3", "--seed", "5", "--date", "2025-06-12",
        "--no-compilation-cache", "--devices", "1", "--prompt", "a red circle"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from flax import nnx

    from lens_jax.checkpoints.random_checkpoint import write_random_checkpoint
    from lens_jax.checkpoints.transformer import read_config
    from lens_jax.lora import adapters as adapters_lib
    from lens_jax.lora import keys
    from lens_jax.lora.files import write_lora
    from lens_jax.models.transformer import abstract_model

    root = tmp_path_factory.mktemp("lora_sample")
    ckpt = write_random_checkpoint(root / "lens-tiny", preset="tiny", seed=0, progress=False)
    cfg = read_config(ckpt / "transformer")
    blocks = nnx.to_pure_dict(nnx.state(abstract_model(cfg).blocks, nnx.Param))
    spec = adapters_lib.LoraSpec(rank=2, alpha=2.0, targets=tuple(keys.TARGETS))
    shapes = adapters_lib.adapter_shapes(spec, blocks)
    rng = np.random.default_rng(1)
    lora = {p: {k: rng.standard_normal(s).astype(np.float32) for k, s in v.items()}
            for p, v in shapes.items()}
    return dict(ckpt=ckpt, peft=write_lora(root / "peft", lora, spec),
                kohya=write_lora(root / "kohya", lora, spec, "kohya"))


def test_peft_and_kohya_give_the_same_samples(files, tmp_path, capsys):
    images = {}
    for name, extra in (("peft", ["--lora", f"{files['peft']}:0.5"]),
                        ("kohya", ["--lora", f"{files['kohya'] / 'pytorch_lora_weights.safetensors'}:0.5"])):
        out = tmp_path / name
        rc = cli.main(["--model", str(files["ckpt"]), "--out", str(out)] + ARGS + extra)
        assert rc == 0, capsys.readouterr().err
        images[name] = np.asarray(Image.open(out / "00000.png"))
    side = json.loads((tmp_path / "peft" / "00000.json").read_text())
    assert side["loras"] == [{"file": str(files["peft"]), "scale": 0.5}]
    np.testing.assert_array_equal(images["peft"], images["kohya"])  # (that a file changes the
    # weights is checked below and in test_files.py)


def test_load_lora_merges_and_refuses_misfits(files, tmp_path, capsys):
    from safetensors.numpy import save_file

    from lens_jax.errors import LoraFileError
    from lens_jax.sampling.pipeline import LensPipeline

    pipe = LensPipeline.from_pretrained(files["ckpt"], devices=1, compilation_cache=False)
    before = np.asarray(pipe.transformer.blocks.img_mod.kernel[...])
    bad = tmp_path / "bad.safetensors"
    save_file({"transformer_blocks.0.attn.img_qkv.lora_A.weight": np.zeros((2, 65), np.float32),
               "transformer_blocks.0.attn.img_qkv.lora_B.weight": np.zeros((192, 2), np.float32)},
              str(bad))
    with pytest.raises(LoraFileError, match=r"img_qkv\.lora_A\.weight \(2, 65\)"):
        pipe.load_lora(bad)
    np.testing.assert_array_equal(np.asarray(pipe.transformer.blocks.img_mod.kernel[...]), before)
    pipe.load_lora(files["peft"], 0.25)
    assert pipe.loras == ((str(files["peft"]), 0.25),)
    assert np.abs(np.asarray(pipe.transformer.blocks.img_mod.kernel[...]) - before).max() > 0
    rc = cli.main(["--model", str(files["ckpt"]), "--out", str(tmp_path / "o"), "--lora", str(bad)]
                  + ARGS)
    assert rc == 2 and "lora_A.weight (2, 65)" in capsys.readouterr().err
    assert cli.main(["--model", str(files["ckpt"]), "--out", str(tmp_path / "o"),
                     "--lora", str(tmp_path / "missing.safetensors:0.5")] + ARGS) == 2
    assert "missing.safetensors not found" in capsys.readouterr().err
