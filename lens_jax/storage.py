"""Every file a lens_jax command reads or writes, on a local disk or in Google Cloud Storage (``gs://``).

Paths are ``etils.epath.Path`` objects (``path(p)``): the local file system for plain paths, gcsfs
(fsspec) for ``gs://BUCKET/...``; orbax takes the same objects and writes checkpoints through
tensorstore's ``gcs`` driver. GCS has no append and no rename, so:

- a single file is written whole: ``write_bytes``/``write_text`` (a temporary name renamed locally;
  on GCS an object appears only when its upload completes, so it is atomic as it is);
- a folder (``remote_output_dir``) is built in a local temporary folder, then uploaded to GCS
  with the JSON files of each folder after its other files and the deepest folders first, so a
  reader that waits for ``config.json``/``model_index.json`` never sees half a folder (local
  folders: ``lens_jax.output_guard.atomic_output_dir``, a rename);
- a growing file (``metrics.jsonl``, TensorBoard events: ``lens_jax.train.metrics``) lives in a
  local mirror and is uploaded whole (``Mirror``);
- files a C++ reader must open locally (ArrayRecord shards) are copied once into a local cache
  (``local_file``; ``LENS_CACHE_DIR``, default ``~/.cache/lens_jax``).

Emulator: when ``STORAGE_EMULATOR_HOST`` (the variable of Google's own clients, e.g.
``http://127.0.0.1:9023``) is set, ``configure_emulator`` (run on import) points every library at
it, with no credentials: tensorstore (``TENSORSTORE_GCS_HTTP_URL``, a fixed test token so that it
looks for no credentials), gcsfs (anonymous, no gRPC bucket-type probe) and google-auth (no
metadata-server probe). Nothing else in the project reads these variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from etils import epath

EMULATOR_VAR = "STORAGE_EMULATOR_HOST"
CACHE_VAR = "LENS_CACHE_DIR"
REMOTE_PREFIXES = ("gs://",)


def configure_emulator(environ=None) -> str | None:
    """Points tensorstore, gcsfs and google-auth at ``STORAGE_EMULATOR_HOST``; returns its URL.

    ``None`` (and nothing changed) when the variable is unset. Safe to call more than once; run
    when this module is imported, before any GCS client is created.
    """
    environ = os.environ if environ is None else environ
    host = environ.get(EMULATOR_VAR, "").strip()
    if not host or host == "default":
        return None
    url = (host if "://" in host else f"http://{host}").rstrip("/")
    environ["TENSORSTORE_GCS_HTTP_URL"] = url
    # A fixed bearer token: tensorstore then neither reads credential files nor asks the GCE
    # metadata server (an emulator checks no token).
    environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
    environ["TENSORSTORE_GCS_HTTP_VERSION"] = "1"  # plain HTTP/1.1: emulators speak no HTTP/2
    environ["NO_GCE_CHECK"] = "true"               # google-auth: no metadata-server probe
    # gcsfs: anonymous access, and no gRPC bucket-layout probe (an emulator serves JSON only;
    # gcsfs reads this one when it is imported).
    environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    environ["FSSPEC_GCS_TOKEN"] = "anon"
    if environ is os.environ:
        import fsspec

        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
        for protocol in ("gs", "gcs"):  # the plain client even when gcsfs was imported before
            fsspec.register_implementation(protocol, "gcsfs.core.GCSFileSystem", clobber=True)
    return url


def _configure_gcsfs() -> None:
    """No cached directory listings: other processes (orbax's tensorstore writes, other hosts, a
    trainer seen from ``lens-train export``) change the bucket, and a cached listing would hide
    their checkpoints."""
    import fsspec

    fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


configure_emulator()
_configure_gcsfs()


def is_remote(p: str | os.PathLike) -> bool:
    """True for a ``gs://`` path."""
    return os.fspath(p).startswith(REMOTE_PREFIXES)


def path(p: str | os.PathLike) -> epath.Path:
    """``p`` as an ``epath.Path``: ``gs://`` as it is, a local path made absolute (``~`` expanded)."""
    if isinstance(p, epath.Path) and is_remote(p):
        return p
    s = os.fspath(p)
    return epath.Path(s) if is_remote(s) else epath.Path(os.path.abspath(os.path.expanduser(s)))


