"""Logical axis names -> mesh axes, by rules held in config (MaxText style).

Every parameter carries logical names (``nnx.Param(..., out_sharding=("embed", "mlp"))``) and the
main activations are constrained with ``constrain(x, ("batch", "length", "embed"))``. A rules list
such as ``[("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor")]`` maps them onto a
``jax.sharding.Mesh``. Names without a rule, or whose mesh axes are already used by an earlier
dimension of the same array, are replicated. Without an active ``use_rules`` context,
``constrain`` does nothing, so models run unchanged on one device.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]

_active = threading.local()


def logical_to_spec(names: Sequence[str | None], rules: Rules,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """Maps a tuple of logical axis names to a PartitionSpec (first matching rule wins)."""
    table: dict[str, object] = {}
    for name, axes in rules:
        table.setdefault(name, axes)
    used: set[str] = set()
    spec = []
    for name in names:
        axes = table.get(name) if name is not None else None
        if axes is None:
            spec.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Activates ``constrain`` for code traced inside the context."""
    previous = getattr(_active, "value", None)
    _active.value = (mesh, rules)
    try:
        yield
    finally:
        _active.value = previous


def active() -> tuple[Mesh, Rules] | None:
    """The ``(mesh, rules)`` of the innermost ``use_rules`` context, or None outside one."""
    return getattr(_active, "value", None)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (those dimensions are replicated)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        size = 1
        for a in names:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names under the active rules; identity otherwise."""
    active = getattr(_active, "value", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules, mesh)))


def tree_shardings(logical_specs, mesh: Mesh, rules: Rules):
    """A pytree of logical-name PartitionSpecs (``nnx.get_partition_spec``) -> NamedShardings."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh)),
        logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(logical_specs, abstract_params, mesh: Mesh, rules) -> dict:
    """NamedShardings for a parameter tree from its logical-name specs (non-divisible dims replicated)."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, fit_spec(logical_to_spec(tuple(spec), rules, mesh),
                                                      x.shape, mesh)),
        logical_specs, abstract_params, is_leaf=lambda x: isinstance(x, PartitionSpec))
