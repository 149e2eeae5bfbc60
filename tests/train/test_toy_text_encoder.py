"""The toy text encoder (lens_jax.train.toy_text_encoder): a tiny GPT-OSS LM trained on captions,
written as a GPT-OSS folder that load_text_encoder reads, cached by corpus, written atomically,
and usable as the training run's frozen text encoder.

One module-scoped training (30 steps of a 2-layer width-32 LM on 100 captions cut to 16 word
tokens: one compiled step) serves most tests.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from lens_jax.train import toy_text_encoder as toy

SETTINGS = toy.ToyLMSettings(hidden_size=32, num_layers=2, head_dim=8, intermediate_size=32,
                             selected_layers=(0, 1), steps=30, batch_tokens=256, lr=1e-2,
                             warmup_steps=5, buckets=(16,))


def captions(num: int, seed: int = 0) -> list[str]:
    """Dense and short synth-shapes captions of ``num // 2`` layouts."""
    from lens_jax.data.synth_shapes import bucket_sizes, caption_dense, caption_short, sample_layout

    sizes = bucket_sizes(512)
    out = []
    for i in range(num // 2):
        layout = sample_layout(np.random.default_rng([seed, i]), *sizes[i % len(sizes)])
        out += [caption_dense(layout), caption_short(layout)]
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    from lens_jax.demo import write_word_tokenizer

    return "json:" + str(write_word_tokenizer(tmp_path_factory.mktemp("tok") / "words.json",
                                              num_layouts=200))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("toy") / "text_encoder"
    folder = toy.train_or_reuse(captions(100), tokenizer, out, SETTINGS, progress=False)
    return folder, json.loads((folder / toy.SUMMARY).read_text())


def test_loss_decreases_and_summary_is_complete(trained):
    _, summary = trained
    assert summary["steps"] == 30 and summary["num_heldout_captions"] >= 1
    # 30 steps from a uniform guess (log 128 = 4.85) over a ~120-word vocabulary
    assert summary["last_loss"] < 0.7 * summary["first_loss"], summary
    assert 0 <= summary["heldout"]["accuracy"] <= 1 and summary["heldout"]["tokens"] > 0
    assert summary["selected_layers"] == [0, 1] and summary["hidden_size"] == 32
    assert len(summary["corpus_fingerprint"]) == 64 and summary["seconds"] > 0


def test_folder_loads_and_reproduces_the_trained_layers(trained, tokenizer):
    """load_text_encoder (float32) gives the selected hidden states of the trained parameters
    (the same forward, ``encode``, on the parameters read back from the file), and the file is a
    full causal LM (final norm and head present)."""
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from lens_jax.checkpoints.text_encoder import load_text_encoder, read_config
    from lens_jax.models.text_encoder import encode

    folder, _ = trained
    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors["lm_head.weight"].shape == (128, 32) and tensors["model.norm.weight"].shape == (32,)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].dtype == np.float32  # dense experts
    encoder = load_text_encoder(folder, layers=(0, 1), dtype=jnp.float32, progress=False)
    assert encoder.config == read_config(folder) and encoder.dtype == jnp.float32

    # the reference: the parameters in the JAX layout, taken back from the torch tensors by hand
    d, h, kv, hd = 32, 4, 2, 8
    params = {"embed": tensors["model.embed_tokens.weight"], "layers": {}}

    def stack(key, fn=lambda x: x):
        return np.stack([fn(tensors[f"model.layers.{i}.{key}"]) for i in range(2)])

    L = params["layers"]
    L["input_norm"], L["post_norm"] = stack("input_layernorm.weight"), stack("post_attention_layernorm.weight")
    for p, heads in (("q", h), ("k", kv), ("v", kv)):
        L[f"{p}_kernel"] = stack(f"self_attn.{p}_proj.weight", lambda w: w.T.reshape(d, heads, hd))
        L[f"{p}_bias"] = stack(f"self_attn.{p}_proj.bias", lambda b: b.reshape(heads, hd))
    L["o_kernel"] = stack("self_attn.o_proj.weight", lambda w: w.T.reshape(h, hd, d))
    L["o_bias"], L["sinks"] = stack("self_attn.o_proj.bias"), stack("self_attn.sinks")
    L["router_kernel"] = stack("mlp.router.weight", lambda w: w.T)
    L["router_bias"] = stack("mlp.router.bias")
    for name in ("gate_up", "down"):
        L[name] = stack(f"mlp.experts.{name}_proj")
        L[f"{name}_bias"] = stack(f"mlp.experts.{name}_proj_bias")

    from lens_jax.data.tokenize import load_caption_tokenizer

    tok = load_caption_tokenizer(tokenizer)
    rows = [tok.tokenize(c)[:16] for c in ("a red circle", "two blue squares and a green star")]
    ids = np.zeros((2, 16), np.int32)
    mask = np.zeros((2, 16), bool)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = row, True
    want = encode(params, jnp.asarray(ids), jnp.asarray(mask), config=encoder.config,
                  selected=(0, 1), moe_impl="dense")
    got = encoder(ids, mask)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g)[mask], np.asarray(w)[mask], rtol=1e-5, atol=1e-5)


