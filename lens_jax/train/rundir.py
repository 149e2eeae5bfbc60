"""The files of a run directory (``--workdir``), every path in one place.

``config.json`` (the config the run started with; a resume with changed fields adds
``config.resume_<step>.json`` and never rewrites it), ``metrics.jsonl`` (one JSON object per logged
step), ``tensorboard/``, ``samples/step_<step>.png``, ``checkpoints/`` (``lens_jax.train.checkpoint``).
Process 0 writes them. The workdir is a local folder or ``gs://BUCKET/PATH``: paths are
``etils.epath`` paths and every file is written whole through ``lens_jax.storage`` (a temporary
name renamed locally; one object upload on Cloud Storage).
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections
from etils import epath

from lens_jax import storage

log = logging.getLogger(__name__)

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def prepare(workdir: str | os.PathLike) -> epath.Path:
    """``workdir`` as a path (local: absolute, created; ``gs://``: as given)."""
    return storage.makedirs(workdir)


def checkpoints(workdir: epath.Path) -> epath.Path:
    return workdir / "checkpoints"


def metrics_path(workdir: epath.Path) -> epath.Path:
    return workdir / METRICS


def tensorboard_dir(workdir: epath.Path) -> epath.Path:
    return workdir / TENSORBOARD


def sample_path(workdir: epath.Path, step: int) -> epath.Path:
    return workdir / "samples" / f"step_{step:08d}.png"


def read_config(workdir: epath.Path) -> dict | None:
    """The config the run in ``workdir`` started with (``None`` for a new workdir)."""
    path = workdir / CONFIG
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        log.warning("%s is not valid JSON (%s): config changes are not listed", path, e)
        return None


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(previous: dict | None, config: ml_collections.ConfigDict) -> list[str]:
    """``["ema.decay: 0.0 -> 0.99", ...]``: fields that differ from the run's ``config.json``."""
    if previous is None:
        return []
    old = _flatten(previous)
    new = _flatten(json.loads(config.to_json_best_effort()))
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def record_config(workdir: epath.Path, config: ml_collections.ConfigDict, start: int,
                  changes: list[str]) -> None:
    """A new run writes ``config.json``; a resume with changed fields writes
    ``config.resume_<start>.json`` beside it and leaves ``config.json`` as it was."""
    if start == 0 or not (workdir / CONFIG).exists():
        storage.write_text(workdir / CONFIG, config.to_json_best_effort(indent=2))
    elif changes:
        path = workdir / f"config.resume_{start}.json"
        storage.write_text(path, config.to_json_best_effort(indent=2))
        log.warning("resuming at step %d with changed config fields (written to %s):\n  %s",
                    start, path, "\n  ".join(changes))


def truncate_metrics(workdir: epath.Path, last_step: int) -> None:
    """Drops ``metrics.jsonl`` rows of steps after ``last_step``: the run restarts at ``last_step``
    and logs those steps again. Says so; leaves the file untouched when there are none."""
    path = metrics_path(workdir)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) == len(lines):
        return
    log.warning("%s: %d rows of steps after %d are dropped: the run restarts at step %d and logs "
                "them again (TensorBoard shows both)", path, len(lines) - len(keep), last_step, last_step)
    storage.write_text(path, "".join(l + "\n" for l in keep))
