"""A checkpoint written on one mesh restores onto another (8 devices FSDP -> 4 devices data parallel)."""

import jax
import numpy as np

from tests.train.helpers import initial_state, tiny_config


def test_restore_onto_another_mesh(tmp_path):
    from lens_jax.train.checkpoint import Checkpointer
    from lens_jax.train.trainer import Trainer

    config = tiny_config(zero_init_modulation=False)
    config.mesh.update(num_devices=0, data=1, fsdp=8, tensor=1)
    config.checkpoint.async_save = True
    saver = Trainer(config)
    state = initial_state(saver)
    kernel = state["params"]["blocks"]["img_mlp_w1"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and "fsdp" in str(kernel.sharding.spec)
    ckpt = Checkpointer(tmp_path / "checkpoints", config.checkpoint)
    ckpt.save(7, state)
    ckpt.wait()
    ckpt.close()
    expected = jax.device_get(state)

    config4 = tiny_config(zero_init_modulation=False)
    config4.mesh.update(num_devices=4, data=4, fsdp=1, tensor=1)
    loader = Trainer(config4)
    restored, step = Checkpointer(tmp_path / "checkpoints", config4.checkpoint).restore(loader.abstract_state())
    assert step == 7
    kernel = restored["params"]["blocks"]["img_mlp_w1"]["kernel"]
    assert len(kernel.sharding.device_set) == 4
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None)
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(loader.state_shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


def test_transient_read_errors_are_retried_then_raised(tmp_path, monkeypatch):
    """A read failing with ConnectionError twice succeeds on the third attempt; failing every time
    raises OSError naming the checkpoint, without skipping it or touching the directory."""
    import pytest

    from lens_jax.train import checkpoint
    from lens_jax.train.trainer import Trainer

    config = tiny_config(zero_init_modulation=False)
    config.checkpoint.async_save = False
    trainer = Trainer(config)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", config.checkpoint)
    ckpt.save(3, initial_state(trainer))
    ckpt.wait()
    monkeypatch.setattr(checkpoint, "RETRY_WAIT_S", 0.0)
    real = checkpoint.Checkpointer.restore_step
    failures = {"left": 2}

    def flaky(self, *args, **kwargs):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("connection reset by peer")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "restore_step", flaky)
    _, step = ckpt.restore(trainer.abstract_state())
    assert step == 3 and failures["left"] == 0

    failures["left"] = checkpoint.RETRIES
    with pytest.raises(OSError, match=r"checkpoints/3: reading failed 3 times: ConnectionError"):
        ckpt.restore(trainer.abstract_state())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    assert ckpt.all_steps() == [3]
    ckpt.close()


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    """The data iterator's state is per host: a checkpoint saved by 2 processes is refused by 1,
    with the reason, and left in place."""
    import pytest

    from lens_jax.train import checkpoint
    from lens_jax.train.trainer import Trainer

    config = tiny_config(zero_init_modulation=False)
    config.checkpoint.async_save = False
    trainer = Trainer(config)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", config.checkpoint)
    ckpt.save(5, initial_state(trainer), checkpoint.DataState({"position": 1}))
    ckpt.wait()
    data = tmp_path / "checkpoints" / "5" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    (data / "process_1-of-2.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"another number of processes \(process_0-of-2.json, process_1-of-2.json"):
        ckpt.restore(trainer.abstract_state(), data_iter=object())
    assert ckpt.all_steps() == [5]
    ckpt.close()