def fake_train(calls: list):
    """A ``train_lm`` that records its call and returns the initial parameters at once."""
    import jax

    def train_lm(captions, config, settings, progress=True):
        calls.append(len(captions))
        return jax.device_get(toy.init_params(config, 0)), [5.0, 4.0]
    return train_lm


def test_cache_is_reused_and_a_new_corpus_retrains(trained, tokenizer, monkeypatch):
    folder, summary = trained
    stamp = (folder / toy.SUMMARY).stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(toy, "train_lm", fake_train(calls))
    monkeypatch.setattr(toy, "evaluate", lambda *a, **k: {"loss": 1.0, "accuracy": 0.5, "tokens": 1})
    assert toy.train_or_reuse(captions(100), tokenizer, folder, SETTINGS, progress=False) == folder
    assert not calls and (folder / toy.SUMMARY).stat().st_mtime_ns == stamp
    # another corpus (other layouts): trained again, the folder replaced in place
    toy.train_or_reuse(captions(100, seed=1), tokenizer, folder, SETTINGS, progress=False)
    assert len(calls) == 1
    again = json.loads((folder / toy.SUMMARY).read_text())
    assert again["corpus_fingerprint"] != summary["corpus_fingerprint"] and again["first_loss"] == 5.0
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporaries left
    # other settings on the same corpus: trained again too
    toy.train_or_reuse(captions(100, seed=1), tokenizer, folder, dataclasses.replace(SETTINGS, lr=0.1),
                       progress=False)
    assert len(calls) == 2


