"""Preemption and host agreement: the decisions every process of a run must take together.

A multi-host run is one ``lens-train`` process per host. A decision that changes what the processes
do next (stop on SIGTERM, stop because a host's data ran out, which checkpoint to restore, skip a
corrupt checkpoint) is taken from every process's view at once: each contributes its flags and all
act on the reduced result (``agree``). The loop agrees once per step, before the step is dispatched,
so every process enters the same collectives. In a single process these functions are local and
cost nothing. The loss needs no agreement: it is one replicated global value, the same on every host.

A process that dies without a word (SIGKILL, a lost host) is noticed by the others through
``jax.distributed``'s heartbeat: after ``config.heartbeat_timeout_s`` without one, the coordination
service stops every process instead of leaving it blocked in a collective.
"""

from __future__ import annotations

import logging
import signal

import jax
import numpy as np

log = logging.getLogger(__name__)


def is_primary() -> bool:
    """Process 0 writes the run's shared files (metrics.jsonl, config.json, TensorBoard, samples)."""
    return jax.process_index() == 0


def gather(values) -> np.ndarray:
    """``[P, ...]``: ``values`` (a small numpy array, same shape on every process) of each process."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


def agree_any(**flags: bool) -> dict[str, bool]:
    """Each flag true on any process -> true on every process (one collective for all flags)."""
    names = sorted(flags)
    seen = gather(np.asarray([bool(flags[n]) for n in names], np.int32))
    return {n: bool(seen[:, i].any()) for i, n in enumerate(names)}


# How long ``barrier`` waits for the slowest process: a host that compiles the full model for a
# TPU slice while the others found it in the persistent compilation cache is minutes behind them.
# A process that died stops the others sooner (jax.distributed's heartbeat); processes waiting at
# different barriers (e.g. batch shapes that differ between hosts) fail after this long, each
# error naming its barrier.
BARRIER_TIMEOUT_S = 1800
_barrier_uses: dict[str, int] = {}


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Every process waits here until all have arrived (no-op in a single process).

    A barrier of ``jax.distributed``'s coordination service, as orbax's, not a device collective:
    it runs no program, so its own first use cannot time out (gloo gives up on a collective's
    first use after a fixed 30 s), and it waits up to ``timeout_s``. ``name`` says in the error
    where a process was left waiting; every process must pass the same names in the same order."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed   # the client jax.distributed.initialize made

    uses = _barrier_uses[name] = _barrier_uses.get(name, 0) + 1   # a barrier id is used once
    distributed.global_state.client.wait_at_barrier(f"{name} #{uses}", int(timeout_s * 1000))


class Preemption:
    """SIGTERM -> ``requested`` on this process; the loop makes it every process's stop with
    ``agree_any`` (all save the same step and exit 0)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: every process saves a checkpoint at the current step, then exits")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
