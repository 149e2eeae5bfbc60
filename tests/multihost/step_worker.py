"""One process of the equivalence check, started by ``launch/local.sh --module``: the jitted step on
a fixed global batch, twice, with FSDP and with FSDP x tensor; process 0 writes the losses and the
gathered parameters to ``WORKDIR/<layout>.npz``. ``global_batch`` and ``run_layout`` are also what
the test runs in one process on 8 devices.

``--late-first-step-s=S``: process 1 reaches its first step S seconds after process 0, as a host
whose compile is slower would (gloo drops a collective whose processes first meet > 30 s apart;
the trainer's barrier after compiling is what keeps them together)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

LAYOUTS = {"fsdp": {"fsdp": -1, "tensor": 1}, "fsdp_tensor": {"fsdp": 4, "tensor": 2}}
ROWS = 8


def config_for(data_path: str, layout: str):
    from tests.train.helpers import tiny_config

    config = tiny_config(data_path, zero_init_modulation=False)
    config.mesh.num_devices = 0
    config.mesh.fsdp, config.mesh.tensor = LAYOUTS[layout]["fsdp"], LAYOUTS[layout]["tensor"]
    config.data.rows_per_host = ROWS
    config.data.process_index, config.data.process_count = 0, 1   # the whole global batch
    config.ema.decay = 0.0
    return config


def global_batch(config) -> dict:
    from tests.train.helpers import host_batch

    return host_batch(config)[0]


def run_layout(config, batch: dict, late_s: float = 0.0) -> tuple[list[float], dict]:
    """Two steps on ``batch``: ``([loss1, loss2], params as numpy)``; process 1 starts the first
    ``late_s`` seconds late."""
    import jax
    from jax.experimental import multihost_utils

    from lens_jax.train.trainer import Trainer

    trainer = Trainer(config)
    state = trainer.init_state()
    placed = {k: jax.make_array_from_callback(v.shape, trainer.batch_sharding, lambda i, v=v: v[i])
              for k, v in batch.items()}
    losses = []
    if late_s and jax.process_index() == 1:
        time.sleep(late_s)
    for _ in range(2):
        state, m = trainer.step(state, placed)
        losses.append(float(m["loss"]))
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(state["params"], tiled=True)
    else:
        params = jax.device_get(state["params"])
    return losses, jax.tree.map(np.asarray, params)


def main(argv: list[str]) -> None:
    import jax

    args = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    workdir = Path(argv[argv.index("--workdir") + 1])
    late_s = float(args.get("--late-first-step-s", 0))
    jax.distributed.initialize(args["--config.coordinator_address"],
                               int(args["--config.num_processes"]), int(args["--config.process_id"]))
    for i, layout in enumerate(LAYOUTS):
        config = config_for(args["--config.data.path"], layout)
        losses, params = run_layout(config, global_batch(config), late_s if i == 0 else 0.0)
        if jax.process_index() == 0:
            flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
                    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
            np.savez(workdir / f"{layout}.npz", losses=np.asarray(losses), **flat)
        print(f"{layout} losses {losses}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