def test_failed_write_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    """An error while the folder is written (after training): no folder under the name, no
    temporary beside it."""
    def half_write(folder, params, config, summary):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(toy, "train_lm", fake_train([]))
    monkeypatch.setattr(toy, "evaluate", lambda *a, **k: {"loss": 1.0, "accuracy": 0.5, "tokens": 1})
    monkeypatch.setattr(toy, "write_folder", half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        toy.train_or_reuse(captions(20), tokenizer, tmp_path / "te", SETTINGS, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_check_matches_names_the_mismatch(trained):
    folder, _ = trained
    toy.check_matches(folder, (0, 1), 32)
    with pytest.raises(ValueError, match=r"selected_layer_index=\(1, 3\).*\(0, 1\)"):
        toy.check_matches(folder, (1, 3), 32)
    with pytest.raises(ValueError, match="enc_hidden_dim=64.*hidden size is 32"):
        toy.check_matches(folder, (0, 1), 64)


def test_training_run_with_the_toy_encoder(trained, tokenizer, shapes_path, tmp_path):
    """Two lens-train steps with ``text_encoder.kind="gpt_oss"`` on the toy folder (float32), and a
    mismatched ``enc_hidden_dim`` refused with the reason."""
    from lens_jax.train import encoders
    from lens_jax.train.loop import train
    from tests.train.helpers import tiny_config

    folder, _ = trained
    config = tiny_config(shapes_path)  # enc_hidden_dim 32, selected layers (1, 3)
    config.model.selected_layer_index = (0, 1)
    config.text_encoder.update(kind="gpt_oss", path=str(folder), dtype="float32")
    config.data.update(tokenizer=tokenizer, rows_per_host=2, max_segments=2, caption_length=16,
                       text_tokens=32)
    config.update(num_steps=2)
    config.checkpoint.update(every=2, async_save=False)
    config.logging.every = 1
    train(config, tmp_path / "run")
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 2
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert encoders.text_encoder(config).dtype == np.float32
    config.model.enc_hidden_dim = 48
    with pytest.raises(ValueError, match="enc_hidden_dim=48"):
        encoders.text_encoder(config)


def test_demo_resolves_toy_placeholder(tmp_path, monkeypatch):
    """lens_jax.demo: ``text_encoder.path="toy"`` (configs/demo_toy_lm.py) -> OUT/text_encoder,
    trained on the dense and the short caption of every training record with the run's tokenizer;
    a config whose denoiser does not read the toy's layers is refused; others are left alone."""
    from lens_jax import demo
    from lens_jax.data.records import read_examples
    from lens_jax.data.synth_shapes import write_dataset

    write_dataset(tmp_path / "train", 6, 0, base_size=64)
    seen = {}

    def fake(texts, spec, out, settings=toy.ToyLMSettings(), progress=True, log=print):
        seen.update(texts=list(texts), spec=spec)
        out.mkdir(exist_ok=True)
        (out / toy.SUMMARY).write_text(json.dumps({"selected_layers": list(settings.selected_layers),
                                                   "hidden_size": settings.hidden_size}))
        return out

    monkeypatch.setattr(toy, "train_or_reuse", fake)
    config = demo.load_config(demo.REPO_ROOT / "configs" / "demo_toy_lm.py")
    config.data.tokenizer = "json:WORDS"
    plain = demo.load_config(demo.DEFAULT_CONFIG)
    folder = demo.resolve_toy_text_encoder([config, plain], tmp_path, tmp_path / "train")
    assert folder == tmp_path / "text_encoder" and config.text_encoder.path == str(folder)
    assert (config.text_encoder.kind, config.text_encoder.dtype) == ("gpt_oss", "float32")
    assert plain.text_encoder.kind == "embedding" and plain.text_encoder.path == ""
    records = list(read_examples(tmp_path / "train"))
    assert seen == {"texts": [t for r in records for t in (r.caption, r.short_caption)],
                    "spec": "json:WORDS"}
    bad = demo.load_config(demo.REPO_ROOT / "configs" / "demo_toy_lm.py")
    bad.model.selected_layer_index = (5, 11, 17, 23)
    with pytest.raises(ValueError, match="selected_layer_index"):
        demo.resolve_toy_text_encoder([bad], tmp_path, tmp_path / "train")


def test_compile_describes_the_toy_encoder(trained, shapes_path):
    """``lens-train compile`` (``text_encoder_spec``) reads a toy folder's own config (dense
    experts, ``text_encoder.dtype``) instead of assuming GPT-OSS-20B; a mismatch is refused."""
    from lens_jax.checkpoints.text_encoder import read_config
    from lens_jax.train.compile import text_encoder_spec
    from tests.train.helpers import tiny_config

    folder, _ = trained
    config = tiny_config(shapes_path)
    config.model.selected_layer_index = (0, 1)
    config.text_encoder.update(kind="gpt_oss", path=str(folder), dtype="float32")
    spec = text_encoder_spec(config, "cpu")
    assert (spec.config, spec.selected, spec.mxfp4, spec.dtype) == (read_config(folder), (0, 1),
                                                                   False, "float32")
    config.model.selected_layer_index = (1, 3)
    with pytest.raises(ValueError, match="selected_layer_index"):
        text_encoder_spec(config, "cpu")
