"""One writer per run directory: a lock file with a heartbeat (``WORKDIR/lens_jax.lock``).

``acquire(workdir, purpose)`` returns a ``WorkdirLock`` (a context manager) or raises
``WorkdirLocked`` at once, naming the process that holds the directory (pid, host, command,
since when, last heartbeat). A lock left behind by a dead process is taken over, with a
warning that says so:

- same host: the holder's pid no longer runs (or runs another program: its start time differs);
- another host: the holder's heartbeat is older than ``stale_after_s`` (default 300 s; a live
  holder refreshes it every ``heartbeat_s``, default 30 s). Hosts' clocks must agree to within
  ``stale_after_s``.

While held, a daemon thread rewrites the heartbeat. If the lock is lost (another process took it
over after this one stalled for longer than ``stale_after_s``), ``check()`` raises and
``lost`` is set; the holder should stop writing.

The file is JSON (``pid``, ``host``, ``command``, ``purpose``, ``since``, ``heartbeat``,
``start_ticks``, ``token``). Every write is a compare-and-swap against the version read before,
so two processes taking over the same stale lock cannot both win.

Storage backends. All I/O goes through a ``LockStore`` (four methods: ``read``, ``create``,
``replace``, ``delete``; each write succeeds only if the file is still at the version the caller
read). ``LocalStore`` serves local and NFS-like disks: the swap is guarded by ``fcntl.flock`` on
a side file (released by the kernel if the process dies, so the guard itself never goes stale)
and the new text is written to a temporary name and renamed. ``GcsStore`` serves ``gs://``
workdirs: the object's generation is the version (``create`` = upload only if absent,
``replace``/``delete`` only if still at the generation read: GCS preconditions, through
``lens_jax.storage``). Same-host pid checks still apply when the host names match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

from lens_jax import processes, storage
from lens_jax.errors import LockLost, WorkdirLocked

log = logging.getLogger(__name__)

LOCK_NAME = "lens_jax.lock"
HEARTBEAT_S = 30.0       # how often a holder refreshes its heartbeat
STALE_AFTER_S = 300.0    # a lock of another host whose heartbeat is older than this is taken over


# ----------------------------------------------------------------------------- storage backends

class LockStore(Protocol):
    """Compare-and-swap access to one small text file. ``version`` is opaque (``None``: absent)."""

    def read(self) -> tuple[str | None, object]: ...
    def create(self, text: str) -> object | None: ...  # only if absent; the new version or None
    def replace(self, text: str, version: object) -> object | None: ...  # only if at ``version``
    def delete(self, version: object) -> bool: ...  # only if still at ``version``


class LocalStore:
    """A lock file on a local (or NFS) disk; the version is the file's text."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._guard_path = self.path.with_name(f".{self.path.name}.guard")

    @contextlib.contextmanager
    def _guard(self):
        import fcntl

        fd = os.open(self._guard_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
            yield
        finally:
            os.close(fd)

    def _read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def _write(self, text: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def read(self) -> tuple[str | None, object]:
        with self._guard():
            text = self._read()
        return text, text

    def create(self, text: str) -> object | None:
        with self._guard():
            if self._read() is not None:
                return None
            self._write(text)
            return text

    def replace(self, text: str, version: object) -> object | None:
        with self._guard():
            if self._read() != version:
                return None
            self._write(text)
            return text

    def delete(self, version: object) -> bool:
        with self._guard():
            if self._read() != version:
                return False
            self.path.unlink(missing_ok=True)
            return True


class GcsStore:
    """A lock object on Cloud Storage; the version is the object's generation."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> tuple[str | None, object]:
        return storage.read_versioned(self.path)

    def create(self, text: str) -> object | None:
        return storage.write_if_generation(self.path, text, 0)

    def replace(self, text: str, version: object) -> object | None:
        return storage.write_if_generation(self.path, text, int(version))

    def delete(self, version: object) -> bool:
        return storage.delete_if_generation(self.path, int(version))


def store_for(workdir: str | os.PathLike) -> LockStore:
    """The ``LockStore`` of ``workdir``'s lock file: ``GcsStore`` for ``gs://``, else ``LocalStore``."""
    if storage.is_remote(workdir):
        return GcsStore(f"{os.fspath(workdir).rstrip('/')}/{LOCK_NAME}")
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    return LocalStore(path / LOCK_NAME)


# ----------------------------------------------------------------------------- who holds it

@dataclasses.dataclass
class Holder:
    """What a lock file says about the process that holds it."""

    pid: int
    host: str
    command: str
    purpose: str
    since: str            # ISO 8601 UTC
    heartbeat: float      # unix time of the last refresh
    token: str
    start_ticks: int | None = None

    @classmethod
    def this_process(cls, purpose: str) -> "Holder":
        now = time.time()
        return cls(pid=os.getpid(), host=socket.gethostname(),
                   command=shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else "",
                   purpose=purpose, since=_iso(now), heartbeat=now, token=uuid.uuid4().hex,
                   start_ticks=processes.process_start_ticks(os.getpid()))

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        try:
            raw = json.loads(text)
            return cls(pid=int(raw["pid"]), host=str(raw["host"]), command=str(raw.get("command", "")),
                       purpose=str(raw.get("purpose", "")), since=str(raw.get("since", "")),
                       heartbeat=float(raw["heartbeat"]), token=str(raw.get("token", "")),
                       start_ticks=raw.get("start_ticks"))
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def describe(self, now: float | None = None) -> str:
        age = (time.time() if now is None else now) - self.heartbeat
        return (f"pid {self.pid} on host {self.host} ({self.purpose}: {self.command!r}), "
                f"since {self.since}, last heartbeat {age:.0f} s ago")

    def dead_reason(self, stale_after_s: float, now: float | None = None) -> str | None:
        """Why this holder is gone (``None``: it may still run)."""
        if self.host == socket.gethostname():
            if not processes.pid_alive(self.pid, self.start_ticks):
                return f"process {self.pid} no longer runs on {self.host}"
            return None
        age = (time.time() if now is None else now) - self.heartbeat
        if age > stale_after_s:
            return f"its heartbeat is {age:.0f} s old (more than {stale_after_s:.0f} s)"
        return None


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the lock

class WorkdirLock:
    """A held run-directory lock. ``release()`` (or leaving the ``with`` block) frees it."""

    def __init__(self, workdir: str, store: LockStore, holder: Holder, version: object,
                 heartbeat_s: float):
        self.workdir = workdir
        self.holder = holder
        self.lost = False
        self._store = store
        self._version = version
        self._heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread = None
        if heartbeat_s > 0:
            self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                            daemon=True)
            self._thread.start()

    def heartbeat(self) -> bool:
        """Refreshes the heartbeat now; ``False`` (and ``lost``) if another process took over."""
        with self._mutex:
            if self.lost or self._version is None:
                return not self.lost
            beat = dataclasses.replace(self.holder, heartbeat=time.time())
            version = self._store.replace(beat.dump(), self._version)
            if version is not None:
                self.holder, self._version = beat, version
                return True
            self.lost = True
        log.error("the lock of %s was taken over by another process; this one (%s) must stop "
                  "writing there", self.workdir, self.holder.purpose)
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                if not self.heartbeat():
                    return
            except OSError as e:  # a transient disk error must not kill the run: retry next beat
                log.warning("workdir lock heartbeat of %s failed: %s", self.workdir, e)

    def check(self) -> None:
        """Raises ``LockLost`` if another process has taken this lock over."""
        if self.lost:
            raise LockLost(f"{self.workdir}: this process lost its lock to another writer; "
                           "stop and check which run owns the directory")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._mutex:
            if self._version is not None and not self.lost:
                self._store.delete(self._version)
            self._version = None

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(workdir: str | os.PathLike, purpose: str, *, heartbeat_s: float = HEARTBEAT_S,
            stale_after_s: float = STALE_AFTER_S, store: LockStore | None = None) -> WorkdirLock:
    """Takes the write lock of ``workdir`` for ``purpose`` (e.g. ``"lens-train"``), creating the
    folder if needed; raises ``WorkdirLocked`` at once if a live process holds it.

    ``heartbeat_s`` 0 starts no heartbeat thread (tests; short commands).
    """
    workdir = str(workdir)
    store = store or store_for(workdir)
    me = Holder.this_process(purpose)
    for _ in range(10):  # lost races on a stale lock: read again
        version = store.create(me.dump())
        if version is not None:
            return WorkdirLock(workdir, store, me, version, heartbeat_s)
        text, version = store.read()
        if text is None:
            continue  # released between our create and read
        holder = Holder.parse(text)
        if holder is None:
            reason = "its lock file is not readable JSON (a write was interrupted)"
        else:
            reason = holder.dead_reason(stale_after_s)
            if reason is None:
                raise WorkdirLocked(
                    f"{workdir} is in use by {holder.describe()}. Wait for it to finish or stop "
                    f"it, or use another directory; if no such process runs, delete "
                    f"{workdir.rstrip('/')}/{LOCK_NAME}.")
        version = store.replace(me.dump(), version)
        if version is not None:
            what = holder.describe() if holder is not None else "an unknown process"
            log.warning("%s: taking over the lock left by %s: %s", workdir, what, reason)
            return WorkdirLock(workdir, store, me, version, heartbeat_s)
    raise WorkdirLocked(f"{workdir}: could not take the lock (other processes keep changing "
                        f"{LOCK_NAME}); try again")
