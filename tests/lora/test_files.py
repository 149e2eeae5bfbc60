"""LoRA files against the PyTorch reference (tests/reference) with peft, merging, both spellings,
and refusals. fp32 throughout; tolerance: the adapted denoiser's output agrees with the PyTorch
reference + peft to 2e-4 absolute on outputs of size ~1 (the plain converter tests' order)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lens_jax.lora import adapters as adapters_lib
from lens_jax.lora import keys
from lens_jax.errors import LoraFileError
from lens_jax.lora.files import merge_lora, read_lora, write_lora

ATOL = 2e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny reference model, its diffusers folder, inputs, and random adapters (B != 0)."""
    from configs import tiny
    from tests.reference.checkpoints import reference_from_config, write_diffusers_folder

    cfg = tiny.get_model_config()
    ref = reference_from_config(cfg, seed=3)
    folder = write_diffusers_folder(ref, cfg, tmp_path_factory.mktemp("lora") / "base")
    spec = adapters_lib.LoraSpec(rank=4, alpha=8.0, targets=tuple(keys.TARGETS))
    from lens_jax.checkpoints.transformer import load_transformer

    blocks = jax.tree.map(np.asarray, _blocks(load_transformer(folder)))
    lora = adapters_lib.init_adapters(jax.random.PRNGKey(1), spec, blocks)
    rng = np.random.default_rng(0)
    lora = {p: {"lora_a": np.asarray(v["lora_a"]),
                "lora_b": (0.2 * rng.standard_normal(v["lora_b"].shape)).astype(np.float32)}
            for p, v in lora.items()}
    h, w, n_txt = 4, 6, 5
    inputs = dict(
        latents=rng.standard_normal((2, h * w, cfg.in_channels)).astype(np.float32),
        feats=[rng.standard_normal((2, n_txt, cfg.enc_hidden_dim)).astype(np.float32)
               for _ in cfg.selected_layer_index],
        t=np.array([0.3, 0.8], np.float32), hw=(h, w),
        mask=np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool))
    return dict(cfg=cfg, folder=folder, spec=spec, lora=lora, inputs=inputs)


def _blocks(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model.blocks, nnx.Param))


def _jax_out(model, inputs, adapters=None):
    i = inputs
    return np.asarray(model(jnp.asarray(i["latents"]), [jnp.asarray(f) for f in i["feats"]],
                            jnp.asarray(i["t"]), i["hw"], jnp.asarray(i["mask"]), adapters=adapters))


