"""LoRA training through the real loop (configs/tiny_lora.py), then lens-train export --lora /
--lora-format kohya / --merge, and lens-sample --lora on the exported file."""

import json

import jax
import numpy as np
import pytest

from tests.train.helpers import REPO

STEPS = 40


def _load_config(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A random tiny base (non-zero modulation, so every block matters), LoRA-trained STEPS steps."""
    from flax import nnx

    from lens_jax.checkpoints.transformer import save_transformer
    from lens_jax.data.synth_shapes import write_dataset
    from lens_jax.models.transformer import LensTransformer
    from lens_jax.train.loop import train

    root = tmp_path_factory.mktemp("lora_run")
    write_dataset(root / "shapes", 48, 0, base_size=64)
    config = _load_config("tiny_lora")
    config.model.zero_init_modulation = False
    config.model.init_std = 0.05
    save_transformer(LensTransformer(config.model, rngs=nnx.Rngs(7)), root / "base")
    config.init_from = str(root / "base")
    config.data.path = str(root / "shapes")
    config.num_steps = STEPS
    config.checkpoint.every = STEPS
    config.checkpoint.async_save = False
    config.logging.progress = False
    config.logging.tensorboard = False
    config.ema.decay = 0.9  # EMA of the adapters only
    config.samples.every = STEPS  # a sample grid from the base with the adapters merged
    config.samples.prompts = ("a red circle",)
    config.samples.steps = 2
    config.optimizer.lr = 1e-2
    train(config, root / "work")
    return dict(root=root, config=config, workdir=root / "work")


def _heldout(config, params):
    from lens_jax.train.evaluate import heldout_losses
    from lens_jax.train.trainer import Trainer
    from tests.train.helpers import host_batch

    plain = config.copy_and_resolve_references()
    plain.lora.rank = 0
    trainer = Trainer(plain)
    return heldout_losses(trainer, params, host_batch(plain, 2), (0.3, 0.7))


def test_lora_training_lowers_loss_and_keeps_base(run):
    from lens_jax.checkpoints import keymap
    from lens_jax.checkpoints.transformer import load_transformer, model_params
    from lens_jax.lora import adapters as adapters_lib
    from lens_jax.lora.export import restore_lora

    lora, base, step, name, spec, _ = restore_lora(run["workdir"], ema=False, with_base=True)
    assert step == STEPS and name == "params"
    assert (run["workdir"] / "samples" / f"step_{STEPS:08d}.png").is_file()
    want = {k: np.asarray(v) for k, v in model_params(load_transformer(run["root"] / "base")).items()}
    got = keymap.flatten(base)
    assert got.keys() == want.keys()
    for k in want:  # bit-identical
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))
    # the optimizer state holds the adapters only
    meta = json.loads((run["workdir"] / "config.json").read_text())
    assert meta["lora"]["rank"] == 4
    before = _heldout(run["config"], keymap.unflatten(want))
    merged = dict(base, blocks=adapters_lib.merged_blocks(base["blocks"], lora, spec.scale))
    after = _heldout(run["config"], jax.device_get(merged))
    print("held-out loss before/after", before, after)
    assert sum(after.values()) < 0.95 * sum(before.values()), (before, after)


def test_export_lora_kohya_and_merge(run, tmp_path):
    from lens_jax.checkpoints.transformer import load_transformer, model_params
    from lens_jax.lora.files import merge_lora, read_lora
    from lens_jax.train.export import main as export_main

    w = str(run["workdir"])
    assert export_main(["--workdir", w, "--out", str(tmp_path / "peft"), "--lora"]) == 0
    assert export_main(["--workdir", w, "--out", str(tmp_path / "kohya"), "--lora",
                        "--lora-format", "kohya"]) == 0
    assert export_main(["--workdir", w, "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert export_main(["--workdir", w, "--out", str(tmp_path / "plain")]) == 0  # = --merge
    assert export_main(["--workdir", w, "--out", str(tmp_path / "x"), "--lora", "--merge"]) == 2
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 4.0)
    assert config["target_modules"] == ["attn.img_qkv", "attn.txt_qkv", "attn.to_out.0",
                                        "attn.to_add_out", "img_mlp.w1", "img_mlp.w2", "img_mlp.w3",
                                        "txt_mlp.w1", "txt_mlp.w2", "txt_mlp.w3"]
    cfg = run["config"].model
    peft = read_lora(tmp_path / "peft", cfg)
    assert peft.spelling == "peft" and read_lora(tmp_path / "kohya", cfg).spelling == "kohya"
    merged = model_params(load_transformer(tmp_path / "merged"))
    plain = model_params(load_transformer(tmp_path / "plain"))
    assert all(np.array_equal(np.asarray(plain[k]), np.asarray(merged[k])) for k in merged)
    for source in ("peft", "kohya"):
        model = merge_lora(load_transformer(run["root"] / "base"), tmp_path / source)
        for k, v in model_params(model).items():
            np.testing.assert_allclose(np.asarray(v), np.asarray(merged[k]), atol=1e-6, rtol=0,
                                       err_msg=f"{source} {'/'.join(k)}")


def test_full_model_lora_state_holds_adapters_only():
    """configs/lens_3p8b_lora.py on 8 devices: optimizer state for the adapters alone, the bf16
    base FSDP-sharded like full training's parameters."""
    from lens_jax.lora.trainer import LoraTrainer
    from lens_jax.lora.trainer import make_trainer

    config = _load_config("lens_3p8b_lora")
    config.mesh.num_devices = 8
    trainer = make_trainer(config, with_encoders=False)
    assert isinstance(trainer, LoraTrainer)
    state = trainer.abstract_state()
    base = jax.tree.leaves(state["base"])
    total = sum(int(np.prod(x.shape)) for x in base)
    assert total == 4_104_225_152 and {str(x.dtype) for x in base} == {"bfloat16"}
    per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) for x in base)
    assert per_device < total / 8 * 1.01
    adapters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    # rank 32 on qkv, out, w1/w2/w3 of both streams in 48 blocks (width d = 1536, MLP 8d/3 = 4096)
    d, f = 1536, 4096
    assert adapters == 48 * 2 * 32 * ((d + 3 * d) + (d + d) + 3 * (d + f))
    moments = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["opt_state"]))
    assert moments <= 2 * adapters + 8
    assert state["ema"] == {}


