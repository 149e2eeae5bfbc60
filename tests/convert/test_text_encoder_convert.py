"""Loading GPT-OSS folders: transformers-saved dense checkpoints, MXFP4 modes, bad input."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.errors import CheckpointError
from lens_jax.checkpoints.text_encoder import load_text_encoder
from lens_jax.models.text_encoder import random_params
from tests.conftest import max_rel_err
from tests.models.test_text_encoder import (HF_TINY, SELECTED, batch, reference_hidden, tiny_config,
                                            write_checkpoint)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_transformers_saved_dense_checkpoint(tmp_path, rng):
    """A dense GptOssForCausalLM saved by transformers itself (save_pretrained) loads and matches."""
    from transformers import GptOssConfig as HFGptOssConfig, GptOssForCausalLM

    hf_config = HFGptOssConfig(**{k: v for k, v in HF_TINY.items() if k != "architectures"})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GptOssForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" not in name else 0.1) + ("norm" in name))
    model.save_pretrained(tmp_path / "dense")
    ids, mask = batch(rng)
    expected = reference_hidden(model.model, ids, mask, layers=(0, 2))
    encoder = load_text_encoder(tmp_path / "dense", layers=(0, 2), dtype=jnp.float32, progress=False)
    assert not encoder.mxfp4  # dense checkpoint stays dense even with mxfp4=True
    assert encoder.layers.q_kernel[...].shape[0] == 3  # only layers up to the deepest selected one
    valid = mask.astype(bool)
    for a, e in zip(encoder(ids, mask), expected):
        assert max_rel_err(np.asarray(a)[valid], e[valid]) <= 1e-4


def test_mxfp4_dequantized_at_load_equals_packed(tmp_path, rng):
    params = random_params(tiny_config(), 4, True, np.float32, seed=5, scale=0.1)
    folder = write_checkpoint(tmp_path / "lens" / "text_encoder", params, True)
    # A Lens checkpoint root resolves to its text_encoder/ folder.
    packed = load_text_encoder(tmp_path / "lens", layers=SELECTED, dtype=jnp.float32, progress=False)
    dense = load_text_encoder(folder, layers=SELECTED, dtype=jnp.float32, mxfp4=False, progress=False)
    assert dense.layers.gate_up[...].shape == (4, 8, 64, 128)
    ids, mask = batch(rng)
    for a, b in zip(packed(ids, mask), dense(ids, mask)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_not_gpt_oss_is_refused(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(CheckpointError, match="model_type is 'clip_text_model', expected 'gpt_oss'"):
        load_text_encoder(tmp_path / "clip", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_text_encoder(tmp_path / "empty", progress=False)


def test_bad_layers_and_shapes(tmp_path):
    params = random_params(tiny_config(), 4, False, np.float32, seed=7)
    folder = write_checkpoint(tmp_path / "te", params, False)
    with pytest.raises(ValueError, match=r"out of range 0..3"):
        load_text_encoder(folder, layers=(1, 4), progress=False)
    config = dict(HF_TINY, hidden_size=32)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape"):
        load_text_encoder(folder, layers=(1,), progress=False)
