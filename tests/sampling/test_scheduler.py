"""The Lens scheduler against the spec's tables (LENS_SPEC.md 2.3) to 4 decimals."""

import numpy as np
import pytest

from lens_jax.sampling import scheduler
from lens_jax.sampling.resolution import official_buckets

# (H, W, S_img, mu@20, mu@4, mu@50) from the spec's table (portrait buckets; transposes share them).
SPEC_MU = [
    (1472, 736, 4232, 2.2105, 2.3027, 2.0376),
    (1376, 768, 4128, 2.2010, 2.2939, 2.0267),
    (1248, 832, 4056, 2.1944, 2.2878, 2.0192),
    (1152, 864, 3888, 2.1790, 2.2735, 2.0016),
    (1024, 1024, 4096, 2.1980, 2.2912, 2.0234),
    (2080, 1040, 8450, 1.8870, 1.8870, 1.8870),
    (1936, 1088, 8228, 1.8494, 1.8494, 1.8494),
    (1760, 1168, 8030, 1.8159, 1.8159, 1.8159),
    (1616, 1216, 7676, 1.7560, 1.7560, 1.7560),
    (1440, 1440, 8100, 1.8278, 1.8278, 1.8278),
]
SIGMAS_1024_20 = [1.0, 0.9942, 0.9878, 0.9808, 0.9730, 0.9643, 0.9546, 0.9436, 0.9311, 0.9167,
                  0.9001, 0.8805, 0.8572, 0.8291, 0.7942, 0.7501, 0.6925, 0.6138, 0.5002, 0.3216, 0.0]
SIGMAS_1024_4 = [1.0, 0.9674, 0.9081, 0.7672, 0.0]


@pytest.mark.parametrize("height,width,seq,mu20,mu4,mu50", SPEC_MU)
def test_mu_per_official_bucket(height, width, seq, mu20, mu4, mu50):
    assert (height // 16) * (width // 16) == seq
    for steps, expected in ((20, mu20), (4, mu4), (50, mu50)):
        assert round(scheduler.empirical_mu(seq, steps), 4) == pytest.approx(expected, abs=1e-9)


def test_every_official_bucket_is_in_the_table():
    buckets = official_buckets()
    assert len(buckets) == 18
    table = {(h, w) for h, w, *_ in SPEC_MU} | {(w, h) for h, w, *_ in SPEC_MU}
    assert {(b.height, b.width) for b in buckets} == table


def test_sigmas_1024_20_and_4_steps():
    s20 = scheduler.sigmas_for(20, 4096)
    s4 = scheduler.sigmas_for(4, 4096)
    assert s20.dtype == np.float32 and s20.shape == (21,)
    np.testing.assert_array_equal(np.round(s20, 4), np.asarray(SIGMAS_1024_20, np.float32))
    np.testing.assert_array_equal(np.round(s4, 4), np.asarray(SIGMAS_1024_4, np.float32))
    # 1440^2: mu independent of the step count above 4300 tokens; last non-zero sigma 0.2466.
    assert round(float(scheduler.sigmas_for(20, 8100)[-2]), 4) == 0.2466
    assert s20[-1] == 0.0 and np.all(np.diff(s20) < 0)


def test_sigmas_match_the_torch_reference():
    from tests.reference.sampling_torch import reference_sigmas
    for steps, seq in ((20, 4096), (4, 4096), (50, 3888), (7, 8100), (3, 16)):
        np.testing.assert_allclose(scheduler.sigmas_for(steps, seq),
                                   reference_sigmas(steps, seq).numpy(), rtol=0, atol=1e-7)


def test_model_timestep_bf16_rounding():
    import jax.numpy as jnp
    sigma = jnp.float32(scheduler.sigmas_for(20, 4096)[1])  # 0.9942
    assert float(scheduler.model_timestep(sigma)) == pytest.approx(0.99419, abs=1e-5)
    assert float(scheduler.model_timestep(sigma, bf16_rounding=True)) == 0.99609375


def test_euler_step_in_float32():
    import jax.numpy as jnp
    x = jnp.full((1, 2, 4), 1.0, jnp.bfloat16)
    v = jnp.full((1, 2, 4), 2.0, jnp.bfloat16)
    out = scheduler.euler_step(x, v, jnp.float32(0.75), jnp.float32(0.5))
    assert out.dtype == jnp.bfloat16 and float(out[0, 0, 0]) == 0.5


def test_scheduler_config_roundtrip_and_refusals():
    cfg = scheduler.SchedulerConfig()
    data = cfg.to_json()
    assert data["use_dynamic_shifting"] and data["time_shift_type"] == "exponential"
    assert data["base_image_seq_len"] == 256 and data["max_shift"] == 1.15 and data["shift"] == 3.0
    assert scheduler.SchedulerConfig.from_json(data) == cfg
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        scheduler.SchedulerConfig.from_json(dict(data, use_karras_sigmas=True))
    with pytest.raises(ValueError, match="_class_name"):
        scheduler.SchedulerConfig.from_json(dict(data, _class_name="DDIMScheduler"))
