"""Streaming safetensors I/O shared by every converter (denoiser, VAE, text encoder).

Reads a Hugging Face / diffusers folder tensor by tensor (one ``*.safetensors`` file, or
sharded files listed by ``*.safetensors.index.json``), writes sharded folders with an index,
and never unpickles anything. Output folders are written to a temporary folder and renamed (or,
on gs://, uploaded) at the end, so a failure never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from lens_jax import storage
from lens_jax.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: pickled checkpoints are refused (they can run arbitrary code when loaded). "
        "Convert it to safetensors first, in an environment you trust, e.g.\n"
        "  python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); "
        "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\"\n"
        "or with diffusers: Model.from_pretrained(dir).save_pretrained(out, safe_serialization=True)."
    )


# Bytes per element of the safetensors dtypes (the format's own names).
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def check_safetensors_file(path: str | os.PathLike) -> dict[str, dict]:
    """Reads and checks a safetensors file's header against its size; returns the tensors' header
    entries (``{key: {"dtype", "shape", "data_offsets"}}``).

    Raises ``CheckpointError`` naming the file, in one line, when the file is truncated, padded
    or its header is malformed (what a cut download or an interrupted copy leaves).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of "
                                  f"{header_len} bytes, file of {size} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_size, end = size - 8 - header_len, 0
    for key, entry in header.items():
        try:
            start, stop = (int(v) for v in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed header entry for tensor {key!r} ({e})") from e
        if stop > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} ends at byte {stop} of the "
                                  f"data, the file holds {data_size} (re-download or re-copy it)")
        if dtype in _ST_ITEMSIZE and stop - start != int(np.prod(shape)) * _ST_ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: tensor {key!r} of shape {tuple(shape)} {dtype} spans "
                                  f"{stop - start} bytes, expected "
                                  f"{int(np.prod(shape)) * _ST_ITEMSIZE[dtype]}")
        end = max(end, stop)
    if end != data_size:
        raise CheckpointError(f"{path}: {data_size - end} bytes after the last tensor "
                              "(not a valid safetensors file)")
    return header


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
            weight_map = read_json(indexes[0]).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{indexes[0]}: no 'weight_map' in the index")
            for key, name in weight_map.items():
                path = self.folder / name
                if not path.is_file():
                    raise CheckpointError(f"{indexes[0]}: key {key!r} points to missing file {name}")
                self._key_file[key] = path
            headers = {p: check_safetensors_file(p) for p in set(self._key_file.values())}
            for key, path in self._key_file.items():
                if key not in headers[path]:
                    raise CheckpointError(f"{indexes[0]}: key {key!r} is not in {path.name}")
        else:
            if len(files) > 1:
                raise CheckpointError(
                    f"{self.folder}: {len(files)} safetensors files but no *.safetensors.index.json")
            for key in check_safetensors_file(files[0]):
                self._key_file[key] = files[0]
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
            try:
                handle = safe_open(path, framework="numpy")
                self._handles[path] = handle.__enter__()
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
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
        """One tensor as a numpy array (bf16 as ``ml_dtypes.bfloat16``).

        The file is mapped for this read only: pages read through a long-lived mapping stay
        resident (and count in RSS) until it is closed, which would grow to the checkpoint's size.
        """
        if key not in self._key_file:
            raise CheckpointError(f"{self.folder}: missing tensor {key!r}")
        try:
            with safe_open(self._key_file[key], framework="numpy") as f:
                return np.array(f.get_tensor(key), copy=True)
        except (SafetensorError, OSError) as e:  # e.g. the file changed since it was checked
            raise CheckpointError(f"{self._key_file[key]}: cannot read tensor {key!r} ({e})") from e


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file, local or ``gs://``."""
    path = storage.native(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (is {path.parent} a checkpoint folder?)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def check_field_types(config_json: dict, defaults: dict, path: str | os.PathLike,
                      positive: bool = False) -> None:
    """Raises ``CheckpointError`` (one line naming the file and field) when a field of a
    ``config.json`` has another type than its default, e.g. ``"num_layers": "two"``; lists must
    hold elements of the default's element type. ``positive``: integers must be >= 1 (list
    elements are not checked for sign)."""
    def fits(value, default, positive: bool) -> tuple[bool, str]:
        if isinstance(default, bool):
            return isinstance(value, bool), "true or false"
        if isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            return (ok and value >= 1, "an integer >= 1") if positive else (ok, "an integer")
        if isinstance(default, float):
            return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        return isinstance(value, str), "a string"

    for key, default in defaults.items():
        if key not in config_json or default is None:
            continue
        value = config_json[key]
        if isinstance(default, (tuple, list)):
            plural = {"an integer": "integers", "a number": "numbers", "a string": "strings",
                      "true or false": "booleans"}
            ok = isinstance(value, list) and all(fits(v, default[0], False)[0] for v in value
                                                 if default)
            want = f"a list of {plural[fits(None, default[0], False)[1]]}" if default else "a list"
        else:
            ok, want = fits(value, default, positive)
        if not ok:
            raise CheckpointError(f"{path}: {key} is {json.dumps(value)}, expected {want}")


def write_json(path: str | os.PathLike, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


# safetensors dtype names of the numpy dtypes we write (the format's own spelling).
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


class ShardedWriter:
    """Writes tensors one by one into ``{prefix}-0000i-of-0000n.safetensors`` shards plus an index.

    Tensor data goes straight to disk as it is added (a shard's payload is spooled to a side file
    and joined to its header when the shard is closed), so memory holds one tensor, never a shard.
    The safetensors library only writes whole dicts, hence this small writer of the documented
    format (8-byte header length, JSON header with ``data_offsets``, raw little-endian data);
    files are read back with the library. A shard closes before it would pass ``max_shard_bytes``.
    With a single shard the file is ``{prefix}.safetensors`` and no index is written (diffusers'
    convention).
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, max_shard_bytes: int = 2 << 30):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self._header: dict[str, dict] = {}
        self._payload = None
        self._offset = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._seen: set[str] = set()
        self._total_bytes = 0

    def add(self, key: str, array: np.ndarray) -> None:
        if key in self._seen:
            raise CheckpointError(f"duplicate tensor key {key!r} while writing {self.out_dir}")
        array = np.asarray(array, order="C")  # keeps 0-d tensors 0-d (ascontiguousarray would not)
        if array.dtype.name not in _ST_DTYPES:
            raise CheckpointError(f"tensor {key!r}: dtype {array.dtype} cannot be written to safetensors")
        if self._header and self._offset + array.nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._payload is None:
            self._payload = open(self.out_dir / f".{self.prefix}-part{len(self._shards):05d}.payload", "wb")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        self._payload.write(data)
        self._header[key] = {"dtype": _ST_DTYPES[array.dtype.name], "shape": list(array.shape),
                             "data_offsets": [self._offset, self._offset + len(data)]}
        self._offset += len(data)
        self._seen.add(key)
        self._total_bytes += len(data)

    def _close_shard(self) -> None:
        if self._payload is None:  # an empty checkpoint still gets one (empty) file
            self._payload = open(self.out_dir / f".{self.prefix}-part{len(self._shards):05d}.payload", "wb")
        payload_path = Path(self._payload.name)
        self._payload.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # pad to 8 bytes, as the library does
        name = f"{self.prefix}-part{len(self._shards):05d}.safetensors.tmp"
        with open(self.out_dir / name, "wb") as out, open(payload_path, "rb") as payload:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(payload, out, 16 << 20)
        payload_path.unlink()
        self._shards.append((name, list(self._header)))
        self._header, self._payload, self._offset = {}, None, 0

    def finish(self) -> list[str]:
        """Closes the last shard, gives the shards their final names, writes the index."""
        if self._header or not self._shards:
            self._close_shard()
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
