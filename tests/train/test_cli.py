"""End to end through ``python -m lens_jax.train.cli`` with the tiny config, in subprocesses:
bitwise resume after SIGKILL, clean exit on SIGTERM, fallback from an unreadable checkpoint, a
changed config refused without touching the run; the NaN stop and the devices'
waits counted, in process. A persistent compilation cache shares the step's compilation between the runs."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.helpers import cli_command, cli_env

STEPS = 12
COMMON = ("--config.logging.every=1", "--config.checkpoint.every=4", "--config.checkpoint.max_to_keep=3")
TIMEOUT = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = cli_env()
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    out = {}
    for row in rows:
        assert row["step"] not in out, f"step {row['step']} logged twice"
        out[row["step"]] = row["loss"]
    return out


def _steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _run(workdir, env, *overrides, check=True):
    proc = subprocess.run(cli_command(workdir, *COMMON, *overrides), env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"lens-train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _wait_for(predicate, proc, what: str, timeout: float = TIMEOUT):
    start = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {what}:\n"
                                 f"{proc.stderr.read()[-4000:] if proc.stderr else ''}")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shapes_path, env):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(workdir, env, f"--config.data.path={shapes_path}", f"--config.num_steps={STEPS}")
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert _steps(workdir) == [4, 8, 12]
    return workdir, losses


def test_resume_after_sigkill_is_bitwise(tmp_path, shapes_path, env, uninterrupted):
    _, expected = uninterrupted
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(cli_command(workdir, *COMMON, f"--config.data.path={shapes_path}",
                                        f"--config.num_steps={STEPS}"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: 4 in _steps(workdir), proc, "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    logged = _losses(workdir)
    assert max(logged) < STEPS, "the run finished before it could be killed"
    _run(workdir, env, f"--config.data.path={shapes_path}", f"--config.num_steps={STEPS}")
    got = _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])  # bitwise


def test_sigterm_saves_current_step_and_exits(tmp_path, shapes_path, env):
    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(cli_command(workdir, *COMMON, f"--config.data.path={shapes_path}",
                                        "--config.num_steps=100000", "--config.checkpoint.every=100000",
                                        "--config.logging.tensorboard=True", "--config.samples.every=2",
                                        "--config.samples.steps=2", "--config.samples.height=32",
                                        "--config.samples.width=48"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc,
              "three logged steps")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-4000:]
    last = max(_losses(workdir))
    assert _steps(workdir) == [last]
    assert "SIGTERM" in stderr
    # what a user watches: TensorBoard event files and sample grids
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    from PIL import Image

    grid = Image.open(sorted((workdir / "samples").glob("step_*.png"))[0])
    assert grid.size[1] == 32 and grid.size[0] >= 4 * 48


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shapes_path, monkeypatch):
    """In process, with a step whose loss is NaN from step 6 on (monkeypatched: the production
    step has no test hook): the loop stops at step 6, keeps the checkpoint of step 4, logs 1..5."""
    import jax.numpy as jnp

    from lens_jax.train import loop
    from lens_jax.train.trainer import Trainer
    from tests.train.helpers import tiny_config

    real_step = Trainer.train_step

    def poisoned(self, state, batch, frozen):
        new_state, out = real_step(self, state, batch, frozen)
        return new_state, dict(out, loss=jnp.where(state["step"] + 1 >= 6, jnp.nan, out["loss"]))

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    config = tiny_config(shapes_path)
    config.num_steps, config.logging.every = STEPS, 1
    config.checkpoint.every, config.checkpoint.max_to_keep = 4, 3
    with pytest.raises(loop.NonFiniteLossError, match="loss is nan at step 6"):
        loop.train(config, tmp_path / "nan")
    assert _steps(tmp_path / "nan") == [4]
    assert max(_losses(tmp_path / "nan")) == 5


def test_device_waited_steps_counts_steps_dispatched_after_the_previous_finished(tmp_path, shapes_path,
                                                                                 monkeypatch):
    """In process, with a step that waits for its own result before returning (monkeypatched), so
    the devices are idle whenever the host dispatches: every step after the first counts, except
    the one after a checkpoint (the loop waits there on purpose). Steps 1..6, saves at 3 and 6:
    steps 2, 3, 5, 6 waited."""
    import jax

    from lens_jax.train import loop
    from lens_jax.train.trainer import Trainer
    from tests.train.helpers import tiny_config

    real_step = Trainer.step

    def synchronous(self, state, batch):
        return jax.block_until_ready(real_step(self, state, batch))

    monkeypatch.setattr(Trainer, "step", synchronous)
    config = tiny_config(shapes_path)
    config.num_steps, config.logging.every = 6, 1
    config.checkpoint.every, config.checkpoint.max_to_keep = 3, 1
    loop.train(config, tmp_path / "sync")
    rows = [json.loads(l) for l in (tmp_path / "sync" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["data/device_waited_steps"] for r in rows] == [0, 1, 2, 2, 3, 4]


def test_unreadable_newest_checkpoint_falls_back(tmp_path, shapes_path, env, uninterrupted):
    import shutil

    source, expected = uninterrupted
    workdir = tmp_path / "corrupt"
    shutil.copytree(source, workdir)
    for f in (workdir / "checkpoints" / "12" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    proc = _run(workdir, env, f"--config.data.path={shapes_path}", f"--config.num_steps={STEPS}")
    assert "checkpoint at step 12 is skipped (" in proc.stdout, proc.stdout
    assert "restarting from step 8" in proc.stdout
    assert _steps(workdir) == [4, 8, 12]
    got = _losses(workdir)
    for step in range(1, STEPS + 1):
        assert got[step] == expected[step], step
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints_skipped").iterdir()] == ["12"]


def _snapshot(workdir: Path) -> dict:
    """Every file of a run directory with its size and modification time."""
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in workdir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("change, named", [("--config.ema.decay=0.0", "ema.decay: 0.99 -> 0.0"),
                                           ("--config.model.num_layers=3", "model.num_layers: 2 -> 3")])
def test_resume_with_changed_config_stops_and_changes_nothing(tmp_path, shapes_path, env,
                                                              uninterrupted, change, named):
    """Issue 19: a resume whose config no longer fits the checkpoints stops with the difference and
    the way on; checkpoints, metrics.jsonl and config.json are left exactly as they were."""
    import shutil

    source, _ = uninterrupted
    workdir = tmp_path / "changed"
    shutil.copytree(source, workdir)
    before = _snapshot(workdir)
    proc = _run(workdir, env, f"--config.data.path={shapes_path}", f"--config.num_steps={STEPS + 4}",
                change, check=False)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "does not match this run's config" in proc.stderr
    assert named in proc.stderr and f"--config.init_from=run:{workdir}" in proc.stderr
    assert _snapshot(workdir) == before


def test_console_script_help_lists_the_flags():
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "lens-train")
    if not os.path.exists(script):
        pytest.fail(f"{script} missing: install the package (pip install -e .)")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "--config" in out and "--workdir" in out and "--config.FIELD=VALUE" in out