def test_exported_file_in_peft_matches_adapter(base, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from lens_jax.checkpoints.transformer import load_transformer
    from tests.reference.checkpoints import reference_from_config

    model = load_transformer(base["folder"])
    with_adapter = _jax_out(model, base["inputs"], adapters_lib.scanned(base["lora"], base["spec"]))
    plain = _jax_out(model, base["inputs"])
    assert np.abs(with_adapter - plain).max() > 1e-2  # the adapter does change the output

    out = write_lora(tmp_path / "peft", base["lora"], base["spec"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert set(config["target_modules"]) == set(keys.TARGETS)
    ref = reference_from_config(base["cfg"], seed=3)
    ref = inject_adapter_in_model(LoraConfig.from_pretrained(str(out)), ref)
    result = set_peft_model_state_dict(ref, load_file(out / "pytorch_lora_weights.safetensors"))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    i = base["inputs"]
    with torch.no_grad():
        torch_out = ref(torch.from_numpy(i["latents"]), [torch.from_numpy(f) for f in i["feats"]],
                        torch.from_numpy(i["mask"]), torch.from_numpy(i["t"]), i["hw"]).numpy()
    np.testing.assert_allclose(with_adapter, torch_out, atol=ATOL, rtol=0)

    # merged at scale 1 = the adapter; kohya and prefixed PEFT spellings of the same numbers merge alike
    merged = merge_lora(load_transformer(base["folder"]), out / "pytorch_lora_weights.safetensors")
    np.testing.assert_allclose(_jax_out(merged, base["inputs"]), with_adapter, atol=1e-5, rtol=0)
    kohya = write_lora(tmp_path / "kohya", base["lora"], base["spec"], "kohya")
    names = list(load_file(kohya / "pytorch_lora_weights.safetensors"))
    assert "lora_unet_transformer_blocks_0_attn_to_out_0.lora_down.weight" in names
    assert read_lora(kohya, base["cfg"]).spelling == "kohya"
    prefixed = tmp_path / "prefixed.safetensors"
    from safetensors.torch import save_file
    save_file({"transformer." + k: v for k, v in
               load_file(out / "pytorch_lora_weights.safetensors").items()}, str(prefixed),
              metadata={"lora_adapter_metadata": json.dumps(config)})
    want = jax.tree.map(np.asarray, _blocks(merged))
    for other in (kohya, prefixed):
        got = jax.tree.map(np.asarray, _blocks(merge_lora(load_transformer(base["folder"]), other)))
        for p in want:
            for k in want[p]:
                np.testing.assert_array_equal(got[p][k], want[p][k], err_msg=f"{other} {p}")


def test_scale_and_default_alpha(base, tmp_path):
    from safetensors.numpy import save_file

    from lens_jax.checkpoints.transformer import load_transformer
    from lens_jax.lora.files import lora_tensors

    # no adapter_config.json, no metadata, no alpha: alpha = r, scale 1 -> half of alpha 8 / r 4
    tensors = lora_tensors(base["lora"], base["spec"])
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    bare = merge_lora(load_transformer(base["folder"]), tmp_path / "bare.safetensors", scale=2.0)
    spec = base["spec"]
    ref = merge_lora(load_transformer(base["folder"]),
                     write_lora(tmp_path / "cfg", base["lora"], spec), scale=1.0)
    a, b = _blocks(bare), _blocks(ref)
    for p in base["spec"].params:
        np.testing.assert_allclose(np.asarray(a[p]["kernel"]), np.asarray(b[p]["kernel"]), atol=1e-6)


def test_files_that_do_not_fit_are_refused(base, tmp_path):
    from safetensors.numpy import save_file

    from lens_jax.lora.files import lora_tensors

    tensors = lora_tensors(base["lora"], base["spec"])
    key = "transformer_blocks.1.img_mlp.w2.lora_A.weight"
    bad = dict(tensors, **{key: np.zeros((4, 7), np.float32)})
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(LoraFileError, match=r"img_mlp\.w2\.lora_A\.weight \(4, 7\).*\[r, 170\]"):
        read_lora(tmp_path / "shape.safetensors", base["cfg"])
    cases = {
        "unknown.safetensors": ({"unet.down.0.lora_A.weight": np.zeros((4, 4), np.float32)},
                                r"neither PEFT.*unet\.down\.0\.lora_A\.weight"),
        "layer.safetensors": ({k.replace("blocks.1.", "blocks.9."): v for k, v in tensors.items()},
                              r"layer 9 does not exist"),
        "module.safetensors": ({"transformer_blocks.0.attn.norm_q.lora_A.weight": np.zeros((4, 16), np.float32),
                                "transformer_blocks.0.attn.norm_q.lora_B.weight": np.zeros((16, 4), np.float32)},
                               r"module 'attn\.norm_q' cannot take a LoRA"),
        "half.safetensors": ({"transformer_blocks.0.attn.img_qkv.lora_A.weight": np.zeros((4, 64), np.float32)},
                             r"img_qkv\.lora_A\.weight: no matching lora_B"),
    }
    for name, (content, message) in cases.items():
        save_file(content, str(tmp_path / name))
        with pytest.raises(LoraFileError, match=message):
            read_lora(tmp_path / name, base["cfg"])


def test_targets_and_key_spellings():
    assert keys.select_targets("attn.*") == ("attn.img_qkv", "attn.txt_qkv", "attn.to_out.0",
                                            "attn.to_add_out")
    assert keys.select_targets("*_mod.1,img_mlp.w2") == ("img_mlp.w2", "img_mod.1", "txt_mod.1")
    with pytest.raises(ValueError, match="'attn.to_q' matches no module"):
        keys.select_targets("attn.to_q")
    for module in keys.TARGETS:
        for which in ("A", "B"):
            assert keys.parse_key(keys.peft_key(7, module, which)) == (7, module, which)
            assert keys.parse_key("diffusion_model." + keys.peft_key(7, module, which)) == (7, module, which)
            assert keys.parse_key(keys.kohya_key(7, module, which)) == (7, module, which)
    assert keys.parse_key("base_model.model.transformer_blocks.3.img_mod.1.lora_B.default.weight") == (
        3, "img_mod.1", "B")
    assert keys.parse_key("lora_unet_transformer_blocks_2_attn_to_add_out.alpha") == (2, "attn.to_add_out", "alpha")


def test_merge_in_step_equals_separate_adapter(base):
    """config.lora.merge_in_step: x (W + s A B) per block gives the adapter's output."""
    import dataclasses

    from lens_jax.checkpoints.transformer import load_transformer

    model = load_transformer(base["folder"])
    separate = _jax_out(model, base["inputs"], adapters_lib.scanned(base["lora"], base["spec"]))
    spec = dataclasses.replace(base["spec"], merge_in_step=True)
    folded = _jax_out(model, base["inputs"], adapters_lib.scanned(base["lora"], spec))
    np.testing.assert_allclose(folded, separate, atol=1e-5, rtol=0)
    assert np.abs(folded - _jax_out(model, base["inputs"])).max() > 1e-2
    i = base["inputs"]

    def loss(lora, s):  # gradients with respect to the adapters agree too
        out = model(jnp.asarray(i["latents"]), [jnp.asarray(f) for f in i["feats"]],
                    jnp.asarray(i["t"]), i["hw"], jnp.asarray(i["mask"]),
                    adapters=adapters_lib.scanned(lora, s))
        return jnp.mean(out ** 2)

    lora = jax.tree.map(jnp.asarray, base["lora"])
    g_sep, g_fold = jax.grad(loss)(lora, base["spec"]), jax.grad(loss)(lora, spec)
    for a, b in zip(jax.tree.leaves(g_sep), jax.tree.leaves(g_fold)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)
