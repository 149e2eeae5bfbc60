"""GPT-OSS text encoder: parity with transformers' GptOssModel, MXFP4, sharding, loading errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lens_jax.checkpoints.keymap import torch_tensors
from lens_jax.checkpoints.safetensors_io import ShardedWriter
from lens_jax.checkpoints.text_encoder import load_text_encoder, text_encoder_mappings
from lens_jax.models.text_encoder import (GptOssConfig, TextEncoder, random_params, resolve_rope,
                                          rope_frequencies)
from tests.conftest import max_rel_err, rel_l2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SELECTED = (1, 3)
# Tiny GPT-OSS: 4 layers (sliding, full, sliding, full), window 4 < sequence 12, GQA 4/2 heads,
# top-4 of 8 experts, a low SwiGLU clamp so the clamp is exercised, YaRN RoPE.
HF_TINY = {
    "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "vocab_size": 96,
    "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "intermediate_size": 64, "num_local_experts": 8, "num_experts_per_tok": 4,
    "rms_norm_eps": 1e-5, "sliding_window": 4, "swiglu_limit": 0.75, "attention_bias": True,
    "layer_types": ["sliding_attention", "full_attention"] * 2, "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                        "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                        "truncate": False},
    "pad_token_id": 95, "eos_token_id": 94, "tie_word_embeddings": False,
}
MXFP4_QUANT = {"quant_method": "mxfp4",
               "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                          "model.embed_tokens", "lm_head"]}
LENGTHS = (12, 7, 3)


def tiny_config() -> GptOssConfig:
    return GptOssConfig.from_hf(HF_TINY)


def batch(rng):
    ids = rng.integers(0, 94, size=(len(LENGTHS), max(LENGTHS)))
    mask = np.arange(max(LENGTHS))[None, :] < np.asarray(LENGTHS)[:, None]
    ids = np.where(mask, ids, HF_TINY["pad_token_id"]).astype(np.int32)
    return ids, mask


def write_checkpoint(folder, params, packed: bool, dtype=np.float32, hf=HF_TINY):
    """A transformers-layout GptOssForCausalLM folder (several shards + index) from JAX params."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(hf)
    if packed:
        config["quantization_config"] = MXFP4_QUANT
    (folder / "config.json").write_text(json.dumps(config))
    writer = ShardedWriter(folder, "model", max_shard_bytes=200_000)
    mappings = text_encoder_mappings(GptOssConfig.from_hf(hf), hf["num_hidden_layers"], packed)
    for key, tensor in torch_tensors(params, mappings):
        writer.add(key, tensor if tensor.dtype == np.uint8 else tensor.astype(dtype))
    rng = np.random.default_rng(1)
    writer.add("model.norm.weight", rng.standard_normal(hf["hidden_size"]).astype(dtype))
    writer.add("lm_head.weight", rng.standard_normal((hf["vocab_size"], hf["hidden_size"])).astype(dtype))
    writer.finish()
    return folder


def torch_reference(params, packed: bool, torch_dtype):
    """transformers GptOssModel (eager) holding the same weights; MXFP4 dequantized by transformers."""
    from transformers import GptOssConfig as HFGptOssConfig, GptOssModel
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf_config = HFGptOssConfig(**{k: v for k, v in HF_TINY.items() if k != "architectures"})
    hf_config._attn_implementation = "eager"
    model = GptOssModel(hf_config).eval()
    mappings = text_encoder_mappings(tiny_config(), HF_TINY["num_hidden_layers"], packed, prefix="")
    tensors = dict(torch_tensors(params, mappings))
    state = {}
    for key, value in tensors.items():
        if key.endswith("_scales"):
            continue
        if key.endswith("_blocks"):
            scales = tensors[key.replace("_blocks", "_scales")]
            state[key[:-len("_blocks")]] = convert_moe_packed_tensors(
                torch.from_numpy(value), torch.from_numpy(scales), dtype=torch_dtype)
        else:
            state[key] = torch.from_numpy(np.asarray(value, np.float32)).to(torch_dtype)
    state["norm.weight"] = torch.ones(HF_TINY["hidden_size"])
    model.load_state_dict(state, strict=True)
    return model.to(torch_dtype)


def reference_hidden(model, ids, mask, layers=SELECTED):
    """Outputs of the selected decoder layers (forward hooks: no final norm)."""
    captured = {}
    hooks = [model.layers[i].register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in layers]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    for hook in hooks:
        hook.remove()
    return [captured[i].float().numpy() for i in layers]


