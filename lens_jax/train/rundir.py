"""The files of a run directory (``--workdir``), every path in one place.

``config.json`` (the config the run started with; a resume with changed fields adds
``config.resume_<step>.json`` and never rewrites it), ``metrics.jsonl`` (one JSON object per logged
step), ``tensorboard/``, ``samples/step_<step>.png``, ``checkpoints/`` (``lens_jax.train.checkpoint``).
Process 0 writes them; every write is to a temporary name, then renamed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import ml_collections

log = logging.getLogger(__name__)

CONFIG = "config.json"
METRICS = "metrics.jsonl"


def prepare(workdir: str | os.PathLike) -> Path:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def checkpoints(workdir: Path) -> Path:
    return workdir / "checkpoints"


def metrics_path(workdir: Path) -> Path:
    return workdir / METRICS


def tensorboard_dir(workdir: Path) -> Path:
    return workdir / "tensorboard"


def sample_path(workdir: Path, step: int) -> Path:
    return workdir / "samples" / f"step_{step:08d}.png"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_config(workdir: Path) -> dict | None:
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


def record_config(workdir: Path, config: ml_collections.ConfigDict, start: int,
                  changes: list[str]) -> None:
    """A new run writes ``config.json``; a resume with changed fields writes
    ``config.resume_<start>.json`` beside it and leaves ``config.json`` as it was."""
    if start == 0 or not (workdir / CONFIG).exists():
        _write_text(workdir / CONFIG, config.to_json_best_effort(indent=2))
    elif changes:
        path = workdir / f"config.resume_{start}.json"
        _write_text(path, config.to_json_best_effort(indent=2))
        log.warning("resuming at step %d with changed config fields (written to %s):\n  %s",
                    start, path, "\n  ".join(changes))


def truncate_metrics(workdir: Path, last_step: int) -> None:
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
    _write_text(path, "".join(l + "\n" for l in keep))
