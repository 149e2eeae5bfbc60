"""TPU slices by the names users know (``v5p-128``, ``v6e-256``, ``v5litepod-8``): the one table.

``topology("v5p-128")`` gives the libtpu topology string (``v5p:4x4x4``), the chips per host, the
HBM and peak FLOP/s of a chip; ``topology_devices`` gives that slice's devices on any host (no TPU
needed: ``jax.experimental.topologies`` builds them from libtpu), for AOT compiles (``lens-train
compile``, ``lens-sample compile``).

Naming (Cloud TPU): the number after ``v4-``/``v5p-`` counts TensorCores, two per chip (v5p-8 is
4 chips); after ``v5e-``/``v5litepod-``/``v6e-`` it counts chips (one TensorCore each).
"""

from __future__ import annotations

import dataclasses
import os
import re

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: what a chip holds and how its slices are laid out."""

    libtpu_name: str        # prefix of the libtpu topology string ("v5p" in "v5p:2x2x1")
    cores_per_chip: int     # TensorCores counted by the slice name (v4-8 = 4 chips)
    hbm_bytes: int          # HBM per chip
    peak_flops: float       # dense bf16 FLOP/s per chip (no sparsity)
    torus_dims: int         # 3 (v4, v5p: 3-D torus) or 2 (v5e, v6e)
    chip_config: str        # libtpu chip config: "megacore" = one JAX device per v4 chip
    device_kind: str        # what libtpu's devices report as ``device_kind``


# Cloud TPU documentation (system architecture pages of each generation); device kinds as libtpu
# 0.0.42 reports them (tests/tpu/test_topologies.py reads them from the topology's devices).
GENERATIONS = {
    "v4": Generation("v4", 2, 32 * GiB, 275e12, 3, "megacore", "TPU v4"),
    "v5p": Generation("v5p", 2, 95 * GiB, 459e12, 3, "default", "TPU v5"),
    "v5e": Generation("v5e", 1, 16 * GiB, 197e12, 2, "default", "TPU v5 lite"),
    "v6e": Generation("v6e", 1, 32 * GiB, 918e12, 2, "default", "TPU v6 lite"),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}
CPU = "cpu"  # the pseudo-topology of this host's CPU devices (``topology("cpu")``)

# Chips -> physical shape of a slice (the shapes Cloud TPU provisions for these sizes).
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16),
             4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
             256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A single slice; ``num_slices`` copies of it are joined over the data-centre network."""

    name: str                      # as given, e.g. "v5p-128"
    generation: str                # "v5p"
    topology: str                  # libtpu topology string, e.g. "v5p:4x4x4"
    chips: int                     # chips (= JAX devices) per slice
    chips_per_host: int
    host_bounds: tuple[int, int, int]  # chips of one host along each torus axis
    hbm_bytes: int                 # per chip
    peak_flops: float              # per chip
    chip_config: str

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host


def topology(name: str) -> Topology:
    """``"v5p-128"`` (or a libtpu string such as ``"v5p:2x2x1"``) -> its ``Topology``; ``"cpu"``:
    this process's CPU devices, the host's RAM as their memory."""
    raw = name.strip().lower()
    if raw == CPU:
        import jax

        chips = len(jax.devices("cpu"))
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Topology(name=CPU, generation=CPU, topology=CPU, chips=chips, chips_per_host=chips,
                        host_bounds=(1, 1, 1), hbm_bytes=int(memory), peak_flops=0.0, chip_config="")
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", raw)
    if m:
        gen_name = ALIASES.get(m.group(1), m.group(1))
        gen = _generation(gen_name, name)
        count = int(m.group(2))
        if count % gen.cores_per_chip:
            raise ValueError(f"topology {name!r}: {gen_name} slice sizes count TensorCores "
                             f"({gen.cores_per_chip} per chip), so the number must be even")
        chips = count // gen.cores_per_chip
        shapes = SHAPES_3D if gen.torus_dims == 3 else SHAPES_2D
        if chips not in shapes:
            sizes = ", ".join(f"{gen_name}-{c * gen.cores_per_chip}" for c in shapes)
            raise ValueError(f"topology {name!r}: no {gen_name} slice of {chips} chips; known: {sizes}")
        shape = shapes[chips]
    else:
        m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", raw)
        if not m:
            raise ValueError(f"topology {name!r}: expected a slice name such as v5p-128, v6e-256, "
                             "v5e-8 (= v5litepod-8), v4-128, or a libtpu string such as v5p:2x2x1")
        gen_name = ALIASES.get(m.group(1), m.group(1))
        gen = _generation(gen_name, name)
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != gen.torus_dims:
            raise ValueError(f"topology {name!r}: {gen_name} slices have {gen.torus_dims} axes")
        chips = 1
        for s in shape:
            chips *= s
    # Single-host slices put every chip on the host (up to 8 on v5e/v6e, 4 on v4/v5p); larger
    # slices have 4 chips per host in a 2x2 block.
    single_host_max = 8 if gen.torus_dims == 2 else 4
    if chips <= single_host_max:
        bounds = tuple(shape) + (1,) * (3 - len(shape))
        per_host = chips
    else:
        bounds = (2, 2, 1)
        per_host = 4
    return Topology(name=name, generation=gen_name,
                    topology=f"{gen.libtpu_name}:{'x'.join(str(s) for s in shape)}", chips=chips,
                    chips_per_host=per_host, host_bounds=bounds, hbm_bytes=gen.hbm_bytes,
                    peak_flops=gen.peak_flops, chip_config=gen.chip_config)


def generation_of_device(device_kind: str) -> Generation | None:
    """The generation whose chips report ``device_kind`` (e.g. "TPU v5 lite" -> v5e); None if
    no TPU generation of the table does."""
    for gen in GENERATIONS.values():
        if gen.device_kind == device_kind.strip():
            return gen
    return None


def _generation(gen_name: str, name: str) -> Generation:
    if gen_name not in GENERATIONS:
        raise ValueError(f"topology {name!r}: unknown TPU generation {gen_name!r}; known: "
                         f"{', '.join(list(GENERATIONS) + list(ALIASES))}")
    return GENERATIONS[gen_name]


def libtpu_missing_reason() -> str:
    """Why TPU topologies cannot be built here ("" when libtpu is importable)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return ("libtpu is not installed: pip install -e '.[tpu]' (jax[tpu] at the jax version of "
                "setup.py) to compile for TPU topologies on this host")
    return ""


def compile_only_backend() -> None:
    """Keeps JAX off any local accelerator (call before the first computation): an AOT compile
    for a topology needs none, and on a TPU VM the chips may be busy training."""
    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def topology_devices(topo: Topology, num_slices: int = 1) -> list:
    """The JAX devices of ``num_slices`` slices of ``topo`` (compile-only; no TPU needed)."""
    if topo.generation == CPU:
        import jax

        if num_slices != 1:
            raise ValueError("topology cpu: one slice only (--num-slices 1)")
        return list(jax.devices("cpu"))
    reason = libtpu_missing_reason()
    if reason:
        raise RuntimeError(reason)
    # Compiling needs no TPU: let several compiles (tests, preflights) share libtpu instead of
    # failing on its one-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies as jax_topologies

    desc = jax_topologies.get_topology_desc(
        platform="tpu", topology_name=topo.topology, chip_config_name=topo.chip_config,
        chips_per_host_bounds=topo.host_bounds, num_slices=int(num_slices))
    return list(desc.devices)
