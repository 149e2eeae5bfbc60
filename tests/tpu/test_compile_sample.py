"""lens-sample compile for TPU hosts from this CPU host: the tiny denoiser with splash attention,
the tiny random text encoder and VAE, one host of a one-host and of a two-host topology."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lens_jax.train import topologies

REPO = Path(__file__).resolve().parents[2]
MISSING = topologies.libtpu_missing_reason()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING or "libtpu is installed")


@pytest.mark.parametrize("topology,chips", [("v5p:2x2x1", 4), ("v5p:2x2x2", 4)])
def test_tiny_sampler_compiles_with_splash(topology, chips):
    from configs.tiny import get_model_config
    from lens_jax.sampling.compile import compile_sampler

    reports = compile_sampler(topologies.topology(topology), batch=chips, height=64, width=64,
                              steps=2, model_config=get_model_config(attention="splash"),
                              tiny=True, text_length=64 + 97, log=lambda *_: None)
    names = [r.name.split("[")[0] for r in reports]
    assert names == ["encode", "denoise", "decode"]
    assert all(r.fits and r.total_bytes > 0 for r in reports)
    denoise = reports[1]
    assert denoise.mosaic_calls > 0  # the denoiser's attention is the Pallas kernel
    assert denoise.xla_flops > denoise.xla_flops_raw > 0  # 2 blocks x 2 steps, loops scaled
    # the first chip holds the other networks' weights while each program runs
    assert all(r.resident_bytes > 0 and r.total_bytes >= r.argument_bytes + r.resident_bytes
               for r in reports)


def test_cli_rejects_a_batch_the_host_cannot_split():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "lens_jax.sampling.cli", "compile", "--topology",
                             "v5p-8", "--batch", "3"], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    assert result.returncode == 2
    assert "--batch 3 is not a multiple of the 4 chips of a v5p-8 host" in result.stderr
