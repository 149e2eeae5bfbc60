"""Streaming safetensors I/O shared by every converter (denoiser, VAE, text encoder).

Reads a Hugging Face / diffusers folder tensor by tensor (one ``*.safetensors`` file, or
sharded files listed by ``*.safetensors.index.json``), writes sharded folders with an index,
and never unpickles anything. Output folders are written to a temporary sibling and renamed
at the end, so a failure never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what the loader expects."""


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: pickled checkpoints are refused (they can run arbitrary code when loaded). "
        "Convert it to safetensors first, in an environment you trust, e.g.\n"
        "  python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); "
        "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\"\n"
        "or with diffusers: Model.from_pretrained(dir).save_pretrained(out, safe_serialization=True)."
    )


class SafetensorsFolder:
    """Read-only, lazy view of the tensors in a checkpoint folder.

    ``folder`` holds either one ``*.safetensors`` file or several plus an
    ``*.safetensors.index.json`` whose ``weight_map`` names the file of every key.
    Tensors are read one at a time (``read``), so host memory stays at one tensor.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            if self.folder.suffix in PICKLE_SUFFIXES:
                raise _pickle_refusal(self.folder)
            raise CheckpointError(f"{self.folder}: not a checkpoint folder (no such directory)")
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = [p for p in sorted(self.folder.iterdir()) if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise _pickle_refusal(pickles[0])
            raise CheckpointError(
                f"{self.folder}: not a checkpoint folder (no *.safetensors file in it)")
        self._key_file: dict[str, Path] = {}
        if indexes:
            if len(indexes) > 1:
                raise CheckpointError(f"{self.folder}: several index files: {[p.name for p in indexes]}")
            with open(indexes[0]) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{indexes[0]}: no 'weight_map' in the index")
            for key, name in weight_map.items():
                path = self.folder / name
                if not path.is_file():
                    raise CheckpointError(f"{indexes[0]}: key {key!r} points to missing file {name}")
                self._key_file[key] = path
        else:
            if len(files) > 1:
                raise CheckpointError(
                    f"{self.folder}: {len(files)} safetensors files but no *.safetensors.index.json")
            files_to_scan = files
            for path in files_to_scan:
                with safe_open(path, framework="numpy") as f:
                    for key in f.keys():
                        self._key_file[key] = path
        self._handles: dict[Path, object] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def _handle(self, key: str):
        path = self._key_file[key]
        if path not in self._handles:
            handle = safe_open(path, framework="numpy")
            self._handles[path] = handle.__enter__()
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._key_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def file_of(self, key: str) -> Path:
        return self._key_file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info(key)[0]

    def dtype(self, key: str) -> str:
        """The safetensors dtype string of ``key`` (``F32``, ``BF16``, ``U8``, ...)."""
        return self._info(key)[1]

    def _info(self, key: str) -> tuple[tuple[int, ...], str]:
        if key not in self._meta:
            tensor_slice = self._handle(key).get_slice(key)
            self._meta[key] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        return self._meta[key]

    def read(self, key: str) -> np.ndarray:
        """One tensor as a numpy array (bf16 as ``ml_dtypes.bfloat16``), copied out of the mmap."""
        if key not in self._key_file:
            raise CheckpointError(f"{self.folder}: missing tensor {key!r}")
        return np.array(self._handle(key).get_tensor(key), copy=True)


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (is {path.parent} a checkpoint folder?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def write_json(path: str | os.PathLike, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


class ShardedWriter:
    """Writes tensors one by one into ``{prefix}-0000i-of-0000n.safetensors`` shards plus an index.

    A shard is flushed to disk as soon as adding the next tensor would pass ``max_shard_bytes``,
    so host memory holds at most one shard. With a single shard the file is named
    ``{prefix}.safetensors`` and no index is written (the diffusers convention).
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, max_shard_bytes: int = 2 << 30):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._total_bytes = 0

    def add(self, key: str, array: np.ndarray) -> None:
        if key in self._pending or any(key in keys for _, keys in self._shards):
            raise CheckpointError(f"duplicate tensor key {key!r} while writing {self.out_dir}")
        array = np.ascontiguousarray(array)
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = array
        self._pending_bytes += array.nbytes
        self._total_bytes += array.nbytes

    def _flush(self) -> None:
        name = f"{self.prefix}-part{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, str(self.out_dir / name), metadata={"format": "pt"})
        self._shards.append((name, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self) -> list[str]:
        """Flushes the last shard, gives the shards their final names, writes the index."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        final_names = ([f"{self.prefix}.safetensors"] if n == 1 else
                       [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        weight_map = {}
        for (tmp_name, keys), name in zip(self._shards, final_names):
            os.replace(self.out_dir / tmp_name, self.out_dir / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            write_json(self.out_dir / f"{self.prefix}.safetensors.index.json",
                       {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map})
        return final_names


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary folder beside ``out_dir``; renames it to ``out_dir`` on success.

    On any exception the temporary folder is deleted and ``out_dir`` is left untouched.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
