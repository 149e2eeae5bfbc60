"""lens-sample compile for TPU hosts from this CPU host: the tiny denoiser with splash attention,
the tiny random text encoder and VAE, one host of a one-host and of a two-host topology."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import env_without_compilation_cache

from lens_jax.train import topologies

REPO = Path(__file__).resolve().parents[2]
MISSING = topologies.libtpu_missing_reason()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING or "libtpu is installed")


def _compile(topology, placement="auto"):
    from configs.tiny import get_model_config
    from lens_jax.sampling.compile import compile_sampler

    return compile_sampler(topologies.topology(topology), batch=4, height=64, width=64, steps=2,
                           model_config=get_model_config(attention="splash"), tiny=True,
                           text_length=64 + 97, placement=placement, log=lambda *_: None)


@pytest.fixture(scope="module")
def one_host():
    return _compile("v5p:2x2x1")


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v5p:2x2x2"])
def test_tiny_sampler_compiles_with_splash(topology, one_host):
    result = one_host if topology == "v5p:2x2x1" else _compile(topology)
    assert result.placement == "first_chip"  # auto: a few MiB of weights fit on one chip
    reports = result.programs
    names = [r.name.split("[")[0] for r in reports]
    assert names == ["encode", "denoise", "decode"]
    assert all(r.fits and r.total_bytes > 0 for r in reports)
    denoise = reports[1]
    assert denoise.mosaic_calls > 0  # the denoiser's attention is the Pallas kernel
    assert denoise.xla_flops > denoise.xla_flops_raw > 0  # 2 blocks x 2 steps, loops scaled
    # the first chip holds the other networks' weights while each program runs
    assert all(r.resident_bytes > 0 and r.total_bytes >= r.argument_bytes + r.resident_bytes
               for r in reports)


def test_tiny_sampler_compiles_sharded(one_host):
    """placement=sharded on the same host: GPT-OSS's experts (4) and both networks' weights split
    over the 4 chips, so each program's weights per chip are below first_chip's."""
    sharded = _compile("v5p:2x2x1", placement="sharded")
    first = one_host
    assert (sharded.placement, first.placement) == ("sharded", "first_chip")
    assert sharded.weight_bytes == first.weight_bytes
    assert all(r.fits for r in sharded.programs)
    encode, denoise, _ = sharded.programs
    assert denoise.mosaic_calls > 0
    # per chip: the encoder's and the denoiser's arguments are their shards
    assert encode.argument_bytes < first.programs[0].argument_bytes
    assert denoise.argument_bytes < first.programs[1].argument_bytes
    assert sharded.programs[2].resident_bytes < first.programs[2].resident_bytes


def test_cli_rejects_a_batch_the_host_cannot_split():
    env = env_without_compilation_cache(PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "lens_jax.sampling.cli", "compile", "--topology",
                             "v5p-8", "--batch", "3"], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    assert result.returncode == 2
    assert "--batch 3 is not a multiple of the 4 chips of a v5p-8 host" in result.stderr
