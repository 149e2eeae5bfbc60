"""Outputs never destroy inputs: the checks every writing command makes before it writes.

- ``check_output``: an output that equals, contains or lies inside one of the command's inputs
  is refused (``lens-convert to-orbax --src ckpt/transformer --out ckpt --overwrite`` would
  otherwise replace ``ckpt/`` and the source with it).
- ``check_replaceable``: ``--overwrite`` replaces a folder only if it holds nothing but what the
  command itself writes (``patterns``); anything else in it is named and the command stops.
- ``leftover_temporaries`` / ``clean_leftovers``: temporary folders ``.NAME.tmp-PID@HOST-XXXX``
  (and ``.NAME.old-...``) of runs killed before their final rename. Those of a process that no
  longer runs on this host are deleted; others (another host, or the old nameless format) are
  reported with the command to delete them.
- ``interrupts_raise`` / ``raise_if_interrupted``: Ctrl-C and SIGTERM stop a long write even when
  a library swallows the ``KeyboardInterrupt`` (orbax's event loop logs and drops it).
- ``dir_mode``: the mode a new folder gets under the user's umask (``tempfile.mkdtemp`` makes
  0700 folders, which would otherwise become the final output).
- ``atomic_output_dir``: every output folder is written under a temporary name and renamed (on
  ``gs://``, uploaded) at the end, so a failure never leaves it half-written.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from lens_jax import processes, storage
from lens_jax.errors import OutputError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- inputs vs output

def _resolved(path: str | os.PathLike) -> Path | str:
    text = os.fspath(path)
    if "://" in text:  # gs://, hub ids with a scheme: compared as normalised strings
        return text.rstrip("/")
    return Path(os.path.realpath(os.path.expanduser(text)))


def _inside(inner: Path | str, outer: Path | str) -> bool:
    """Whether ``inner`` lies strictly inside ``outer``."""
    if isinstance(inner, str) or isinstance(outer, str):
        return str(inner).startswith(str(outer) + "/")
    return outer in inner.parents


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symlinks resolved)."""
    p, f = _resolved(path), _resolved(folder)
    return p == f or _inside(p, f)


def check_output(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                 out_name: str = "--out") -> None:
    """Raises ``OutputError`` if ``out`` equals, contains or lies inside one of ``inputs``
    (``{"--src": path, ...}``; ``None`` values are ignored). Symlinks are resolved."""
    o = _resolved(out)
    for name, path in inputs.items():
        if path is None or os.fspath(path) == "":
            continue
        i = _resolved(path)
        if o == i:
            why = "is the same path as"
        elif _inside(i, o):
            why = "contains"
        elif _inside(o, i):
            why = "lies inside"
        else:
            continue
        raise OutputError(f"{out_name} {out} {why} the input {name} {path}: writing there could "
                          f"destroy the input; choose an {out_name} outside it")


def check_replaceable(out: str | os.PathLike, patterns: Iterable[str], command: str,
                      out_name: str = "--out") -> None:
    """Before ``--overwrite`` replaces folder ``out``: raises ``OutputError`` naming every entry
    of ``out`` whose name matches none of ``patterns`` (what ``command`` writes)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{out_name} {out} is a file, not a folder {command} wrote; "
                          "--overwrite replaces only such folders")
    patterns = tuple(patterns)
    foreign = sorted(p.name for p in out.iterdir()
                     if not any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"{out_name} {out} holds files {command} did not write ({listed}); "
                          "--overwrite replaces only what the command writes: move them away or "
                          f"choose another {out_name}")


# ----------------------------------------------------------------------------- leftover temporaries

def temporary_prefix(out: str | os.PathLike, kind: str = "tmp") -> str:
    """``.NAME.tmp-PID@HOST-`` (``tempfile.mkdtemp`` adds a random tail)."""
    return f".{Path(out).name}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def leftover_temporaries(out: str | os.PathLike) -> list[tuple[Path, int | None, str | None]]:
    """``(path, pid, host)`` of every ``.NAME.tmp-*``/``.NAME.old-*`` beside ``out`` (pid and
    host ``None`` for names without them)."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(?:(\d+)@(.+)-)?[^-@]+$")
    found = []
    for path in sorted(out.parent.iterdir()):
        m = pattern.match(path.name)
        if m:
            found.append((path, int(m.group(1)) if m.group(1) else None, m.group(2)))
    return found


def clean_leftovers(out: str | os.PathLike) -> list[Path]:
    """Deletes the temporaries of ``out`` left by dead processes of this host; warns about the
    others (they may belong to a run still writing). Returns the paths deleted."""
    host, deleted = socket.gethostname(), []
    for path, pid, owner_host in leftover_temporaries(out):
        if pid is not None and owner_host == host:
            if pid == os.getpid() or processes.pid_alive(pid):
                continue  # a live writer's (or our own) folder
            shutil.rmtree(path, ignore_errors=True)
            log.warning("deleted %s, left by an interrupted run (process %d is gone)", path, pid)
            deleted.append(path)
        else:
            owner = f"process {pid} on {owner_host}" if pid is not None else "an earlier run"
            log.warning("%s was left by %s, probably interrupted; if nothing writes %s any more, "
                        "delete it: rm -r '%s'", path, owner, Path(out).name, path)
    return deleted


def dir_mode() -> int:
    """The mode ``os.mkdir`` would give a new folder under the process's umask."""
    try:  # Linux: read it without changing it (os.umask is process-wide and not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o777 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


# ----------------------------------------------------------------------------- interrupts

_interrupted: list[int] = []


def raise_if_interrupted() -> None:
    """Raises ``KeyboardInterrupt`` if SIGINT/SIGTERM arrived under ``interrupts_raise``, even
    if a library caught the first one."""
    if _interrupted:
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(_interrupted[0]).name}")


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """While active, SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the main thread and are
    remembered for ``raise_if_interrupted`` (so cleanup runs and nothing half-written stays).
    A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _interrupted.append(signum)
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
        raise_if_interrupted()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _interrupted.clear()


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary folder beside ``out_dir``; renames it to ``out_dir`` on success.

    On any exception (Ctrl-C and SIGTERM included, see ``interrupts_raise``) the
    temporary folder is deleted and ``out_dir`` is left untouched. Temporaries of earlier runs
    killed outright are cleaned or reported first (``clean_leftovers``); the output
    folder gets the user's umask (not mkdtemp's 0700). A ``gs://`` ``out_dir`` is built in a local
    temporary folder and uploaded (``storage.remote_output_dir``).
    """
    if storage.is_remote(out_dir):
        with storage.remote_output_dir(out_dir, overwrite=overwrite) as tmp:
            yield tmp
            raise_if_interrupted()
        return
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out_dir), dir=out_dir.parent))
    try:
        os.chmod(tmp, dir_mode())
        yield tmp
        raise_if_interrupted()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=temporary_prefix(out_dir, "old"),
                                    dir=out_dir.parent))
        os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
