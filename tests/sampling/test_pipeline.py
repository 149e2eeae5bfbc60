"""``LensPipeline`` end to end on a tiny random checkpoint (32x32 images, 2 steps)."""

import warnings

import jax
import numpy as np
import pytest

from lens_jax.sampling import denoise as denoise_lib
from lens_jax.sampling import pipeline as pipeline_lib
from lens_jax.sampling.resolution import check_resolution, parse_bucket, parse_size
from tests.conftest import max_rel_err
from tests.sampling.conftest import DATE

PROMPTS = ["a red cube on a wooden table", "two cats"]
CALL = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0, seed=5, date=DATE)


@pytest.fixture(scope="module")
def first(tiny_pipe):
    return tiny_pipe(PROMPTS, **CALL)


def test_outputs_and_settings(tiny_pipe, first):
    assert len(first.images) == 2 and first.images[0].size == (32, 32)
    assert first.images[0].mode == "RGB"
    assert first.latents.shape == (2, 4, 128) and first.latents.dtype == np.float32
    s = first.settings[1]
    assert (s["prompt"], s["seed"], s["image_index"], s["num_inference_steps"], s["guidance_scale"],
            s["date"]) == ("two cats", 5, 1, 2, 3.0, DATE)
    assert set(first.timings) == {"text_encoding", "denoising", "decoding"}


def test_same_seed_same_image_and_batch_independence(tiny_pipe, first):
    again = tiny_pipe(PROMPTS, **CALL)
    np.testing.assert_array_equal(again.latents, first.latents)
    np.testing.assert_array_equal(np.asarray(again.images[1]), np.asarray(first.images[1]))
    # Image 1 alone (same seed, same global index) starts from the same noise and ends the same.
    alone = tiny_pipe([PROMPTS[1], PROMPTS[1]], **dict(CALL, seed=5), first_index=1)
    assert max_rel_err(alone.latents[0], first.latents[1]) < 1e-5
    other = tiny_pipe(PROMPTS, **dict(CALL, seed=6))
    assert max_rel_err(other.latents, first.latents) > 1e-2


def test_injected_noise_and_sharded_batch(tiny_checkpoint, tiny_pipe, first):
    """All 8 (fake) devices: the batch of 2 is padded to 8 and sharded; same latents."""
    noise = np.asarray(denoise_lib.initial_noise(5, [0, 1], 4, 128))
    injected = tiny_pipe(PROMPTS, **CALL, noise=noise, output_type="latent")
    np.testing.assert_array_equal(injected.latents, first.latents)
    sharded = pipeline_lib.LensPipeline.from_pretrained(tiny_checkpoint, compilation_cache=False)
    assert sharded.mesh is not None and sharded.mesh.size == jax.local_device_count() == 8
    out = sharded(PROMPTS, **CALL, output_type="latent")
    assert out.latents.shape == (2, 4, 128)
    assert max_rel_err(out.latents, first.latents) < 1e-5


def test_turbo_preset_skips_guidance(tiny_pipe):
    turbo = pipeline_lib.LensPipeline(tiny_pipe.transformer, tiny_pipe.vae, tiny_pipe.text_encoder,
                                      tiny_pipe.tokenizer, preset="lens-turbo", devices=1)
    calls = []
    original = turbo.encode
    turbo.encode = lambda prompts, date: calls.append(list(prompts)) or original(prompts, date)
    out = turbo(PROMPTS[:1], "ugly", height=32, width=32, seed=0, date=DATE, output_type="latent")
    assert out.settings[0]["num_inference_steps"] == 4 and out.settings[0]["guidance_scale"] == 1.0
    assert calls == [PROMPTS[:1]]  # the negative prompt is never encoded at g = 1


def test_presets_and_names():
    assert {k: (p.num_inference_steps, p.guidance_scale) for k, p in pipeline_lib.PRESETS.items()} == {
        "lens": (20, 5.0), "lens-turbo": (4, 1.0), "lens-base": (50, 5.0)}
    assert pipeline_lib.preset_for("microsoft/Lens-Turbo") == "lens-turbo"
    assert pipeline_lib.preset_for("/ckpt/Lens-Base") == "lens-base"
    assert pipeline_lib.preset_for("/ckpt/Lens") == "lens"
    with pytest.raises(ValueError, match="unknown preset"):
        pipeline_lib.get_preset("lens-xl")


def test_resolution_checks(tiny_pipe):
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny_pipe(PROMPTS, height=40, width=32)
    with pytest.raises(ValueError, match="image indices"):
        tiny_pipe(PROMPTS, height=32, width=32, first_index=2 ** 32 - 1)
    with pytest.warns(UserWarning, match="aspect ratio"):
        check_resolution(16, 64)
    with pytest.warns(UserWarning, match="1440x1440"):
        check_resolution(1600, 1600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_resolution(1440, 1440) == (90, 90) and check_resolution(1472, 736) == (92, 46)
    assert parse_size("768x1024") == (1024, 768) and parse_bucket("1024:3:4") == (1152, 864)
    with pytest.raises(ValueError, match="no official bucket"):
        parse_bucket("1024:5:4")


def test_missing_component_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="transformer/"):
        pipeline_lib.LensPipeline.from_pretrained(tmp_path, compilation_cache=False)
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        pipeline_lib.LensPipeline.from_pretrained(tmp_path / "nope", compilation_cache=False)


def test_persistent_compilation_cache(tiny_pipe, tmp_path):
    """A second compile of the same shapes is served from the on-disk cache."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    saved = {k: getattr(jax.config, k) for k in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    events = []
    listener = lambda name, **kw: events.append(name)
    try:
        cc.reset_cache()
        assert pipeline_lib.enable_compilation_cache(tmp_path / "cache") == tmp_path / "cache"
        jax.monitoring.register_event_listener(listener)
        call = dict(CALL, num_inference_steps=1, output_type="latent")
        tiny_pipe(PROMPTS, **call)
        assert any((tmp_path / "cache").iterdir())
        denoise_lib.denoise_jit.clear_cache()  # forget the in-memory executable
        events.clear()
        tiny_pipe(PROMPTS, **call)
        assert "/jax/compilation_cache/cache_hits" in events
        assert "/jax/compilation_cache/cache_misses" not in events
    finally:
        jax.monitoring.unregister_event_listener(listener)
        for k, v in saved.items():
            jax.config.update(k, v)
        cc.reset_cache()


def test_compilation_cache_can_be_disabled(monkeypatch):
    monkeypatch.setenv(pipeline_lib.CACHE_ENV, "off")
    assert pipeline_lib.enable_compilation_cache(True) is None
    assert pipeline_lib.enable_compilation_cache(False) is None


def test_orbax_transformer(tiny_checkpoint, tiny_pipe, first, tmp_path):
    """The denoiser may come from our orbax layout (``lens-convert to-orbax``)."""
    from lens_jax.checkpoints.transformer import convert
    orbax = convert(tiny_checkpoint / "transformer", tmp_path / "orbax", to="orbax", progress=False)
    pipe = pipeline_lib.LensPipeline.from_pretrained(tiny_checkpoint, transformer_path=orbax,
                                                     devices=1, compilation_cache=False)
    out = pipe(PROMPTS, **CALL, output_type="latent")
    np.testing.assert_array_equal(out.latents, first.latents)
