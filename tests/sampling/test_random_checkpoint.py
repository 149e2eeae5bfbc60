"""``lens-convert random``: a random Lens checkpoint in the full Hugging Face layout."""

import json

import jax.numpy as jnp
import pytest

from lens_jax.checkpoints import random_checkpoint as rc
from lens_jax.checkpoints.safetensors_io import SafetensorsFolder
from lens_jax.models import config as config_lib


def test_layout_and_configs(tiny_checkpoint):
    root = tiny_checkpoint
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "LensPipeline"
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert name in index and (root / name).is_dir()
    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (sched["use_dynamic_shifting"], sched["time_shift_type"], sched["base_shift"],
            sched["max_shift"], sched["shift"], sched["num_train_timesteps"]) == (
        True, "exponential", 0.5, 1.15, 3.0, 1000)
    te = json.loads((root / "text_encoder" / "config.json").read_text())
    assert te["model_type"] == "gpt_oss" and te["quantization_config"]["quant_method"] == "mxfp4"
    with SafetensorsFolder(root / "text_encoder") as folder:
        assert folder.dtype("model.layers.0.mlp.experts.gate_up_proj_blocks") == "U8"
        assert "lm_head.weight" in folder and "model.norm.weight" in folder


def test_tokenizer_has_harmony_ids(tiny_checkpoint):
    from lens_jax.text import PromptTokenizer
    tok = PromptTokenizer.from_pretrained(tiny_checkpoint)
    for token, token_id in rc.HARMONY_SPECIAL_IDS.items():
        assert tok.tokenizer.token_to_id(token) == token_id
    ids, mask = tok(["A red cube", "Zwei Katzen, 3 Hunde!"], date="2025-06-12")
    assert ids[0, 0] == 200006 and tok.pad_id == 199999 and mask[0].sum() < mask.shape[1]
    assert 0 not in ids[1][mask[1]]  # no [UNK] for Latin-1 text


def test_components_load(tiny_checkpoint):
    from lens_jax.checkpoints.text_encoder import load_text_encoder
    from lens_jax.checkpoints.transformer import load_transformer
    from lens_jax.checkpoints.vae import load_vae
    model = load_transformer(tiny_checkpoint / "transformer")
    assert model.config.num_layers == 2 and model.config.enc_hidden_dim == 32
    encoder = load_text_encoder(tiny_checkpoint, layers=(1, 3), dtype=jnp.float32, progress=False)
    assert encoder.mxfp4
    vae = load_vae(tiny_checkpoint / "vae")
    assert vae.config.latent_channels * 4 == model.config.in_channels
    # Every tensor is random (no zeros / ones left from an initialiser).
    for name, p in zip(("proj_out", "norm_out"), (model.proj_out.kernel, model.norm_out.kernel)):
        assert float(jnp.std(p[...])) > 0, name


def test_streaming_writer_matches_the_layout(tmp_path):
    """The ``full`` preset's path (tensor by tensor, bf16), exercised on the tiny shapes."""
    from lens_jax.checkpoints.transformer import load_transformer
    cfg = config_lib.transformer_config(**rc.PRESETS["tiny"].transformer)
    rc._write_transformer(cfg, tmp_path / "transformer", seed=0, dtype="bfloat16", streaming=True,
                          max_shard_bytes=40_000, progress=False)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load_transformer(tmp_path / "transformer")
    assert model.config.param_dtype == "bfloat16"


def test_full_preset_is_the_real_size():
    from lens_jax.checkpoints.transformer import tensor_count
    cfg = config_lib.transformer_config(**rc.PRESETS["full"].transformer)
    assert tensor_count(cfg) == 1264
    assert 20e9 < rc.estimated_bytes("full") < 25e9
    assert rc.estimated_bytes("tiny") < 50e6


def test_cli_random_refuses_existing(tmp_path, capsys):
    from lens_jax.convert.cli import main
    (tmp_path / "x").mkdir()
    assert main(["random", "--out", str(tmp_path / "x"), "--preset", "tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["random", "--out", str(tmp_path / "y"), "--preset", "huge"])