def test_yarn_frequencies_match_spec():
    """The stock config resolves to YaRN with the spec's 32 frequencies and attention factor."""
    hf = {"model_type": "gpt_oss", "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 150000, "factor": 32.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}}
    inv_freq, factor = rope_frequencies(resolve_rope(hf), 64)
    assert factor == pytest.approx(0.1 * np.log(32) + 1)
    assert inv_freq[:3] == pytest.approx([1.0, 0.689044, 0.474782], rel=1e-5)
    assert inv_freq[-1] == pytest.approx(3.02351e-7, rel=1e-4)
    # Legacy ``rope_scaling`` (+ top-level rope_theta) resolves to the same parameters.
    legacy = {"model_type": "gpt_oss", "rope_theta": 150000, "rope_scaling": {
        "rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}}
    legacy_freq, legacy_factor = rope_frequencies(resolve_rope(legacy), 64)
    np.testing.assert_array_equal(legacy_freq, inv_freq)
    assert legacy_factor == factor
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        resolve_rope({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})


@pytest.mark.parametrize("packed,moe_impl", [(True, "ragged"), (False, "dense")])
def test_parity_fp32(tmp_path, rng, packed, moe_impl):
    params = random_params(tiny_config(), 4, packed, np.float32, seed=3, scale=0.1)
    folder = write_checkpoint(tmp_path / "te", params, packed)
    encoder = load_text_encoder(folder, layers=SELECTED, dtype=jnp.float32, mxfp4=packed,
                                moe_impl=moe_impl, progress=False)
    assert encoder.mxfp4 == packed
    ids, mask = batch(rng)
    ours = [np.asarray(x) for x in encoder(ids, mask)]
    expected = reference_hidden(torch_reference(params, packed, torch.float32), ids, mask)
    for layer, a, e in zip(SELECTED, ours, expected):
        assert a.shape == (3, 12, 64)
        # Every position, padded ones included (the reference's padded rows match as well).
        err = max_rel_err(a, e)
        assert err <= 1e-4, f"layer {layer}: max rel err {err}"


def test_parity_bf16_mxfp4(tmp_path, rng):
    params = random_params(tiny_config(), 4, True, np.float32, seed=4, scale=0.1)
    params = {p: v if v.dtype == np.uint8 else v.astype(jnp.bfloat16).astype(np.float32)
              for p, v in params.items()}
    folder = write_checkpoint(tmp_path / "te", params, True, dtype=jnp.bfloat16)
    encoder = load_text_encoder(folder, layers=SELECTED, dtype=jnp.bfloat16, progress=False)
    assert encoder.layers.gate_up_blocks[...].dtype == jnp.uint8
    assert encoder.layers.input_norm[...].dtype == jnp.float32
    ids, mask = batch(rng)
    ours = encoder(ids, mask)
    assert all(x.dtype == jnp.bfloat16 for x in ours)
    expected = reference_hidden(torch_reference(params, True, torch.bfloat16), ids, mask)
    valid = mask.astype(bool)
    for layer, a, e in zip(SELECTED, ours, expected):
        err = rel_l2(np.asarray(a, np.float32)[valid], e[valid])
        assert err <= 2e-2, f"layer {layer}: rel L2 {err}"


def test_every_param_has_logical_axes():
    encoder = TextEncoder.random(tiny_config(), layers=SELECTED, mxfp4=True)
    for path, var in nnx.to_flat_state(nnx.state(encoder)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var[...].ndim, path
    assert encoder.embed.get_metadata()["out_sharding"] == ("vocab", "embed")
    assert encoder.layers.gate_up_blocks.get_metadata()["out_sharding"][1] == "experts"


def test_sharded_forward_equals_single_device(tmp_path, rng):
    """Experts over one mesh axis, FSDP (embed) over the other: same result as one device."""
    assert len(jax.devices()) == 8
    params = random_params(tiny_config(), 4, True, np.float32, seed=6, scale=0.1)
    folder = write_checkpoint(tmp_path / "te", params, True)
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("fsdp", "expert"))
    rules = {"experts": "expert", "embed": "fsdp", "vocab": "expert", "heads": "expert"}
    single = load_text_encoder(folder, layers=SELECTED, dtype=jnp.float32, progress=False)
    sharded = load_text_encoder(folder, layers=SELECTED, dtype=jnp.float32, mesh=mesh, rules=rules,
                                progress=False)
    blocks = sharded.layers.gate_up_blocks[...]
    assert blocks.sharding == NamedSharding(mesh, PartitionSpec(None, "expert", None, "fsdp", None))
    assert sharded.embed[...].sharding.spec == PartitionSpec("expert", "fsdp")
    assert len(blocks.addressable_shards) == 8
    ids, mask = batch(rng)
    for a, b in zip(single(ids, mask), sharded(ids, mask)):
        assert max_rel_err(np.asarray(b), np.asarray(a)) <= 1e-5


def test_bad_inputs_are_reported():
    encoder = TextEncoder.random(tiny_config(), layers=(0,), mxfp4=False)
    with pytest.raises(ValueError, match="outside 0..95"):
        encoder(np.full((1, 4), 96, np.int32))
    with pytest.raises(ValueError, match="not right-padded"):
        encoder(np.zeros((1, 4), np.int32), np.array([[False, True, True, True]]))
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        encoder(np.zeros((4,), np.int32))


def test_moe_impl_auto_picks_by_backend():
    from lens_jax.models.text_encoder import resolve_moe_impl
    assert resolve_moe_impl("auto", "cpu") == "dense"
    assert resolve_moe_impl("auto", "tpu") == "ragged"
    assert resolve_moe_impl("auto", "gpu") == "ragged"
    assert resolve_moe_impl("dense", "tpu") == "dense"
    with pytest.raises(ValueError, match="moe_impl"):
        resolve_moe_impl("sparse")