def native(p: str | os.PathLike) -> Path | epath.Path:
    """``pathlib.Path`` for a local path (as given), ``epath.Path`` for ``gs://``: what a function
    that wrote ``p`` returns."""
    return path(p) if is_remote(p) else Path(os.fspath(p))


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Writes ``p`` whole: nobody ever reads half of it (local: temporary name + rename)."""
    p = path(p)
    if is_remote(p):
        p.write_bytes(data)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=os.fspath(p.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.fspath(p))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(p: str | os.PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text()


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def makedirs(p: str | os.PathLike) -> epath.Path:
    """Creates folder ``p`` (no-op on GCS, which has no folders); returns it as a path."""
    p = path(p)
    if not is_remote(p):
        p.mkdir(parents=True, exist_ok=True)
    return p


def listdir(p: str | os.PathLike) -> list[str]:
    """Names in folder ``p`` (sorted); ``[]`` when it does not exist."""
    p = path(p)
    if not p.exists():
        return []
    return sorted(c.name for c in p.iterdir())


def rmtree(p: str | os.PathLike) -> None:
    """Deletes ``p`` and everything under it; no-op when it does not exist."""
    p = path(p)
    if p.exists():
        p.rmtree() if p.is_dir() else p.unlink()


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves file or folder ``src`` to ``dst`` (GCS: copy then delete, object by object)."""
    src, dst = path(src), path(dst)
    if not is_remote(src) and not is_remote(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    if not src.is_dir():
        src.copy(dst, overwrite=True)
        src.unlink()
        return
    for name, f in files_under(src):
        f.copy(dst / name, overwrite=True)
    src.rmtree()


def files_under(p: str | os.PathLike) -> list[tuple[str, epath.Path]]:
    """``(name relative to p, path)`` of every file under folder ``p``, sorted by name."""
    p = path(p)
    out = []
    for root, _, files in p.walk():
        root = os.fspath(root)
        if is_remote(p) and not is_remote(root):  # gcsfs gives "BUCKET/..." without gs://
            root = "gs://" + root
        for name in files:
            f = path(os.path.join(root, name))
            out.append((os.path.relpath(os.fspath(f), os.fspath(p)) if not is_remote(p)
                        else os.fspath(f)[len(os.fspath(p).rstrip("/")) + 1:], f))
    return sorted(out, key=lambda item: item[0])


def _upload_order(local: Path) -> list[Path]:
    """Files under ``local``: deeper folders first; in each folder its JSON files last."""
    files = [f for f in local.rglob("*") if f.is_file()]
    return sorted(files, key=lambda f: (-len(f.relative_to(local).parts), f.parent.as_posix(),
                                        f.suffix == ".json", f.name))


def upload_dir(local: str | os.PathLike, remote: str | os.PathLike) -> None:
    """Copies the files under local folder ``local`` to ``remote`` in ``_upload_order``."""
    local, remote = Path(local), path(remote)
    for f in _upload_order(local):
        (remote / f.relative_to(local).as_posix()).write_bytes(f.read_bytes())


@contextlib.contextmanager
def remote_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """For a ``gs://`` ``out_dir``: yields a fresh local temporary folder, uploaded to ``out_dir``
    (``upload_dir``, after an old ``out_dir`` is deleted) when the block succeeds. On any
    exception nothing is uploaded and ``out_dir`` is left untouched. (Local folders:
    ``lens_jax.output_guard.atomic_output_dir``, which calls this one for ``gs://``.)"""
    out = path(out_dir)
    if not is_remote(out):
        raise ValueError(f"{out_dir}: not a gs:// path")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        rmtree(out)
        upload_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_dir() -> Path:
    """Local cache of remote files: ``$LENS_CACHE_DIR``, default ``~/.cache/lens_jax``."""
    return Path(os.environ.get(CACHE_VAR) or os.path.expanduser("~/.cache/lens_jax"))


def local_file(p: str | os.PathLike) -> str:
    """A local path holding the bytes of file ``p``: ``p`` itself when local, else a cached copy.

    The copy (``cache_dir()/gcs/BUCKET/PATH``) is downloaded once and reused while its size
    matches the object's; processes sharing a machine may race: each writes a temporary name and
    renames it, so a reader never sees half a file.
    """
    if not is_remote(p):
        return os.fspath(p)
    src = path(p)
    target = cache_dir() / "gcs" / os.fspath(src)[len("gs://"):]
    size = src.stat().length
    if target.is_file() and target.stat().st_size == size:
        return os.fspath(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as f:
            shutil.copyfileobj(f, out, 16 << 20)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return os.fspath(target)


@contextlib.contextmanager
def local_dir(p: str | os.PathLike) -> Iterator[Path]:
    """Yields a local folder with the files of folder ``p``: ``p`` itself when local, else a
    temporary copy deleted afterwards (for readers that memory-map files, e.g. safetensors)."""
    if not is_remote(p):
        yield Path(os.fspath(p))
        return
    src = path(p)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    tmp = Path(tempfile.mkdtemp(prefix="lens-stage-"))
    try:
        for name, f in files_under(src):
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Mirror:
    """A local folder whose files are uploaded whole to a remote folder: GCS cannot append.

    Write files under ``local`` (appending is fine there); ``sync()`` uploads each file that
    changed since the last upload as a whole object, at most every ``min_interval_s`` seconds
    unless forced. For a local ``remote``, ``local`` is ``remote`` itself and ``sync`` does nothing.
    ``pull(name)`` first copies an existing remote file down (to append to it).
    """

    def __init__(self, remote: str | os.PathLike, min_interval_s: float = 30.0):
        self.remote = path(remote)
        self.is_remote = is_remote(self.remote)
        self.min_interval_s = float(min_interval_s)
        if self.is_remote:
            key = hashlib.sha1(os.fspath(self.remote).encode()).hexdigest()[:12]
            self.local = Path(tempfile.mkdtemp(prefix=f"lens-mirror-{key}-"))
        else:
            self.local = Path(os.fspath(self.remote))
            self.local.mkdir(parents=True, exist_ok=True)
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative name -> (size, mtime_ns)
        self._last_sync = 0.0

    def pull(self, name: str) -> Path:
        """The local path of ``name``, first copied down from the remote folder when it exists."""
        target = self.local / name
        if self.is_remote and (self.remote / name).exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((self.remote / name).read_bytes())
            st = target.stat()
            self._uploaded[name] = (st.st_size, st.st_mtime_ns)
        return target

    def sync(self, force: bool = False) -> None:
        if not self.is_remote:
            return
        now = time.monotonic()
        if not force and now - self._last_sync < self.min_interval_s:
            return
        self._last_sync = now
        for f in sorted(self.local.rglob("*")):
            if not f.is_file():
                continue
            name = f.relative_to(self.local).as_posix()
            st = f.stat()
            if self._uploaded.get(name) != (st.st_size, st.st_mtime_ns):
                (self.remote / name).write_bytes(f.read_bytes())
                self._uploaded[name] = (st.st_size, st.st_mtime_ns)

    def forget(self, name: str) -> None:
        """Deletes local file ``name`` after a final upload (it will not change any more)."""
        if self.is_remote:
            self.sync(force=True)
            (self.local / name).unlink(missing_ok=True)

    def close(self) -> None:
        self.sync(force=True)
        if self.is_remote:
            shutil.rmtree(self.local, ignore_errors=True)


# ----------------------------------------------------------------------------- versioned objects
# Compare-and-swap on one small gs:// object, the object's generation as its version (GCS
# preconditions: ifGenerationMatch, 0 = "does not exist yet"). google-cloud-storage (a dependency
# of gcsfs) honours STORAGE_EMULATOR_HOST itself, with anonymous credentials.

def _blob(p: str | os.PathLike):
    from google.cloud import storage as gcs

    bucket, _, name = os.fspath(p)[len("gs://"):].partition("/")
    if not name:
        raise ValueError(f"{p}: expected gs://BUCKET/OBJECT")
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = gcs.Client()
    return _CLIENT.bucket(bucket).blob(name)


_CLIENT = None


def read_versioned(p: str | os.PathLike) -> tuple[str | None, int | None]:
    """``(text, generation)`` of ``gs://`` object ``p``; ``(None, None)`` when it does not exist."""
    from google.api_core import exceptions

    for _ in range(5):  # the object may be replaced between reading its generation and its bytes
        blob = _blob(p)
        try:
            blob.reload()
            generation = blob.generation
            return blob.download_as_bytes(if_generation_match=generation).decode("utf-8"), generation
        except exceptions.NotFound:
            return None, None
        except exceptions.PreconditionFailed:
            continue
    raise OSError(f"{p}: changes faster than it can be read")


def write_if_generation(p: str | os.PathLike, text: str, generation: int) -> int | None:
    """Writes ``p`` only if it is at ``generation`` (0: only if absent); the new generation, or
    ``None`` when the precondition failed."""
    from google.api_core import exceptions

    blob = _blob(p)
    try:
        blob.upload_from_string(text.encode("utf-8"), if_generation_match=int(generation))
    except exceptions.PreconditionFailed:
        return None
    return blob.generation


def delete_if_generation(p: str | os.PathLike, generation: int) -> bool:
    """Deletes ``p`` only if it is still at ``generation``; whether it did."""
    from google.api_core import exceptions

    try:
        _blob(p).delete(if_generation_match=int(generation))
    except (exceptions.PreconditionFailed, exceptions.NotFound):
        return False
    return True
