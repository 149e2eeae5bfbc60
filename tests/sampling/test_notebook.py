"""notebooks/sampling.ipynb runs top to bottom against the tiny random checkpoint."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "sampling.ipynb"


def test_sampling_notebook_executes(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CHECKPOINT", str(tiny_checkpoint))
    monkeypatch.setenv("LENS_SAMPLE_SIZE", "32")
    monkeypatch.setenv("LENS_MAX_STEPS", "2")
    monkeypatch.setenv("LENS_JAX_COMPILATION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parents[1])}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # grid, presets, sweep
