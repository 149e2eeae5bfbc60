"""Orbax checkpoints of the training state and the data iterator, with fallback on unreadable ones.

Layout: ``WORKDIR/checkpoints/<step>/{state,data}`` (``ocp.CheckpointManager``; asynchronous saves;
``max_to_keep`` newest plus every ``keep_period``-th). ``state`` is the train-state pytree (restored
onto any mesh: the target carries the new shardings); ``data`` is the grain iterator state (one JSON
per process). A checkpoint that fails to restore is reported, moved to ``WORKDIR/checkpoints_unreadable/``
and the previous one is tried.
"""

from __future__ import annotations

import logging
import os
import time

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from lens_jax import storage

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, cfg: ml_collections.ConfigDict):
        self.directory = storage.path(directory)  # local or gs://
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(cfg.max_to_keep) if cfg.max_to_keep > 0 else None,
            keep_period=int(cfg.keep_period) if cfg.keep_period > 0 else None,
            enable_async_checkpointing=bool(cfg.async_save),
            create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iter=None, force: bool = False) -> None:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(int(step), args=ocp.args.Composite(**args), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def restore_step(self, step: int, abstract_state: dict, data_iter=None) -> dict:
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(int(step), args=ocp.args.Composite(**args))
        # Back to the target's exact tree structure (named tuples of optax states).
        leaves = jax.tree.leaves(restored["state"])
        return jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)

    def restore(self, abstract_state: dict, data_iter=None) -> tuple[dict, int] | None:
        """Newest readable checkpoint as ``(state, step)``; ``None`` when there is none."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore_step(step, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                log.error("checkpoint at step %d (%s) is unreadable: %s: %s; trying the previous one",
                          step, self.directory / str(step), type(e).__name__, str(e)[:500])
                print(f"lens-train: checkpoint at step {step} is unreadable "
                      f"({type(e).__name__}); resuming from the previous one", flush=True)
                self._quarantine(step)
                continue
            return state, int(step)
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            target = self.directory.parent / "checkpoints_unreadable" / f"{step}-{int(time.time())}"
            src = self.directory / str(step)
            if src.exists():
                storage.move(src, target)
        self.manager.reload()
