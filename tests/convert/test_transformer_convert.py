"""The denoiser converter: diffusers <-> JAX <-> orbax, bit-identical round trips, clear errors."""

import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lens_jax
from configs import tiny
from lens_jax.convert import cli
from lens_jax.checkpoints.safetensors_io import SafetensorsFolder
from lens_jax.errors import CheckpointError
from lens_jax.checkpoints.transformer import convert, read_config
from tests.conftest import max_rel_err
from tests.reference.checkpoints import reference_from_config, write_diffusers_folder
from tests.models.test_transformer import FP32_MAX_REL, make_inputs, torch_forward


def tensors_of(folder):
    with SafetensorsFolder(folder) as f:
        return {k: f.read(k) for k in f.keys()}


def assert_bit_identical(a, b):
    ta, tb = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert ta[k].shape == tb[k].shape, k
        assert ta[k].tobytes() == tb[k].tobytes(), k


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    cfg = tiny.get_model_config(num_layers=3)
    ref = reference_from_config(cfg, seed=5)
    root = tmp_path_factory.mktemp("src")
    return cfg, ref, {
        "fp32": write_diffusers_folder(ref, cfg, root / "fp32", shards=3),
        "bf16": write_diffusers_folder(ref, cfg, root / "bf16", dtype=torch.bfloat16),
    }


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_jax_round_trip_is_bit_identical(source, tmp_path, precision):
    _, _, folders = source
    model = lens_jax.load_transformer(folders[precision])
    want = jnp.float32 if precision == "fp32" else jnp.bfloat16
    assert model.img_in.kernel[...].dtype == want
    out = lens_jax.save_transformer(model, tmp_path / "out", max_shard_bytes=20_000)
    assert_bit_identical(folders[precision], out)
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "LensTransformer2DModel"
    assert config["num_layers"] == 3 and config["axes_dims_rope"] == [4, 6, 6]
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded


def test_saved_folder_loads_strictly_into_the_reference(source, tmp_path):
    """JAX -> torch direction: load_state_dict(strict=True) proves every tensor is written."""
    cfg, ref, folders = source
    out = lens_jax.save_transformer(lens_jax.load_transformer(folders["fp32"]), tmp_path / "out")
    fresh = reference_from_config(cfg, seed=99)
    state = {k: torch.from_numpy(v) for k, v in tensors_of(out).items()}
    fresh.load_state_dict(state, strict=True)
    hw = (3, 5)
    latents, feats, timesteps = make_inputs(cfg, 2, *hw, 4)
    np.testing.assert_array_equal(torch_forward(fresh, latents, feats, None, timesteps, hw),
                                  torch_forward(ref, latents, feats, None, timesteps, hw))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_orbax_round_trip_streams_and_is_bit_identical(source, tmp_path, precision):
    cfg, ref, folders = source
    orbax_dir = convert(folders[precision], tmp_path / "orbax", to="orbax", progress=False)
    assert sorted(p.name for p in (orbax_dir / "layers").iterdir()) == ["000", "001", "002"]
    back = convert(orbax_dir, tmp_path / "back", to="diffusers", max_shard_bytes=50_000,
                   progress=False)
    assert_bit_identical(folders[precision], back)
    if precision == "fp32":  # the orbax checkpoint loads as a model with the reference's output
        model = lens_jax.load_transformer(orbax_dir)
        hw = (2, 3)
        latents, feats, timesteps = make_inputs(cfg, 2, *hw, 3)
        expected = torch_forward(ref, latents, feats, None, timesteps, hw)
        assert max_rel_err(model(latents, feats, timesteps, hw), expected) <= FP32_MAX_REL


def test_dtype_cast_on_load_and_convert(source, tmp_path):
    _, _, folders = source
    model = lens_jax.load_transformer(folders["fp32"], dtype=jnp.bfloat16)
    assert model.blocks.img_qkv.kernel[...].dtype == jnp.bfloat16
    assert model.config.dtype == "bfloat16"
    out = convert(folders["fp32"], tmp_path / "bf16", to="diffusers", dtype="bfloat16", progress=False)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in tensors_of(out).values())
    assert_bit_identical(folders["bf16"], out)  # torch's fp32 -> bf16 cast rounds the same way


