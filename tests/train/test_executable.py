"""A run loads the step that ``lens-train compile --save-executable`` wrote: compiled for this
host's CPU devices (``--topology cpu``), the tiny run's losses equal the jitted run's; an
executable made for another config or mesh is refused with the difference named."""

import json

import pytest

from lens_jax.train import executable, loop
from lens_jax.train import compile as compile_lib
from tests.train.helpers import REPO, tiny_config

STEPS = 2
OVERRIDES = {"num_steps": STEPS, "mesh.num_devices": 2}  # fsdp over 2 CPU devices


def _config(shapes_path, path=""):
    config = tiny_config(shapes_path)
    config.num_steps, config.mesh.num_devices = STEPS, 2
    config.logging.every, config.checkpoint.every = 1, 100
    config.compiled_step_path = path
    return config


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def saved_step(tmp_path_factory):
    path = tmp_path_factory.mktemp("exe") / "step.bin"
    rc = compile_lib.main(["--config", str(REPO / "configs" / "tiny.py"), "--topology", "cpu",
                           "--save-executable", str(path)]
                          + [f"--config.{k}={v}" for k, v in OVERRIDES.items()])
    assert rc == 0 and path.stat().st_size > 0
    return path


def test_a_run_with_the_saved_step_matches_the_jitted_run(tmp_path, shapes_path, saved_step):
    loop.train(_config(shapes_path, str(saved_step)), tmp_path / "loaded")
    loop.train(_config(shapes_path), tmp_path / "jitted")
    loaded, jitted = _losses(tmp_path / "loaded"), _losses(tmp_path / "jitted")
    assert len(loaded) == STEPS and loaded == jitted


@pytest.mark.parametrize("field,value,named", [
    ("optimizer.lr", 5e-4, "config.optimizer.lr: compiled with 0.001, this run has 0.0005"),
    ("mesh.num_devices", 4, "mesh: compiled for {'slice': 1, 'data': 1, 'fsdp': 2, 'tensor': 1}"),
])
def test_another_config_or_mesh_is_refused_by_name(tmp_path, shapes_path, saved_step, field, value,
                                                   named):
    config = _config(shapes_path, str(saved_step))
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(executable.ExecutableMismatchError) as e:
        loop.train(config, tmp_path / "refused")
    assert named in str(e.value)


def test_run_only_fields_do_not_matter(shapes_path):
    a, b = _config(shapes_path), _config("/elsewhere")
    b.seed, b.logging.every, b.checkpoint.every, b.data.num_epochs = 7, 10, 5, 2
    assert executable.step_fields(a) == executable.step_fields(b)
    b.data.rows_per_host = 4
    assert executable.step_fields(a) != executable.step_fields(b)


def test_a_mesh_over_other_devices_is_named(shapes_path):
    """Same shape, devices in another order: the executable's shardings would not match."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    config = _config(shapes_path)
    axes = ("slice", "data", "fsdp", "tensor")
    compiled = Mesh(np.asarray(jax.devices()[:2]).reshape(1, 1, 2, 1), axes)
    run = Mesh(np.asarray(jax.devices()[:2][::-1]).reshape(1, 1, 2, 1), axes)
    diff = executable.differences(executable.describe(config, compiled, 1),
                                  executable.describe(config, run, 1))
    assert diff == ["mesh device ids from position 0: compiled for '[... [0, 1] ...] of 2', "
                    "this run has '[... [1, 0] ...] of 2'"]
