"""Orbax checkpoints of the training state and the data iterator, and the policy for restoring them.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,run}`` (``ocp.CheckpointManager``; asynchronous
saves; ``max_to_keep`` newest plus every ``keep_period``-th). ``state`` is the train-state pytree
(restored onto any mesh: the target carries the new shardings); ``data`` is the grain iterator state
(one JSON per process: ``process_<i>-of-<n>.json``); ``run`` records the number of processes.

Restore policy (``Checkpointer.restore``), the same decision on every process (``hosts``):
- the newest checkpoint is tried first; only one shown to be incomplete (no commit marker) or
  corrupt (its metadata or arrays cannot be decoded) is skipped, naming it and the reason, and the
  previous one is tried;
- a checkpoint that does not match the run (another model shape, EMA switched on or off, another
  optimizer, another number of processes) stops the run with ``CheckpointMismatchError`` naming the
  difference and the ways on;
- a transient read error (``OSError`` such as a timeout or a lost connection) is retried
  ``RETRIES`` times, then raised;
- nothing is moved or deleted, except when the run restarts from an earlier step than its newest
  checkpoint: the newer (skipped) ones are then moved to ``WORKDIR/checkpoints_skipped/`` (saying so),
  since the run will write those steps again;
- when every checkpoint is unusable the run stops (``CheckpointUnusableError``); it never silently
  starts from step 0 over a run's checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import time

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from lens_jax import storage
from lens_jax.errors import CheckpointMismatchError, CheckpointUnusableError
from lens_jax.train import hosts

log = logging.getLogger(__name__)

RETRIES = 3               # attempts at a checkpoint whose reading fails with a transient error
RETRY_WAIT_S = 2.0        # first wait between attempts (doubles each time)
COMMIT_MARKER = "commit_success.txt"   # written by orbax when a step is complete (local/posix paths)

_OK, _CORRUPT, _MISMATCH, _ERROR = 0, 1, 2, 3   # per-process outcomes, reduced with max over hosts


class DataState:
    """A snapshot of a data iterator's state, saved by grain's checkpoint handler (which calls
    ``get_state()`` and accepts bytes): the loop saves the state after the last batch a step used,
    not the state of an iterator that has already prefetched further."""

    def __init__(self, state: dict):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=4).encode()


def _path_tokens(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _leaf_table(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"params/x/kernel": (shape, dtype)}`` of a state or metadata tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_path_tokens(p)): (tuple(l.shape), str(l.dtype)) for p, l in leaves}


def state_differences(saved, target, limit: int = 8) -> list[str]:
    """What differs between a checkpoint's state metadata and this run's state (paths, shapes)."""
    a, b = _leaf_table(saved), _leaf_table(target)
    out = []
    for name in sorted(set(a) | set(b)):
        if name not in a:
            out.append(f"{name}: not in the checkpoint, expected by this config {b[name]}")
        elif name not in b:
            out.append(f"{name}: in the checkpoint {a[name]}, not expected by this config")
        elif a[name] != b[name]:
            out.append(f"{name}: checkpoint {a[name]}, this config {b[name]}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def _transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    text = str(e)
    return isinstance(e, (ConnectionError, TimeoutError, OSError)) or any(
        s in text for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"))


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, cfg: ml_collections.ConfigDict):
        self.directory = storage.path(directory)  # local (absolute) or gs://: orbax takes both
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(cfg.max_to_keep) if cfg.max_to_keep > 0 else None,
            keep_period=int(cfg.keep_period) if cfg.keep_period > 0 else None,
            # Several processes: synchronous saves. Asynchronous ones finish with cross-process
            # barriers in orbax's background thread, which, interleaved with the loop's own
            # collectives, hung 2-process CPU runs here intermittently (not yet understood).
            enable_async_checkpointing=bool(cfg.async_save) and jax.process_count() == 1,
            create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "run": ocp.JsonCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps on disk, as process 0 sees them (every process uses the same list)."""
        steps = sorted(int(s) for s in self.manager.all_steps())
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            import numpy as np

            count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
            padded = np.full((max(count, 1),), -1, np.int64)
            padded[:min(count, len(steps))] = steps[:count]
            steps = [int(s) for s in multihost_utils.broadcast_one_to_all(padded.astype(np.int32))
                     if s >= 0]
        return steps

    def save(self, step: int, state: dict, data_state: DataState | None = None,
             force: bool = False) -> None:
        args = {"state": ocp.args.StandardSave(state),
                "run": ocp.args.JsonSave({"process_count": jax.process_count()})}
        if data_state is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_state)
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

    # -- the policy ----------------------------------------------------------------------------
    def _inspect(self, step: int, abstract_state: dict, with_data: bool) -> tuple[int, str]:
        """``(outcome, reason)`` of a checkpoint before reading its arrays (this process's view)."""
        where = self.directory / str(step)
        if not (where / COMMIT_MARKER).exists():
            return _CORRUPT, f"incomplete: no {COMMIT_MARKER} (the save was interrupted)"
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - unreadable metadata = a corrupt checkpoint
            if _transient(e):
                raise
            return _CORRUPT, f"state metadata unreadable: {type(e).__name__}: {str(e)[:300]}"
        if saved is None:
            return _CORRUPT, "no state metadata"
        diff = state_differences(saved, abstract_state)
        if diff:
            return _MISMATCH, "the saved state differs from this config's:\n  " + "\n  ".join(diff)
        if with_data:
            n = jax.process_count()
            found = sorted(p.name for p in (where / "data").glob("process_*-of-*.json"))
            if f"process_{jax.process_index()}-of-{n}.json" not in found:
                return _MISMATCH, (
                    f"it was saved by another number of processes ({', '.join(found) or 'no data state'} "
                    f"in {where / 'data'}; this run has {n}): the data iterator's state is per host, "
                    f"so it resumes only with the same number of processes")
        return _OK, ""

    def _read(self, step: int, abstract_state: dict, data_iter) -> tuple[int, str, dict | None]:
        """Reads a checkpoint, retrying transient errors; ``(outcome, reason, state)``."""
        wait = RETRY_WAIT_S
        for attempt in range(1, RETRIES + 1):
            try:
                return _OK, "", self.restore_step(step, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001 - classified below
                if not _transient(e):
                    return _CORRUPT, f"arrays unreadable: {type(e).__name__}: {str(e)[:300]}", None
                if attempt == RETRIES:
                    return _ERROR, (f"reading failed {RETRIES} times: {type(e).__name__}: "
                                    f"{str(e)[:300]}"), None
                log.warning("checkpoint %s: %s: %s; retrying in %.0f s (attempt %d of %d)",
                            self.directory / str(step), type(e).__name__, e, wait, attempt, RETRIES)
                time.sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")

    def restore(self, abstract_state: dict, data_iter=None, context: str = ""
                ) -> tuple[dict, int] | None:
        """Newest usable checkpoint as ``(state, step)``; ``None`` when there is none at all.

        ``context``: text added to a mismatch error (the config fields changed since the run
        started). Raises ``CheckpointMismatchError``, ``CheckpointUnusableError``, or ``OSError``
        after ``RETRIES`` transient failures, on every process alike.
        """
        steps = self.all_steps()
        skipped: list[tuple[int, str]] = []
        for step in reversed(steps):
            where = self.directory / str(step)
            outcome, reason = self._inspect(step, abstract_state, data_iter is not None)
            outcome = self._agree(outcome)
            state = None
            if outcome == _OK:
                outcome, reason, state = self._read(step, abstract_state, data_iter)
                outcome = self._agree(outcome)
            if outcome == _MISMATCH:
                raise CheckpointMismatchError(
                    f"checkpoint {where} does not match this run's config: {reason or 'see process 0'}"
                    f"{context}\nNothing was changed. To go on: resume with the config the run was "
                    f"started with ({self.directory.parent / 'config.json'}), or start a new run from "
                    f"these weights in another workdir with --config.init_from=run:{self.directory.parent}")
            if outcome == _ERROR:
                raise OSError(f"checkpoint {where}: {reason or 'a read failed on another process'}; "
                              f"nothing was changed, run again when the storage is reachable")
            if outcome == _CORRUPT:
                reason = reason or "unreadable on another process"
                log.error("checkpoint at step %d (%s) is skipped: %s", step, where, reason)
                if hosts.is_primary():
                    print(f"lens-train: checkpoint at step {step} is skipped ({reason}); "
                          f"trying the previous one", flush=True)
                skipped.append((step, reason))
                continue
            if skipped:
                self._set_aside([s for s, _ in skipped], step)
            return state, int(step)
        if skipped:
            listing = "; ".join(f"step {s}: {r}" for s, r in skipped)
            raise CheckpointUnusableError(
                f"no checkpoint in {self.directory} can be read ({listing}); nothing was changed. "
                f"Move the checkpoints away to start this run again from step 0, or point "
                f"--config.init_from at another run")
        return None

    @staticmethod
    def _agree(outcome: int) -> int:
        return int(hosts.gather([outcome]).max())

    def _set_aside(self, steps: list[int], resumed: int) -> None:
        """The run restarts at ``resumed``, before these steps: move them out of the way (they
        would be written again), to ``checkpoints_skipped/<step>-<time>``; never deleted."""
        target = self.directory.parent / "checkpoints_skipped"
        if hosts.is_primary():
            storage.makedirs(target)
            for step in steps:
                src = self.directory / str(step)
                dst = target / f"{step}-{int(time.time())}"
                if src.exists():
                    storage.move(src, dst)
                    print(f"lens-train: restarting from step {resumed}: the skipped checkpoint "
                          f"{src} is moved to {dst}", flush=True)
        hosts.barrier("lens_jax.checkpoint.set_aside")
        self.manager.reload()
