"""Where the sampler's weights live (lens_jax.sampling.placement): the auto choice, and the
sharded placement (GPT-OSS's experts and the denoiser's weights split over 4 fake CPU devices)
gives the images of the first-chip placement."""

import pytest
from jax.sharding import NamedSharding

from lens_jax.sampling import placement as placement_lib
from lens_jax.sampling.pipeline import LensPipeline
from tests.conftest import max_rel_err
from tests.sampling.conftest import DATE

GiB = 1 << 30
CALL = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0, seed=5, date=DATE,
            output_type="latent")
# float32 on CPU: the FSDP layout only changes summation order (XLA may split a matmul's
# contraction over the chips).
TOL = 1e-5


@pytest.mark.parametrize("placement,weights,devices,hbm,want", [
    ("auto", 19.5 * GiB, 8, 16 * GiB, "sharded"),       # v5e-8: the weights exceed a chip
    ("auto", 19.5 * GiB, 8, 32 * GiB, "first_chip"),    # v6e-8: they fit with room to run
    ("auto", 19.5 * GiB, 8, 24 * GiB, "sharded"),       # fit, but leave under a quarter
    ("auto", 19.5 * GiB, 1, 16 * GiB, "first_chip"),    # one chip: nothing to shard over
    ("auto", 19.5 * GiB, 8, None, "first_chip"),        # CPU: memory unknown
    ("sharded", 1, 8, None, "sharded"),
    ("first_chip", 19.5 * GiB, 8, 16 * GiB, "first_chip"),
])
def test_auto_shards_when_a_chip_cannot_hold_the_weights(placement, weights, devices, hbm, want):
    assert placement_lib.choose(placement, int(weights), devices, hbm) == want


def test_unknown_placement_is_named():
    with pytest.raises(ValueError, match="placement 'spread': expected one of auto, first_chip"):
        placement_lib.choose("spread", 0, 8, None)


def test_sharded_pipeline_matches_first_chip(tiny_checkpoint, tiny_pipe):
    """``tiny_pipe``: one device, so first_chip; the sharded pipeline splits over 4 devices."""
    prompts = ["a red cube on a wooden table", "two cats"]
    sharded = LensPipeline.from_pretrained(tiny_checkpoint, devices=4, placement="sharded",
                                           compilation_cache=False)
    assert (tiny_pipe.placement.kind, sharded.placement.kind) == ("first_chip", "sharded")
    # the weights really are split: a denoiser kernel along embed, GPT-OSS's experts
    kernel = sharded.transformer.blocks.img_mlp_w1.kernel[...]
    assert isinstance(kernel.sharding, NamedSharding) and "data" in kernel.sharding.spec
    assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 4
    experts = sharded.text_encoder.params()["layers"]["gate_up_bias"]
    assert tuple(experts.sharding.spec)[:2] == (None, "data")
    assert experts.addressable_shards[0].data.shape[1] == experts.shape[1] // 4
    want, got = tiny_pipe(prompts, **CALL), sharded(prompts, **CALL)
    assert max_rel_err(got.latents, want.latents) < TOL
    assert "placement='sharded'" in repr(sharded)
