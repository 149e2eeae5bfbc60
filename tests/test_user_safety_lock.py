"""Issue 19 point 1: a run directory has one writer (lens_jax.train.workdir_lock)."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from lens_jax import processes
from lens_jax.train import workdir_lock
from lens_jax.train.workdir_lock import LOCK_NAME, WorkdirLocked, acquire

HOLD = """
import os, sys, time
from lens_jax import processes
from lens_jax.train import workdir_lock
lock = workdir_lock.acquire(sys.argv[1], "lens-train", heartbeat_s=0)
print("held", flush=True)
if sys.argv[2] == "die":
    os._exit(0)  # like SIGKILL: the lock file stays behind
sys.stdin.read()
lock.release()
"""


def _holder_process(workdir, mode):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_naming_the_holder(tmp_path):
    proc = _holder_process(tmp_path, "hold")
    try:
        with pytest.raises(WorkdirLocked) as e:
            acquire(tmp_path, "lens-train export", heartbeat_s=0)
        message = str(e.value)
        assert f"pid {proc.pid}" in message and socket.gethostname() in message
        assert "lens-train" in message and "since" in message
    finally:
        proc.communicate("")
    assert proc.returncode == 0
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit
    acquire(tmp_path, "lens-train", heartbeat_s=0).release()


def test_second_thread_is_refused(tmp_path):
    with acquire(tmp_path, "lens-train", heartbeat_s=0):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
                pool.submit(acquire, tmp_path, "lens-train", heartbeat_s=0).result()


def test_only_one_of_many_concurrent_acquirers_wins(tmp_path):
    def attempt(_):
        try:
            return acquire(tmp_path, "lens-train", heartbeat_s=0)
        except WorkdirLocked:
            return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        locks = [lock for lock in pool.map(attempt, range(8)) if lock is not None]
    assert len(locks) == 1
    locks[0].release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    proc = _holder_process(tmp_path, "die")
    proc.wait()
    assert (tmp_path / LOCK_NAME).exists()
    with caplog.at_level(logging.WARNING, logger="lens_jax.train.workdir_lock"):
        lock = acquire(tmp_path, "lens-train", heartbeat_s=0)
    assert f"pid {proc.pid}" in caplog.text and "no longer runs" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def _foreign_lock(tmp_path, age_s):
    holder = workdir_lock.Holder(pid=1, host="another-host.example", command="lens-train x",
                                 purpose="lens-train", since="2026-12-02T00:00:00+00:00",
                                 heartbeat=time.time() - age_s, token="t")
    (tmp_path / LOCK_NAME).write_text(holder.dump())


def test_other_host_lock_is_kept_while_its_heartbeat_is_fresh(tmp_path):
    _foreign_lock(tmp_path, age_s=10)
    with pytest.raises(WorkdirLocked, match="another-host.example"):
        acquire(tmp_path, "lens-train", heartbeat_s=0, stale_after_s=300)


def test_other_host_lock_with_an_old_heartbeat_is_taken_over(tmp_path, caplog):
    _foreign_lock(tmp_path, age_s=1000)
    with caplog.at_level(logging.WARNING, logger="lens_jax.train.workdir_lock"):
        acquire(tmp_path, "lens-train", heartbeat_s=0, stale_after_s=300).release()
    assert "heartbeat is 1000 s old" in caplog.text


def test_unreadable_lock_file_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"pid": 12')  # a write cut short
    acquire(tmp_path, "lens-train", heartbeat_s=0).release()


def test_heartbeat_refreshes_and_detects_a_takeover(tmp_path):
    lock = acquire(tmp_path, "lens-train", heartbeat_s=0)
    before = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    lock.holder.heartbeat -= 100  # pretend the last beat was long ago
    assert lock.heartbeat()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] >= before
    lock.check()
    _foreign_lock(tmp_path, age_s=0)  # someone else took it over
    assert not lock.heartbeat() and lock.lost
    with pytest.raises(workdir_lock.LockLost):
        lock.check()
    lock.release()
    assert "another-host.example" in (tmp_path / LOCK_NAME).read_text()  # not ours to delete


def test_heartbeat_thread_runs(tmp_path):
    lock = acquire(tmp_path, "lens-train", heartbeat_s=0.01)
    first = lock.holder.heartbeat
    deadline = time.time() + 10
    while lock.holder.heartbeat == first and time.time() < deadline:
        time.sleep(0.01)
    lock.release()
    assert lock.holder.heartbeat > first
    assert not (tmp_path / LOCK_NAME).exists()


def test_pid_reuse_is_not_mistaken_for_the_holder():
    ticks = processes.process_start_ticks(os.getpid())
    if ticks is None:
        pytest.skip(reason="no /proc: pid start times unavailable")
    assert processes.pid_alive(os.getpid(), ticks)
    assert not processes.pid_alive(os.getpid(), ticks + 1)


def test_gcs_workdir_gets_the_generation_store():
    """gs:// workdirs lock through object generations (exercised on the emulator in tests/storage)."""
    store = workdir_lock.store_for("gs://bucket/run/")
    assert isinstance(store, workdir_lock.GcsStore) and store.path == "gs://bucket/run/lens_jax.lock"


def test_lens_train_refuses_a_workdir_in_use(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = _holder_process(tmp_path / "run", "hold")
    try:
        run = subprocess.run([sys.executable, "-m", "lens_jax.train.cli", "--config",
                              str(root / "configs" / "tiny.py"), "--workdir", str(tmp_path / "run"),
                              f"--config.data.path={tmp_path / 'no-records'}"],
                             capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, PYTHONPATH=str(root)))
    finally:
        proc.communicate("")
    assert run.returncode == 2, run.stderr
    assert f"pid {proc.pid}" in run.stderr and "in use" in run.stderr
    assert not (tmp_path / "run" / "config.json").exists()  # nothing of the run was written
    assert not (tmp_path / "run" / "checkpoints").exists()
