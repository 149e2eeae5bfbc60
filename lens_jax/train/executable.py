"""A compiled training step on disk: ``lens-train compile --save-executable PATH`` writes it,
``lens-train --config.compiled_step_path=PATH`` runs it instead of jitting the step.

The file (a pickle) holds the serialized executable (``jax.experimental.serialize_executable``) and
what it was made for: the jax and jaxlib versions, the platform and device kind, the mesh shape
and its devices' ids in mesh order (the executable's shardings name devices by id), the number
of processes, and every config field the step depends on (``step_fields``). A run
loads it only when all of these equal its own; otherwise ``ExecutableMismatchError`` names each
difference (a stale executable would silently train another configuration).
"""

from __future__ import annotations

import json
import os
import pickle

import jax
import ml_collections

from lens_jax.errors import ExecutableMismatchError

FORMAT = "lens_jax.compiled_step/1"

# Fields that never enter the jitted step: the run's bookkeeping and where its data comes from.
RUN_FIELDS = ("seed", "init_from", "compiled_step_path", "checkpoint", "logging", "samples",
              "distributed", "coordinator_address", "num_processes", "process_id",
              "heartbeat_timeout_s", "shutdown_timeout_s")
# The data fields that do: the packed batch's shapes and dtypes, and the caption preamble the
# step drops (tokenizer and template date). The rest of ``data`` (path, shuffling, decoding,
# buckets, workers) only changes which images arrive.
STEP_DATA_FIELDS = ("rows_per_host", "image_tokens", "text_tokens", "max_segments",
                    "caption_length", "pixel_dtype", "tokenizer", "template_date")


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def step_fields(config: ml_collections.ConfigDict) -> dict:
    """``{dotted field: value}`` (JSON values) of every config field the compiled step depends on."""
    flat = _flat(json.loads(config.to_json_best_effort()))
    data = {f"data.{k}" for k in STEP_DATA_FIELDS}
    return {k: v for k, v in flat.items()
            if k.split(".")[0] not in RUN_FIELDS and (not k.startswith("data.") or k in data)}


def describe(config: ml_collections.ConfigDict, mesh, num_processes: int) -> dict:
    """What an executable for ``config`` on ``mesh`` is made for (compared on load)."""
    device = mesh.devices.flat[0]
    return {"jax": jax.__version__, "jaxlib": jax.lib.__version__, "platform": device.platform,
            "device_kind": device.device_kind, "mesh": {k: int(v) for k, v in mesh.shape.items()},
            # the executable's shardings name devices by id, in this mesh order
            "device_ids": [int(d.id) for d in mesh.devices.flat],
            "processes": int(num_processes), "config": step_fields(config)}


def differences(saved: dict, wanted: dict) -> list[str]:
    """Each way ``saved`` (the file's description) differs from ``wanted`` (this run's)."""
    out = []
    for key in ("jax", "jaxlib", "platform", "device_kind", "mesh", "processes", "device_ids"):
        if saved.get(key) != wanted[key]:
            old, new = saved.get(key), wanted[key]
            if key == "device_ids":  # thousands on a large slice: the first that differ
                first = next((i for i, (a, b) in enumerate(zip(old or [], new)) if a != b),
                             min(len(old or []), len(new)))
                old, new = (f"[... {v[first:first + 8]} ...] of {len(v)}" for v in (old or [], new))
                key = f"mesh device ids from position {first}"
            out.append(f"{key}: compiled for {old!r}, this run has {new!r}")
    old, new = saved.get("config", {}), wanted["config"]
    for name in sorted(set(old) | set(new)):
        if old.get(name, "<absent>") != new.get(name, "<absent>"):
            out.append(f"config.{name}: compiled with {old.get(name, '<absent>')!r}, this run has "
                       f"{new.get(name, '<absent>')!r}")
    return out


def save(compiled, path: str | os.PathLike, description: dict) -> None:
    """Serializes a compiled step with its ``describe`` (a temporary name, then renamed)."""
    from jax.experimental.serialize_executable import serialize

    payload, in_tree, out_tree = serialize(compiled)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump({"format": FORMAT, "payload": payload, "in_tree": in_tree,
                     "out_tree": out_tree, **description}, f)
    os.replace(tmp, path)


def load(path: str | os.PathLike, wanted: dict | None = None, devices=None):
    """A ``save`` file -> the callable compiled step on ``devices`` (the run's mesh devices in
    mesh order, as the step was compiled over them; default: all of the backend's); with
    ``wanted`` (this run's ``describe``), ``ExecutableMismatchError`` naming every difference
    unless they agree."""
    from jax.experimental.serialize_executable import deserialize_and_load

    try:
        with open(path, "rb") as f:
            saved = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise ExecutableMismatchError(f"config.compiled_step_path={path}: cannot read it ({e})") from e
    if not isinstance(saved, dict) or "payload" not in saved:
        raise ExecutableMismatchError(f"config.compiled_step_path={path}: not a file of "
                                      "lens-train compile --save-executable")
    if saved.get("jax") != jax.__version__:  # a serialized executable only loads in its jax
        raise ExecutableMismatchError(f"{path}: compiled with jax {saved.get('jax')}, this is jax "
                                      f"{jax.__version__}; recompile with lens-train compile")
    if wanted is not None:
        diff = differences(saved, wanted)
        if diff:
            raise ExecutableMismatchError(
                f"config.compiled_step_path={path} was compiled for another run; recompile with "
                f"lens-train compile --save-executable or drop the field:\n  " + "\n  ".join(diff))
    return deserialize_and_load(saved["payload"], saved["in_tree"], saved["out_tree"],
                                execution_devices=None if devices is None else list(devices))
