"""Every test here compiles for TPU topologies from this CPU host: none uses the session's persistent
compilation cache (``tests/conftest.py``: ``no_persistent_compilation_cache``)."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _tpu_compiles_bypass_the_cache(no_persistent_compilation_cache):
    yield
