"""lens-train compile on TPU topologies from this CPU host (libtpu's compiler): the tiny config's
step with splash attention for one host and two hosts, the printed figures, and a config that
cannot fit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import env_without_compilation_cache

from lens_jax.train import topologies

REPO = Path(__file__).resolve().parents[2]
MISSING = topologies.libtpu_missing_reason()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING or "libtpu is installed")


def _cli(*args):
    env = env_without_compilation_cache(PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "lens_jax.train.cli", "compile", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_one_host_cli_prints_figures_that_parse_and_saves_the_step(tmp_path):
    from lens_jax.train.compile import parse_table

    report = tmp_path / "report.json"
    result = _cli("--config", "configs/tiny.py", "--topology", "v5p:2x2x1",
                  "--config.model.attention=splash", "--report", str(report),
                  "--save-executable", str(tmp_path / "step.bin"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "step.bin").stat().st_size > 0 and "saved the compiled step" in result.stdout
    rows = parse_table(result.stdout)
    assert [r["program"] for r in rows] == ["train_step"]
    row = rows[0]
    assert row["fits"] == "yes" and row["hbm_GiB"] == 95
    assert 0 < row["args_GiB"] <= row["total_GiB"] < row["hbm_GiB"]
    assert abs(row["headroom_GiB"] - (row["hbm_GiB"] - row["total_GiB"])) < 1e-3 * row["hbm_GiB"]
    saved = json.loads(report.read_text())
    assert saved["fits"] is True and saved["mesh"]["fsdp"] == 4 and saved["rows"] == 8
    program = saved["programs"][0]
    assert program["mosaic_calls"] > 0  # splash ran as the Pallas kernel, partitioned
    # the 2-block scan: XLA's count with the trip count is above the count with the body once
    assert program["xla_TFLOP"] > program["xla_TFLOP_loop_bodies_once"] > 0
    assert program["analytic_TFLOP"] > 0
    assert abs(program["total_GiB"] - row["total_GiB"]) <= 1e-3 * max(row["total_GiB"], 1e-3)
    # the saved step is for that slice: a CPU run of the same config is refused by name
    from configs.tiny import get_config
    from lens_jax.train import executable
    from lens_jax.train.mesh import make_mesh

    config = get_config()
    config.model.attention = "splash"
    with pytest.raises(executable.ExecutableMismatchError) as e:
        executable.load(tmp_path / "step.bin", executable.describe(config, make_mesh(config.mesh), 1))
    assert "platform: compiled for 'tpu', this run has 'cpu'" in str(e.value)
    assert "device_kind: compiled for 'TPU v5', this run has 'cpu'" in str(e.value)


def test_two_hosts_fsdp_and_tensor():
    """v5p:2x2x2 (8 chips, 2 hosts), heads over tensor=2: splash inside shard_map compiles."""
    from configs.tiny import get_config
    from lens_jax.train.compile import compile_train

    config = get_config()
    config.model.attention = "splash"
    config.mesh.update(fsdp=-1, tensor=2)
    result = compile_train(config, topologies.topology("v5p:2x2x2"), log=lambda *_: None)
    assert result.mesh_shape == {"slice": 1, "data": 1, "fsdp": 4, "tensor": 2}
    assert result.rows == 16 and result.fits
    step = result.programs[0]
    assert step.mosaic_calls > 0 and step.xla_flops > step.xla_flops_raw > 0


def test_a_config_that_cannot_fit_exits_non_zero_with_its_message():
    """Stage 1 (4.1B denoiser state + GPT-OSS-20B) on 4 v5e chips of 16 GiB: the inputs alone
    overflow, so it stops before compiling."""
    result = _cli("--config", "configs/lens_3p8b_stage1_512.py", "--topology", "v5e-4")
    assert result.returncode == 4, result.stderr[-3000:]
    assert "does not fit on v5e-4" in result.stderr
    assert "GiB short" in result.stderr and "--config.model.remat" in result.stderr
    assert "NO" in result.stdout
