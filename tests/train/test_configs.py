"""Every training config loads; the 3.8B stages shard parameters, Adam moments and EMA (FSDP)."""

import importlib.util

import jax
import numpy as np
import pytest

from tests.train.helpers import REPO

CONFIGS = ["tiny", "lens_3p8b_stage1_512", "lens_3p8b_stage2_mixed", "lens_3p8b_finetune",
           "tiny_lora", "lens_3p8b_lora"]


def load(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_documents_its_command(name):
    text = (REPO / "configs" / f"{name}.py").read_text()
    assert text.startswith("#") and ("lens-train" in text.splitlines()[0] + text.splitlines()[1]
                                     + text.splitlines()[2] + text.splitlines()[3])
    config = load(name).get_config()
    assert config.num_steps > 0 and "model" in config and "optimizer" in config


def test_tiny_keeps_model_config():
    tiny = load("tiny")
    assert tiny.get_model_config().num_layers == 2
    assert tiny.get_config().model.num_layers == 2


def test_stage1_state_is_fsdp_sharded():
    from lens_jax.train.trainer import Trainer

    config = load("lens_3p8b_stage1_512").get_config()
    config.mesh.num_devices = 8
    trainer = Trainer(config, with_encoders=False)
    abstract = trainer.abstract_state()
    leaves = jax.tree.leaves(abstract["params"])
    total = sum(int(np.prod(x.shape)) for x in leaves)
    assert total == 4_104_225_152
    for name in ("params", "ema"):
        per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) for x in jax.tree.leaves(abstract[name]))
        assert per_device < total / 8 * 1.01, name
    mu = abstract["opt_state"][1][0].mu
    per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) for x in jax.tree.leaves(mu))
    assert per_device < total / 8 * 1.01
