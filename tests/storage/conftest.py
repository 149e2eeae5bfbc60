"""A Google Cloud Storage emulator (``gcp-storage-emulator``, in memory) on 127.0.0.1 for the tests.

``gcs_bucket`` gives each test a fresh bucket ``gs://NAME``; ``STORAGE_EMULATOR_HOST`` names the
emulator in this process and in every subprocess a test starts (``lens_jax.storage`` maps it onto
the libraries' own settings).
"""

import importlib.util
import itertools
import logging
import os
from http import HTTPStatus

import pytest

_counter = itertools.count()


def _send_generation_headers(objects) -> None:
    """Adds what real GCS sends with every object download and the emulator leaves out:
    ``x-goog-generation``/``x-goog-metageneration``, which tensorstore (orbax's OCDBT manifests)
    reads to version the objects it rewrites."""
    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - a missing object: download answers 404 itself
            obj = None
        if obj is not None:
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return download(request, response, storage, *args, **kwargs)

    objects.download = download_with_generation


def _honour_generation_preconditions(server_lib, objects) -> None:
    """Makes uploads and deletes honour ``ifGenerationMatch`` (412 when the object is not at that
    generation; 0 = absent), as GCS does and the emulator does not: the workdir lock's
    compare-and-swap (``lens_jax.storage.write_if_generation``) relies on it."""

    def checked(handler):
        def handle(request, response, storage, *args, **kwargs):
            want = request.query.get("ifGenerationMatch")
            if want:
                name = request.params.get("object_id") or (request.query.get("name") or [""])[0]
                if not name and isinstance(request.data, dict):  # multipart: name in the metadata
                    name = request.data.get("meta", {}).get("name", "")
                try:
                    have = storage.get_file_obj(request.params["bucket_name"], name)["generation"]
                except Exception:  # noqa: BLE001 - absent
                    have = "0"
                if str(have) != want[0]:
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                    return None
            return handler(request, response, storage, *args, **kwargs)
        return handle

    for _, methods in server_lib.HANDLERS:
        for method, handler in list(methods.items()):
            if handler in (objects.insert, objects.delete):
                methods[method] = checked(handler)


@pytest.fixture(scope="session")
def gcs_emulator():
    """The emulator's URL; it serves for the whole session of this test process."""
    server_lib = pytest.importorskip("gcp_storage_emulator.server",
                                     reason="the GCS emulator (pip install gcp-storage-emulator) is missing")
    if importlib.util.find_spec("gcsfs") is None:  # not imported: lens_jax.storage configures it first
        pytest.skip("gs:// paths need gcsfs (pip install gcsfs)")
    from gcp_storage_emulator.handlers import objects

    _send_generation_headers(objects)
    _honour_generation_preconditions(server_lib, objects)
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


from tests.train.conftest import shapes_path  # noqa: E402, F401  (the tiny records, uploaded by the tests)
