"""Everything on ``gs://`` against the emulator (tests/storage/conftest.py): records, a training run
killed with SIGKILL and resumed with the same losses bit for bit, checkpoints, metrics, TensorBoard,
sample grids, ``lens-train export``, ``lens-convert`` and ``lens-sample --out``."""

import json
import signal
import subprocess
import time

import pytest

from tests.train.helpers import cli_command, cli_env

STEPS = 30  # checkpoints at 10, 20, 30: 20 steps between the kill signal and the last one
TIMEOUT = 300
FLAGS = ("--config.logging.every=1", "--config.checkpoint.every=10", "--config.checkpoint.max_to_keep=3",
         f"--config.num_steps={STEPS}")
# The reference run also writes TensorBoard events and sample grids (read-only uses of the state:
# the losses do not depend on them).
WATCH = ("--config.logging.tensorboard=True", "--config.samples.every=10", "--config.samples.steps=2",
         "--config.samples.height=32", "--config.samples.width=32")


@pytest.fixture(scope="module")
def env(gcs_emulator, tmp_path_factory):
    env = cli_env()  # carries STORAGE_EMULATOR_HOST
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["LENS_CACHE_DIR"] = str(tmp_path_factory.mktemp("lens_cache"))
    return env


@pytest.fixture(scope="module")
def gcs_records(gcs_emulator, shapes_path, tmp_path_factory) -> str:
    """The tiny synthetic-shapes records, uploaded to ``gs://``."""
    import fsspec

    bucket = f"lens-records-{int(time.time() * 1e6)}"
    fs = fsspec.filesystem("gcs")
    fs.mkdir(bucket)
    fs.put(shapes_path, f"{bucket}/shapes", recursive=True)
    return f"gs://{bucket}/shapes"


def _losses(workdir: str) -> dict[int, float]:
    from lens_jax import storage

    rows = [json.loads(l) for l in storage.read_text(f"{workdir}/metrics.jsonl").splitlines() if l.strip()]
    out = {}
    for row in rows:
        assert row["step"] not in out, f"step {row['step']} logged twice"
        out[row["step"]] = row["loss"]
    return out


def _steps(workdir: str) -> list[int]:
    from lens_jax import storage

    return sorted(int(n) for n in storage.listdir(f"{workdir}/checkpoints") if n.isdigit())


def _run(workdir, env, *flags):
    proc = subprocess.run(cli_command(workdir, *flags), env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, f"lens-train failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def test_records_on_gcs_are_read_through_the_cache(gcs_records, shapes_path, env, monkeypatch):
    from lens_jax.data import records

    monkeypatch.setenv("LENS_CACHE_DIR", env["LENS_CACHE_DIR"])
    remote = records.list_shards(gcs_records)
    assert remote and all(s.startswith("gs://") for s in remote)
    assert len(remote) == len(records.list_shards(shapes_path))
    first = next(records.read_examples(gcs_records, limit=1))
    assert first == next(records.read_examples(shapes_path, limit=1))
    assert records.read_manifest(gcs_records) == records.read_manifest(shapes_path)
    with pytest.raises(records.RecordError, match="no such file or folder"):
        records.list_shards(gcs_records + "-missing")


def test_train_kill_resume_export_convert_sample_on_gcs(gcs_bucket, gcs_records, env, tmp_path, capsys):
    from PIL import Image

    from lens_jax import storage

    data = f"--config.data.path={gcs_records}"
    reference = f"{gcs_bucket}/reference"
    _run(reference, env, data, *FLAGS, *WATCH)
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert _steps(reference) == [10, 20, 30]
    names = storage.listdir(reference)
    assert {"config.json", "metrics.jsonl", "checkpoints", "tensorboard", "samples"} <= set(names), names
    assert any(n.startswith("events.out.tfevents.") for n in storage.listdir(f"{reference}/tensorboard"))
    grid = storage.path(f"{reference}/samples/step_00000010.png")
    assert grid.exists()
    with grid.open("rb") as f:
        assert Image.open(f).size[1] == 32

    # SIGKILL after the first checkpoint is complete, then resume: the same losses, bit for bit.
    workdir = f"{gcs_bucket}/killed"
    proc = subprocess.Popen(cli_command(workdir, data, *FLAGS), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    while not storage.exists(f"{workdir}/checkpoints/10/commit_success.txt"):
        assert proc.poll() is None, f"trainer exited ({proc.returncode}):\n{proc.stderr.read()[-4000:]}"
        assert time.monotonic() - start < TIMEOUT, "no checkpoint at step 10"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert _steps(workdir)[-1] < STEPS, "the run finished before it could be killed"
    _run(workdir, env, data, *FLAGS)
    got = _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])  # bitwise

    # Export to gs://, then lens-convert from gs:// to gs:// and back.
    from lens_jax.convert import cli as convert_cli
    from lens_jax.checkpoints.safetensors_io import SafetensorsFolder
    from lens_jax.train import export

    exported = f"{gcs_bucket}/export/transformer"
    assert export.main(["--workdir", workdir, "--out", exported]) == 0
    assert "exported ema weights of step 30" in capsys.readouterr().out
    assert storage.exists(f"{exported}/config.json")
    orbax_out, back = f"{gcs_bucket}/orbax", f"{gcs_bucket}/back"
    assert convert_cli.main(["to-orbax", "--src", exported, "--out", orbax_out]) == 0
    assert convert_cli.main(["to-diffusers", "--src", orbax_out, "--out", back]) == 0
    assert convert_cli.main(["to-orbax", "--src", exported, "--out", orbax_out]) == 2  # no --overwrite
    with storage.local_dir(exported) as a, storage.local_dir(back) as b:
        fa, fb = SafetensorsFolder(a), SafetensorsFolder(b)
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            assert (fa.read(key) == fb.read(key)).all(), key

    # lens-sample --out gs:// (the model: a random checkpoint written to gs:// by lens-convert).
    from lens_jax.sampling import cli as sample_cli

    ckpt = f"{gcs_bucket}/lens-tiny"
    assert convert_cli.main(["random", "--out", ckpt, "--preset", "tiny"]) == 0
    out = f"{gcs_bucket}/samples"
    with storage.local_dir(ckpt) as model:
        assert sample_cli.main(["--model", str(model), "--prompt", "a red cube", "--out", out,
                                "--size", "32x32", "--steps", "2", "--seed", "1", "--date", "2025-06-12",
                                "--no-compilation-cache", "--devices", "1"]) == 0
    assert storage.listdir(out) == ["00000.json", "00000.png"]
    assert json.loads(storage.read_text(f"{out}/00000.json"))["seed"] == 1
