"""Session fixtures of the trainer tests."""

import pytest


@pytest.fixture(scope="session")
def shapes_path(tmp_path_factory) -> str:
    """96 synthetic-shapes records at --base-size 64 (the tiny config's data)."""
    from lens_jax.data.synth_shapes import write_dataset

    out = tmp_path_factory.mktemp("data") / "shapes"
    write_dataset(out, 96, 0, base_size=64)
    return str(out)