def test_bf16_base_and_dropout(run):
    """A step with the base held in bfloat16 and adapter dropout: the base stays bf16 and unchanged,
    the adapters move; dropout masks the adapter's input (inverted scaling) and only where asked."""
    import jax.numpy as jnp

    from lens_jax.lora.adapters import lora_delta
    from lens_jax.lora.trainer import make_trainer
    from tests.train.helpers import host_batch

    config = run["config"].copy_and_resolve_references()
    config.lora.base_dtype = "bfloat16"
    config.lora.dropout = 0.5
    config.optimizer.warmup_steps = 0
    trainer = make_trainer(config)
    state = trainer.init_state()
    assert {str(x.dtype) for x in jax.tree.leaves(state["base"])} == {"bfloat16"}
    base = jax.tree.map(np.asarray, state["base"])
    state, metrics = trainer.step(state, trainer.put_batch(host_batch(config, 1)[0]))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(state["base"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert np.abs(np.asarray(state["params"]["img_qkv"]["lora_b"])).max() > 0

    x = jnp.ones((2, 8, 4))
    p = {"lora_a": jnp.eye(4)[:, :4], "lora_b": jnp.eye(4), "lora_scale": jnp.float32(1.0)}
    np.testing.assert_array_equal(np.asarray(lora_delta(x, p, jnp.float32, 1)), np.ones((2, 8, 4)))
    dropped = np.asarray(lora_delta(x, dict(p, lora_key=jax.random.PRNGKey(0),
                                            lora_dropout=jnp.float32(0.5)), jnp.float32, 1))
    assert set(np.unique(dropped)) == {0.0, 2.0} and 0.3 < (dropped == 0).mean() < 0.7
