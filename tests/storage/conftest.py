"""A Google Cloud Storage emulator (``gcp-storage-emulator``, in memory) on 127.0.0.1 for the tests.

``gcs_bucket`` gives each test a fresh bucket ``gs://NAME``; ``STORAGE_EMULATOR_HOST`` names the
emulator in this process and in every subprocess a test starts (``lens_jax.storage`` maps it onto
the libraries' own settings).
"""

import importlib.util
import itertools
import logging
import os

import pytest

_counter = itertools.count()


@pytest.fixture(scope="session")
def gcs_emulator():
    """The emulator's URL; it serves for the whole session of this test process."""
    server_lib = pytest.importorskip("gcp_storage_emulator.server",
                                     reason="the GCS emulator (pip install gcp-storage-emulator) is missing")
    if importlib.util.find_spec("gcsfs") is None:  # not imported: lens_jax.storage configures it first
        pytest.skip("gs:// paths need gcsfs (pip install gcsfs)")
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    server = server_lib.create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    url = f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    saved = dict(os.environ)
    os.environ["STORAGE_EMULATOR_HOST"] = url
    from lens_jax import storage

    storage.configure_emulator()
    yield url
    server.stop()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """``gs://NAME`` of a new empty bucket."""
    import fsspec

    name = f"lens-test-{os.getpid()}-{next(_counter)}"
    fsspec.filesystem("gcs").mkdir(name)
    return f"gs://{name}"
