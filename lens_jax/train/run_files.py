"""A finished or running lens-train run's files, read back: its config and its checkpoints' arrays
(no devices needed). Used by ``lens-train export``, ``init_from=run:`` and ``lens_jax.lora.export``."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np

from lens_jax import storage


def run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The training config a run saved in ``workdir/config.json`` (model fields as tuples)."""
    from lens_jax.models.config import transformer_config

    path = storage.path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a lens-train run directory?")
    raw = json.loads(path.read_text())
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["model"].items()}
    config = ml_collections.ConfigDict(raw)
    config.model = transformer_config(**model)
    return config


def restore_items(workdir: str | Path, step: int, item: dict) -> tuple[dict, int]:
    """Restores the top-level entries of ``item`` (numpy templates) from a run's checkpoint at
    ``step`` (-1: the newest); returns them as host numpy arrays and the step."""
    import jax
    import orbax.checkpoint as ocp

    ckpt_dir = storage.path(workdir) / "checkpoints"
    steps = sorted(int(name) for name in storage.listdir(ckpt_dir) if name.isdigit())
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}")
    if step < 0:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt_dir} (have {steps})")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with ocp.PyTreeCheckpointer() as checkpointer:
        out = checkpointer.restore(ckpt_dir / str(step) / "state",
                                   args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                               partial_restore=True))
    return out, step
