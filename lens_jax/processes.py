"""Whether a process still runs on this host: the check the workdir lock and the cleaning of
temporary output folders share (``lens_jax.train.workdir_lock``, ``lens_jax.output_guard``)."""

from __future__ import annotations

import os
from pathlib import Path


def process_start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` runs on this host (and, if ``start_ticks`` is given, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    if start_ticks is not None:
        now = process_start_ticks(pid)
        if now is not None and now != start_ticks:
            return False  # the pid was reused by another program
    return True
