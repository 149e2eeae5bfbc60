"""Device mesh (axes slice, data, fsdp, tensor) and parameter shardings from config."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lens_jax.train.config import MESH_AXES

log = logging.getLogger(__name__)


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> bool:
    """Calls ``jax.distributed.initialize`` for multi-host runs; returns whether it did.

    ``config.distributed``: "no", "yes" (always; address/count/id from config or the cluster), or
    "auto" (only when a cluster environment variable says there are several processes).
    """
    mode = config.distributed
    if mode == "no":
        return False
    if mode == "auto":
        multi = (int(os.environ.get("SLURM_NTASKS", "1")) > 1
                 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
                 or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
                 or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")))
        if not multi:
            return False
    elif mode != "yes":
        raise ValueError(f"config.distributed={mode!r}: expected auto|yes|no")
    kwargs = {}
    if config.coordinator_address:
        kwargs["coordinator_address"] = config.coordinator_address
    if config.num_processes > 0:
        kwargs["num_processes"] = int(config.num_processes)
    if config.process_id >= 0:
        kwargs["process_id"] = int(config.process_id)
    jax.distributed.initialize(heartbeat_timeout_seconds=int(config.heartbeat_timeout_s),
                               shutdown_timeout_seconds=int(config.shutdown_timeout_s), **kwargs)
    log.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
    return True


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves the one ``-1`` entry of the mesh config; checks the product equals ``num_devices``."""
    sizes = {a: int(mesh_config[a]) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {free}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                             f"{ {a: s for a, s in sizes.items() if s != -1} }")
        sizes[free[0]] = num_devices // fixed
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise ValueError(f"config.mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, "
                         f"{num_devices} are used (config.mesh.num_devices / jax.devices())")
    return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence | None = None) -> Mesh:
    """A ``Mesh`` with axes (slice, data, fsdp, tensor) from ``config.mesh``, laid out on the topology.

    One slice: ``jax.make_mesh`` (``mesh_utils.create_device_mesh``: neighbouring mesh coordinates
    on neighbouring chips of the TPU torus; other backends keep the device order). Several slices
    (devices with distinct ``slice_index``): ``mesh_utils.create_hybrid_device_mesh``, so that only
    the ``slice`` axis crosses the data-centre network; ``config.mesh.slice`` must equal the number
    of slices. A shape that does not match the devices is a ValueError naming both; one the
    torus cannot hold (e.g. data=2 on v5p-128's 4x4x4 chips) says which shapes it can, and that
    ``config.mesh.allow_split_physical_axes=True`` accepts it with physical axes split.
    """
    if devices is None:
        devices = jax.devices()
        if mesh_config.num_devices > 0:
            if mesh_config.num_devices > len(devices):
                raise ValueError(f"config.mesh.num_devices={mesh_config.num_devices} but only "
                                 f"{len(devices)} devices exist")
            devices = devices[:mesh_config.num_devices]
    devices = list(devices)
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if sizes["slice"] != num_slices:
        raise ValueError(f"config.mesh {sizes} has slice={sizes['slice']} but the {len(devices)} "
                         f"devices ({devices[0].device_kind}) form {num_slices} slice(s): set "
                         f"--config.mesh.slice={num_slices}")
    if num_slices > 1:
        from jax.experimental import mesh_utils

        per_slice = (1,) + shape[1:]
        dcn = (num_slices, 1, 1, 1)
        array = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices=devices,
                                                     allow_split_physical_axes=True)
        return Mesh(array, MESH_AXES)
    split = bool(mesh_config.get("allow_split_physical_axes", False))
    try:
        return _single_slice_mesh(shape, devices, split)
    except (ValueError, NotImplementedError, AssertionError) as e:  # a shape the torus cannot hold
        hint = ""
        if not split:
            fits = fitting_shapes(sizes, devices)
            hint = ("; set --config.mesh.allow_split_physical_axes=True to split the torus' axes "
                    "between mesh axes (their collectives then share links)"
                    + (", or use a shape that fits it: " + " or ".join(
                        " ".join(f"--config.mesh.{a}={v}" for a, v in f.items() if v != sizes[a])
                        for f in fits) if fits else ""))
        raise ValueError(f"config.mesh {sizes} cannot be laid out on {len(devices)} "
                         f"{devices[0].device_kind} devices: {e}{hint}") from e


def _single_slice_mesh(shape: tuple[int, ...], devices: list, allow_split: bool) -> Mesh:
    """``jax.make_mesh`` (Auto axes: shardings come from in/out_shardings and constraints, as
    before jax 0.7's Explicit default), or with ``allow_split`` ``mesh_utils.create_device_mesh``
    allowed to split one physical axis of the torus over several mesh axes."""
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if not allow_split:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    from jax.experimental import mesh_utils

    array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def fitting_shapes(sizes: dict[str, int], devices: list, limit: int = 2) -> list[dict[str, int]]:
    """Up to ``limit`` shapes near ``sizes`` (same slice and tensor; ``data`` the closest powers
    or divisors, the rest ``fsdp``) that lay out on ``devices`` without splitting physical axes;
    more data parallelism first."""
    rest = len(devices) // (sizes["slice"] * sizes["tensor"])
    divisors = [d for d in range(1, rest + 1) if rest % d == 0 and d != sizes["data"]]
    # nearest in ratio to the data size asked for; at equal distance the larger data size
    divisors.sort(key=lambda d: (abs(np.log(d / sizes["data"])), -d))
    out = []
    for data in divisors:
        shape = dict(sizes, data=data, fsdp=rest // data)
        try:
            _single_slice_mesh(tuple(shape[a] for a in MESH_AXES), devices, False)
        except (ValueError, NotImplementedError, AssertionError):
            continue
        out.append(shape)
        if len(out) == limit:
            break
    return out


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes the batch (rows) is split over: every data-like axis."""
    return tuple(a for a in ("slice", "fsdp", "data") if a in mesh.shape)  # = DEFAULT_RULES["batch"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh) -> NamedSharding:
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes))
