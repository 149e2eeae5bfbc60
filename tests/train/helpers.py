"""Shared fixtures of the trainer tests: a tiny synthetic-shapes dataset and tiny configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def tiny_config(data_path: str = "", **model_overrides):
    from configs import tiny

    config = tiny.get_config()
    if model_overrides:
        model = tiny.get_model_config(**{**tiny.TRAIN_MODEL_OVERRIDES, **model_overrides})
        config.model = model
    config.data.path = data_path
    config.logging.progress = False
    config.logging.tensorboard = False
    return config


def host_batch(config, num_batches: int = 1) -> list[dict]:
    """The first batches of the pipeline as per-host numpy dicts."""
    from lens_jax.data.pipeline import make_pipeline

    it = make_pipeline(config.data, mesh=None)
    try:
        return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(num_batches)]
    finally:
        it.close()


def cli_command(workdir, *overrides) -> list[str]:
    return [sys.executable, "-m", "lens_jax.train.cli", "--config", str(REPO / "configs" / "tiny.py"),
            "--workdir", str(workdir), "--config.logging.progress=False",
            "--config.logging.tensorboard=False", *overrides]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


_INITIAL_STATES: dict = {}


def initial_state(trainer):
    """``trainer.init_state()`` placed with the trainer's shardings; the (slow, eager) random init
    runs once per model config and optimizer layout in a test session."""
    import jax

    key = (trainer.config.model.to_json(), trainer.config.ema.decay > 0, trainer.config.optimizer.grad_clip > 0)
    if key not in _INITIAL_STATES:
        _INITIAL_STATES[key] = jax.device_get(trainer.init_state())
    return jax.device_put(_INITIAL_STATES[key], trainer.state_shardings)