def _mutated(folders, tmp_path, mutate):
    """A copy of the fp32 source, single-file, with ``mutate(state_dict)`` applied."""
    state = {k: torch.from_numpy(v.copy()) for k, v in tensors_of(folders["fp32"]).items()}
    mutate(state)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(folders["fp32"] / "config.json", bad / "config.json")
    save_file(state, str(bad / "diffusion_pytorch_model.safetensors"))
    return bad


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.pop("transformer_blocks.1.attn.norm_q.weight"),
     r"missing tensors: transformer_blocks\.1\.attn\.norm_q\.weight"),
    (lambda s: s.__setitem__("transformer_blocks.0.extra.weight", torch.zeros(2)),
     r"unexpected tensors: transformer_blocks\.0\.extra\.weight"),
    (lambda s: s.__setitem__("img_in.weight", torch.zeros(64, 127)),
     r"tensor 'img_in\.weight' has shape \(64, 127\), expected \(64, 128\)"),
])
def test_bad_checkpoints_name_the_key_and_leave_nothing(source, tmp_path, mutate, message):
    _, _, folders = source
    bad = _mutated(folders, tmp_path, mutate)
    with pytest.raises(CheckpointError, match=message):
        lens_jax.load_transformer(bad)
    with pytest.raises(CheckpointError, match=message):
        convert(bad, tmp_path / "out", to="orbax", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no half-written output


def test_config_that_does_not_match_the_weights(source, tmp_path):
    _, _, folders = source
    bad = tmp_path / "bad"
    shutil.copytree(folders["fp32"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_layers"] = 4
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensors: transformer_blocks\.3\."):
        lens_jax.load_transformer(bad)
    config["num_layers"], config["axes_dims_rope"] = 3, [4, 4, 4]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="must sum to attention_head_dim"):
        read_config(bad)


def test_not_a_checkpoint_and_pickles_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        lens_jax.load_transformer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        lens_jax.load_transformer(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"_class_name": "LensTransformer2DModel"}))
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pickled checkpoints are refused.*safetensors"):
        lens_jax.load_transformer(pickled)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="expected 'LensTransformer2DModel'"):
        lens_jax.load_transformer(tmp_path / "other")


def test_cli(source, tmp_path, capsys):
    _, _, folders = source
    assert cli.main(["to-orbax", "--src", str(folders["bf16"]), "--out", str(tmp_path / "o")]) == 0
    assert cli.main(["to-diffusers", "--src", str(tmp_path / "o"), "--out", str(tmp_path / "d"),
                     "--max-shard-size", "100KB"]) == 0
    assert_bit_identical(folders["bf16"], tmp_path / "d")
    assert cli.main(["inspect", "--src", str(tmp_path / "o")]) == 0
    assert "tensors: 92" in capsys.readouterr().out  # 3 blocks x 26 + 12 + 2 txt_norm
    # an existing output is refused, and the error names it
    assert cli.main(["to-orbax", "--src", str(folders["bf16"]), "--out", str(tmp_path / "o")]) == 2
    assert "already exists" in capsys.readouterr().err
    help_text = subprocess.run([sys.executable, "-m", "lens_jax.convert.cli", "to-diffusers", "--help"],
                               capture_output=True, text=True, check=True).stdout
    for flag in ("--src", "--out", "--dtype", "--overwrite", "--max-shard-size"):
        assert flag in help_text


def test_a_non_default_rope_theta_survives_export_and_load(tmp_path):
    """diffusers hard-codes RoPE theta 10000; a toy model trained with another theta writes it as
    ``lens_jax_rope_theta`` (the released value writes nothing extra) and loads back exactly."""
    from flax import nnx

    from lens_jax.models import config as config_lib
    from lens_jax.models.transformer import LensTransformer

    assert config_lib.EXTRA_THETA_KEY not in config_lib.to_diffusers_config(tiny.get_model_config())
    cfg = tiny.get_model_config(num_layers=1, rope_theta=100.0, dtype="float32", zero_init_modulation=False)
    model = LensTransformer(cfg, rngs=nnx.Rngs(3))
    out = lens_jax.save_transformer(model, tmp_path / "theta100")
    assert json.loads((out / "config.json").read_text())[config_lib.EXTRA_THETA_KEY] == 100.0
    loaded = lens_jax.load_transformer(out)
    assert loaded.config.rope_theta == 100.0
    latents, feats, timesteps = make_inputs(cfg, 1, 4, 6, 5)
    args = (jnp.asarray(latents), [jnp.asarray(f) for f in feats], jnp.asarray(timesteps), (4, 6))
    np.testing.assert_array_equal(np.asarray(model(*args)), np.asarray(loaded(*args)))
    cfg_default = tiny.get_model_config(num_layers=1, dtype="float32", zero_init_modulation=False)
    default = LensTransformer(cfg_default, rngs=nnx.Rngs(3))  # same weights, theta 10000
    assert not np.array_equal(np.asarray(default(*args)), np.asarray(loaded(*args)))
