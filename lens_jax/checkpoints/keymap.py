"""One key-mapping mechanism for every converter: PyTorch state-dict keys <-> JAX parameter paths.

A converter describes its model as a list of ``TensorMapping``s (built from the model config);
the generic functions here load a checkpoint folder into a nested dict of numpy arrays in the
JAX layout (checking for missing, unexpected and misshaped tensors) and walk JAX parameters
back out as PyTorch tensors. Layout changes (transposes, reshapes, stacking of per-layer
tensors on a leading ``layers`` axis) are pairs of pure functions, inverse to each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from lens_jax.checkpoints.safetensors_io import SafetensorsFolder
from lens_jax.errors import CheckpointError

Path = tuple[str, ...]
Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One PyTorch tensor and where it lives in the JAX parameter tree.

    ``index`` is the position on the leading (stacked) axis of the JAX array, or None when the
    PyTorch tensor is the whole JAX array. ``to_jax``/``to_torch`` convert one tensor's layout.
    """

    key: str
    path: Path
    torch_shape: tuple[int, ...]
    index: int | None = None
    to_jax: Transform = identity
    to_torch: Transform = identity


def linear(in_shape: Sequence[int] = (), out_shape: Sequence[int] = ()) -> tuple[Transform, Transform]:
    """Transforms for a torch Linear weight ``[out, in]`` <-> JAX kernel ``[*in_shape, *out_shape]``."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)

    def to_jax(w: np.ndarray) -> np.ndarray:
        kernel = w.T
        return kernel.reshape((in_shape or kernel.shape[:1]) + (out_shape or kernel.shape[1:]))

    def to_torch(kernel: np.ndarray) -> np.ndarray:
        n_in = int(np.prod(in_shape)) if in_shape else kernel.shape[0]
        return np.ascontiguousarray(kernel.reshape(n_in, -1).T)

    return to_jax, to_torch


def reshape(jax_shape: Sequence[int], torch_shape: Sequence[int]) -> tuple[Transform, Transform]:
    return (lambda x: x.reshape(tuple(jax_shape)), lambda x: x.reshape(tuple(torch_shape)))


def conv2d() -> tuple[Transform, Transform]:
    """PyTorch conv weight ``OIHW`` <-> Flax ``HWIO``."""
    return (lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
            lambda k: np.ascontiguousarray(k.transpose(3, 2, 0, 1)))


def jax_shapes(mappings: Iterable[TensorMapping]) -> dict[Path, tuple[int, ...]]:
    """The shape of every JAX array the mappings describe (stacked arrays get their leading axis)."""
    shapes: dict[Path, tuple[int, ...]] = {}
    counts: dict[Path, int] = {}
    for m in mappings:
        inner = m.to_jax(np.empty(m.torch_shape, np.uint8)).shape
        if m.index is None:
            shapes[m.path] = inner
        else:
            counts[m.path] = max(counts.get(m.path, 0), m.index + 1)
            shapes[m.path] = inner
    for path, n in counts.items():
        shapes[path] = (n,) + shapes[path]
    return shapes


def check_keys(source: str, found: Iterable[str], mappings: Sequence[TensorMapping],
               ignore: Callable[[str], bool] = lambda key: False) -> None:
    """Raises a CheckpointError naming every missing and unexpected key."""
    found = {k for k in found if not ignore(k)}
    expected = {m.key for m in mappings}
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing tensors: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {show(unexpected)}")
        raise CheckpointError(f"{source}: " + "; ".join(parts))


def load_tensor(folder: SafetensorsFolder, m: TensorMapping, dtype=None) -> np.ndarray:
    """Reads one tensor, checks its shape, returns it in the JAX layout (optionally cast)."""
    found = folder.shape(m.key)
    if tuple(found) != tuple(m.torch_shape):
        raise CheckpointError(
            f"{folder.file_of(m.key)}: tensor {m.key!r} has shape {tuple(found)}, "
            f"expected {tuple(m.torch_shape)}")
    array = m.to_jax(folder.read(m.key))
    return array.astype(dtype) if dtype is not None else array


def load_params(folder: SafetensorsFolder, mappings: Sequence[TensorMapping], dtype=None,
                ignore: Callable[[str], bool] = lambda key: False,
                progress: Callable[[Iterable], Iterable] = lambda it: it,
                strict: bool = True) -> dict[Path, np.ndarray]:
    """Loads every mapped tensor into ``{path: array}`` in the JAX layout, stacking where asked.

    The dtype of the result is the checkpoint's unless ``dtype`` is given. Raises
    ``CheckpointError`` on missing or misshaped tensors, and (``strict``) on tensors of the folder
    that no mapping covers, before reading any data. ``strict=False`` loads a subset of a folder.
    """
    if strict:
        check_keys(str(folder.folder), folder.keys(), mappings, ignore)
    else:
        check_keys(str(folder.folder), [m.key for m in mappings if m.key in folder], mappings)
    for m in mappings:
        found = folder.shape(m.key)
        if tuple(found) != tuple(m.torch_shape):
            raise CheckpointError(
                f"{folder.file_of(m.key)}: tensor {m.key!r} has shape {tuple(found)}, "
                f"expected {tuple(m.torch_shape)}")
    shapes = jax_shapes(mappings)
    out: dict[Path, np.ndarray] = {}
    for m in progress(mappings):
        array = load_tensor(folder, m, dtype)
        if m.index is None:
            out[m.path] = array
        else:
            if m.path not in out:
                out[m.path] = np.empty(shapes[m.path], array.dtype)
            out[m.path][m.index] = array
    return out


def torch_tensors(params: Mapping[Path, np.ndarray],
                  mappings: Sequence[TensorMapping]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(torch_key, array)`` in mapping order from JAX-layout arrays, checking shapes."""
    for m in mappings:
        if m.path not in params:
            raise CheckpointError(f"parameter {'/'.join(m.path)} (for {m.key!r}) is missing")
        array = params[m.path]
        if m.index is not None:
            array = array[m.index]  # sliced where it lives (device or host) before the copy
        tensor = m.to_torch(np.asarray(array))
        if tuple(tensor.shape) != tuple(m.torch_shape):
            raise CheckpointError(
                f"parameter {'/'.join(m.path)} gives {m.key!r} the shape {tuple(tensor.shape)}, "
                f"expected {tuple(m.torch_shape)}")
        yield m.key, tensor


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, object]:
    """Nested dict -> ``{path_tuple: leaf}``."""
    out: dict[Path, object] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def unflatten(flat: Mapping[Path, object]) -> dict:
    """``{path_tuple: leaf}`` -> nested dict."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return tree
