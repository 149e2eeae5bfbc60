"""A tiny random Lens checkpoint in the real Hugging Face layout, shared by the sampling tests."""

import pytest

DATE = "2025-06-12"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from lens_jax.checkpoints.random_checkpoint import write_random_checkpoint
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "lens-tiny", preset="tiny",
                                   seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_checkpoint):
    from lens_jax.sampling.pipeline import LensPipeline
    return LensPipeline.from_pretrained(tiny_checkpoint, devices=1, compilation_cache=False)
