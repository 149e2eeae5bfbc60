"""One training step under data-parallel, FSDP and tensor-parallel layouts equals the single-device
step (fp32): same loss, gradient norm, updated parameters, EMA and optimizer state."""

import jax
import numpy as np
import pytest

from tests.conftest import max_rel_err
from tests.train.helpers import host_batch, initial_state, tiny_config

LAYOUTS = {
    "data_parallel": dict(data=8, fsdp=1, tensor=1),
    "fsdp": dict(data=1, fsdp=8, tensor=1),
    "fsdp_tensor": dict(data=1, fsdp=4, tensor=2),
}
RTOL = 1e-5


def _config(shapes_path, **mesh):
    # every parameter random (no zero-initialised modulation), so every gradient is non-trivial
    config = tiny_config(shapes_path, zero_init_modulation=False)
    config.optimizer.warmup_steps = 0
    config.optimizer.weight_decay = 0.01
    # Adam normalises each gradient by its own magnitude, so for elements whose gradient is ~1e-8
    # (below float32 resolution of the reduction) the update is ill-conditioned; a larger eps keeps
    # the update a well-conditioned function of the gradient, which is what this test compares.
    config.optimizer.eps = 1e-3
    config.mesh.num_devices = 0
    for k, v in mesh.items():
        config.mesh[k] = v
    return config


@pytest.fixture(scope="module")
def reference(shapes_path):
    from lens_jax.train.trainer import Trainer

    config = _config(shapes_path, data=1, fsdp=1, tensor=1)
    config.mesh.num_devices = 1
    batch = host_batch(config)[0]
    trainer = Trainer(config)
    state0 = jax.device_get(initial_state(trainer))
    state, metrics = trainer.step(jax.device_put(state0, trainer.state_shardings), trainer.put_batch(batch))
    return batch, state0, jax.device_get(state), jax.device_get(metrics)


def _compare(state, metrics, ref_state, ref_metrics):
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=RTOL)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=RTOL)
    for name in ("params", "ema", "opt_state"):
        got, want = jax.tree.leaves(state[name]), jax.tree.leaves(ref_state[name])
        assert len(got) == len(want) > 0
        errors = [max_rel_err(g, w) for g, w in zip(got, want)]
        assert max(errors) < RTOL, (name, max(errors))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_device(shapes_path, reference, layout):
    from lens_jax.train.trainer import Trainer

    batch, state0, ref_state, ref_metrics = reference
    trainer = Trainer(_config(shapes_path, **LAYOUTS[layout]))
    assert trainer.mesh.size == 8
    kernel = trainer.state_shardings["params"]["blocks"]["img_mlp_w1"]["kernel"].spec
    mu = trainer.state_shardings["opt_state"][1][0].mu["blocks"]["img_mlp_w1"]["kernel"].spec
    if "fsdp" in layout:   # parameters and optimizer state really sharded
        assert "fsdp" in str(kernel) and "fsdp" in str(mu)
    if "tensor" in layout:
        assert "tensor" in str(kernel)
    if layout == "data_parallel":
        assert all(a is None for a in kernel)
    state = jax.device_put(state0, trainer.state_shardings)
    state, metrics = trainer.step(state, trainer.put_batch(batch))
    _compare(jax.device_get(state), jax.device_get(metrics), ref_state, ref_metrics)


def test_gradient_accumulation_matches_one_big_batch(shapes_path, reference):
    """2 micro-batches of 4 rows == one batch of 8 rows (noise and sigmas are keyed per row)."""
    from lens_jax.train.trainer import Trainer

    batch, state0, ref_state, ref_metrics = reference
    config = _config(shapes_path, data=1, fsdp=1, tensor=1)
    config.mesh.num_devices = 1
    config.grad_accum_steps = 2
    trainer = Trainer(config)
    state, metrics = trainer.step(jax.device_put(state0, trainer.state_shardings), trainer.put_batch(batch))
    _compare(jax.device_get(state), jax.device_get(metrics), ref_state, ref_metrics)
