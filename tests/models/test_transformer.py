"""LensTransformer against the independent PyTorch reading of the spec (tests/reference)."""

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs import lens_3p8b, tiny
from lens_jax.checkpoints.transformer import load_transformer, tensor_count
from lens_jax.models import attention as attention_lib
from lens_jax.models.positions import image_positions, text_positions
from lens_jax.models.transformer import LensTransformer, abstract_model, param_count
from tests.conftest import max_rel_err, rel_l2
from tests.reference.checkpoints import reference_from_config, write_diffusers_folder

FP32_MAX_REL = 1e-4   # fp32 parity: max |a - e| / max |e|
BF16_REL_L2 = 2e-2    # bf16 compute vs the fp32 reference: relative L2


def make_inputs(cfg, b, h, w, n_txt, seed=1):
    g = np.random.default_rng(seed)
    latents = g.standard_normal((b, h * w, cfg.in_channels)).astype(np.float32)
    feats = [(g.standard_normal((b, n_txt, cfg.enc_hidden_dim)) * 3).astype(np.float32)
             for _ in cfg.selected_layer_index]
    timesteps = g.uniform(0.05, 1.0, size=(b,)).astype(np.float32)
    return latents, feats, timesteps


def torch_forward(ref, latents, feats, mask, timesteps, hw):
    with torch.no_grad():
        return ref(torch.from_numpy(latents), [torch.from_numpy(f) for f in feats],
                   None if mask is None else torch.from_numpy(mask), torch.from_numpy(timesteps),
                   hw).numpy()


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    cfg = tiny.get_model_config()
    ref = reference_from_config(cfg, seed=0)
    folder = write_diffusers_folder(ref, cfg, tmp_path_factory.mktemp("tiny") / "transformer")
    return cfg, ref, folder


def test_full_config_counts_on_abstract_shapes():
    cfg = lens_3p8b.get_config().model
    model = abstract_model(cfg)  # ShapeDtypeStructs only
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert param_count(model) == 4_104_225_152
    assert tensor_count(cfg) == 1264


def test_every_parameter_has_logical_axis_names():
    model = abstract_model(tiny.get_model_config())
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            names = var.get_metadata()["out_sharding"]
            assert len(names) == len(var.shape), (path, names, var.shape)
            assert all(isinstance(n, str) for n in names), (path, names)


@pytest.mark.parametrize("hw,n_txt,masked", [((5, 7), 9, True), ((4, 4), 6, False), ((3, 6), 0, False)])
def test_fp32_parity(tiny_pair, hw, n_txt, masked):
    cfg, ref, folder = tiny_pair
    model = load_transformer(folder)
    b = 3
    latents, feats, timesteps = make_inputs(cfg, b, *hw, n_txt)
    mask = None
    if masked:  # right-padded captions of lengths 9, 4, 1
        mask = np.arange(n_txt)[None, :] < np.array([9, 4, 1])[:, None]
    expected = torch_forward(ref, latents, feats, mask, timesteps, hw)
    actual = model(jnp.asarray(latents), [jnp.asarray(f) for f in feats], jnp.asarray(timesteps),
                   hw, None if mask is None else jnp.asarray(mask))
    assert actual.dtype == jnp.float32
    assert max_rel_err(actual, expected) <= FP32_MAX_REL
    assert np.abs(expected).max() > 0.1  # not a degenerate (all-zero) comparison


def test_bf16_compute_close_to_fp32_reference(tiny_pair):
    cfg, ref, folder = tiny_pair
    model = load_transformer(folder, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    hw, n_txt = (5, 7), 8
    latents, feats, timesteps = make_inputs(cfg, 2, *hw, n_txt, seed=3)
    timesteps = np.asarray(jnp.asarray(timesteps, jnp.bfloat16), np.float32)  # bf16 compute rounds them
    mask = np.arange(n_txt)[None, :] < np.array([8, 5])[:, None]
    expected = torch_forward(ref, latents, feats, mask, timesteps, hw)
    actual = model(jnp.asarray(latents), [jnp.asarray(f) for f in feats], jnp.asarray(timesteps),
                   hw, jnp.asarray(mask))
    assert actual.dtype == jnp.bfloat16
    assert rel_l2(actual, expected) <= BF16_REL_L2


BF16_VS_BF16_REL_L2 = 2e-2  # bf16 vs the bf16 reference: measured 0.007; 0.08 with a float32 timestep


def test_bf16_parity_with_the_bf16_reference_rounds_the_timestep(tiny_pair):
    """Both in bf16: diffusers' ``timestep.to(hidden_states.dtype)`` rounds sigma to bf16 before the
    time embedding (sigma 0.9942 -> 0.9961, 2 radians on the top frequency); so does the model."""
    cfg, _, folder = tiny_pair
    model = load_transformer(folder, dtype=jnp.bfloat16)
    ref = reference_from_config(cfg, seed=0).to(torch.bfloat16)
    hw, n_txt = (5, 7), 8
    latents, feats, _ = make_inputs(cfg, 2, *hw, n_txt, seed=3)
    mask = np.arange(n_txt)[None, :] < np.array([8, 5])[:, None]

    def reference(t):
        with torch.no_grad():
            return ref(torch.from_numpy(latents).bfloat16(), [torch.from_numpy(f).bfloat16() for f in feats],
                       torch.from_numpy(mask), torch.from_numpy(t), hw).float().numpy()

    sigmas = np.array([0.9942, 0.7313], np.float32)  # not bf16 values: rounding matters
    actual = model(jnp.asarray(latents, jnp.bfloat16), [jnp.asarray(f, jnp.bfloat16) for f in feats],
                   jnp.asarray(sigmas), hw, jnp.asarray(mask))
    assert actual.dtype == jnp.bfloat16
    expected = reference(sigmas)
    assert rel_l2(np.asarray(actual, np.float32), expected) <= BF16_VS_BF16_REL_L2
    # the comparison can see a timestep off by one bf16 step (0.9883, 0.7344)
    other = reference(np.array([0.98828125, 0.734375], np.float32))
    assert rel_l2(other, expected) > 5 * BF16_VS_BF16_REL_L2


def test_fp32_timestep_is_not_rounded(tiny_pair):
    cfg, _, folder = tiny_pair
    model = load_transformer(folder)
    latents, feats, _ = make_inputs(cfg, 1, 3, 3, 4)
    run = lambda t: np.asarray(model(latents, feats, np.array([t], np.float32), (3, 3)))
    assert not np.array_equal(run(0.9942), run(np.float32(0.99609375)))


def test_masked_text_cannot_reach_the_image(tiny_pair):
    """Spec 1.7: with an all-False mask the image stream equals running without text."""
    cfg, _, folder = tiny_pair
    model = load_transformer(folder)
    latents, feats, timesteps = make_inputs(cfg, 2, 4, 5, 6)
    none = model(latents, [f[:, :0] for f in feats], timesteps, (4, 5))
    masked = model(latents, feats, timesteps, (4, 5), jnp.zeros((2, 6), bool))
    np.testing.assert_allclose(masked, none, rtol=0, atol=1e-5 * np.abs(none).max())


def test_packed_row_of_two_images_equals_each_alone(tiny_pair):
    cfg, _, folder = tiny_pair
    model = load_transformer(folder)
    (h1, w1, n1, t1), (h2, w2, n2, t2) = (3, 5, 4, 0.8), (4, 2, 6, 0.3)
    lat1, f1, _ = make_inputs(cfg, 1, h1, w1, n1, seed=11)
    lat2, f2, _ = make_inputs(cfg, 1, h2, w2, n2, seed=12)
    n_img, n_txt = 32, 16  # row budgets, with padding at the end of both sequences
    pad_img, pad_txt = n_img - h1 * w1 - h2 * w2, n_txt - n1 - n2
    img = np.concatenate([lat1[0], lat2[0], np.full((pad_img, cfg.in_channels), 7.0, np.float32)])
    img_pos = np.concatenate([image_positions(h1, w1), image_positions(h2, w2),
                              np.zeros((pad_img, 3), np.int32)])
    img_seg = np.array([1] * (h1 * w1) + [2] * (h2 * w2) + [0] * pad_img, np.int32)
    feats = [np.concatenate([a[0], b[0], np.full((pad_txt, cfg.enc_hidden_dim), 5.0, np.float32)])
             for a, b in zip(f1, f2)]
    txt_pos = np.concatenate([text_positions(h1, w1, n1), text_positions(h2, w2, n2),
                              np.zeros((pad_txt, 3), np.int32)])
    txt_seg = np.array([1] * n1 + [2] * n2 + [0] * pad_txt, np.int32)
    packed = model.forward_packed(img[None], img_pos[None], img_seg[None], [f[None] for f in feats],
                                  txt_pos[None], txt_seg[None], np.array([[t1, t2]], np.float32))[0]
    alone1 = model(lat1, f1, np.array([t1], np.float32), (h1, w1))[0]
    alone2 = model(lat2, f2, np.array([t2], np.float32), (h2, w2))[0]
    assert max_rel_err(packed[: h1 * w1], alone1) <= 1e-5
    assert max_rel_err(packed[h1 * w1: h1 * w1 + h2 * w2], alone2) <= 1e-5
    assert np.all(np.asarray(packed[h1 * w1 + h2 * w2:]) == 0)  # padding tokens give zeros


def test_remat_policies_give_the_same_gradients():
    latents, feats, timesteps = make_inputs(tiny.get_model_config(), 2, 3, 4, 5)

    def grads(policy):
        model = LensTransformer(tiny.get_model_config(zero_init_modulation=False, remat=policy),
                                rngs=nnx.Rngs(0))  # same seed: same weights for every policy
        graphdef, state = nnx.split(model)

        @jax.jit
        def grad_fn(state):
            return jax.grad(lambda s: jnp.mean(
                nnx.merge(graphdef, s)(latents, feats, timesteps, (3, 4)) ** 2))(state)
        return jax.tree.leaves(grad_fn(state))

    base = grads("none")
    # save_dots is the same mechanism (a jax.checkpoint_policies dots policy) as save_dots_no_batch
    for policy in ("full", "save_dots_no_batch", "save_qkv_attn"):
        for a, b in zip(base, grads(policy)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=policy)


def test_attention_dispatch_falls_back_with_a_warning(caplog):
    attention_lib.resolve.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert attention_lib.resolve("splash", "cpu") == "xla"
        assert attention_lib.resolve("cudnn", "cpu") == "xla"
    assert "falling back to XLA" in caplog.text
    assert attention_lib.resolve("auto", "cpu") == "chunked"
    assert attention_lib.resolve("auto", "tpu") == "splash"
    assert attention_lib.resolve("auto", "gpu") == "cudnn"
    # a model configured for splash runs (through the fallback) and matches the XLA path
    latents, feats, timesteps = make_inputs(tiny.get_model_config(), 1, 2, 3, 2)
    outs = []
    for impl in ("xla", "splash"):
        model = LensTransformer(tiny.get_model_config(zero_init_modulation=False, attention=impl),
                                rngs=nnx.Rngs(0))
        outs.append(model(latents, feats, timesteps, (2, 3)))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_bad_inputs_name_the_shapes(tiny_pair):
    cfg, _, folder = tiny_pair
    model = load_transformer(folder)
    latents, feats, timesteps = make_inputs(cfg, 2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"latent_hw \(3, 5\)"):
        model(latents, feats, timesteps, (3, 5))
    with pytest.raises(ValueError, match="text feature tensors"):
        model(latents, feats[:1], timesteps, (3, 4))
    with pytest.raises(ValueError, match=r"timesteps shape \(3,\)"):
        model(latents, feats, np.zeros(3, np.float32), (3, 4))
    with pytest.raises(ValueError, match="text_mask shape"):
        model(latents, feats, timesteps, (3, 4), np.ones((2, 4), bool))


def test_full_model_lowers_for_1024px_within_60s():
    """Scan over stacked blocks: one block body, so lowering the 48-block model is quick."""
    cfg = lens_3p8b.get_config().model
    graphdef, state = nnx.split(abstract_model(cfg))
    n_img, n_txt = 64 * 64, 415

    def forward(state, latents, feats, timesteps, mask):
        return nnx.merge(graphdef, state)(latents, feats, timesteps, (64, 64), mask)

    sds = jax.ShapeDtypeStruct
    args = (sds((1, n_img, 128), jnp.bfloat16), [sds((1, n_txt, 2880), jnp.bfloat16)] * 4,
            sds((1,), jnp.float32), sds((1, n_txt), jnp.bool_))
    start = time.perf_counter()
    lowered = jax.jit(forward).lower(state, *args)
    seconds = time.perf_counter() - start
    assert lowered.out_info.shape == (1, n_img, 128)
    assert seconds < 60, f"lowering took {seconds:.1f} s"


def test_one_image_per_row_tells_attention_it_is_not_packed(tiny_pair, monkeypatch):
    """``model(...)`` (one image per row: the sampler) lets the GPU use cuDNN (``packed=False``);
    ``forward_packed`` (training rows of several images) asks for the segment-id kernel."""
    from lens_jax.models import attention as attention_lib

    cfg, _, folder = tiny_pair
    model = load_transformer(folder)
    seen = []
    original = attention_lib.attention

    def spy(*args, packed=True, **kwargs):
        seen.append(packed)
        return original(*args, packed=packed, **kwargs)

    monkeypatch.setattr(attention_lib, "attention", spy)
    lat, feats, t = make_inputs(cfg, 1, 2, 3, 4)
    model(lat, feats, t, (2, 3))
    assert seen and not any(seen)
    seen.clear()
    img_seg = np.ones((1, 6), np.int32)
    model.forward_packed(lat, image_positions(2, 3)[None], img_seg, feats,
                         text_positions(2, 3, 4)[None], np.ones((1, 4), np.int32), t[:, None])
    assert seen and all(seen)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_per_token_is_an_exact_lookup_whose_gradient_has_no_scatter(dtype):
    """Per-segment values spread to their tokens: bit-equal to a gather, and differentiated without
    a scatter-add (on an H200 a packed training step cost ~3.5x more per token than the one-image
    denoiser, with two ~1,000-way colliding scatters per block: docs/benchmarks.md "GPU")."""
    from lens_jax.models.transformer import per_token

    rng = np.random.default_rng(0)
    values = jnp.asarray(rng.standard_normal((2, 5, 48)), dtype)
    segment_ids = jnp.asarray(rng.integers(0, 6, (2, 37)), jnp.int32)  # 0 = padding -> segment 1
    gathered = jnp.take_along_axis(values, jnp.clip(segment_ids - 1, 0, 4)[..., None], axis=1)
    assert bool((per_token(values, segment_ids) == gathered).all())
    weights = jnp.asarray(rng.standard_normal((2, 37, 48)), dtype)
    grad = jax.jit(jax.grad(lambda v: jnp.sum((per_token(v, segment_ids) * weights).astype(jnp.float32))))
    assert "scatter" not in grad.lower(values).as_text()
    expected = jax.grad(lambda v: jnp.sum(jnp.take_along_axis(v, jnp.clip(segment_ids - 1, 0, 4)[..., None], axis=1)
                                          * weights.astype(jnp.float32)))(values.astype(jnp.float32))
    got = np.asarray(grad(values), np.float32)
    assert max_rel_err(got, np.asarray(expected)) <= (0 if dtype == jnp.float32 else 4e-3)


def _plain_rms_norm(x, scale, eps):
    """``transformer.rms_norm`` without its ``jax.checkpoint``: what autodiff would keep."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _saved_float32_like(fn, x, *rest):
    """Residuals ``jax.vjp`` keeps for the backward pass (the leaves of its vjp function) that are
    float32 arrays of ``x``'s shape: a float32 copy of a bf16 input."""
    _, vjp_fn = jax.vjp(fn, x, *rest)
    return [leaf for leaf in jax.tree_util.tree_leaves(vjp_fn)
            if leaf.shape == x.shape and leaf.dtype == jnp.float32]


def test_norms_keep_the_bf16_input_not_a_float32_copy_for_the_backward_pass():
    from lens_jax.models.transformer import layer_norm, rms_norm
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 32)), jnp.bfloat16)
    scale = jnp.linspace(0.5, 1.5, 32, dtype=jnp.bfloat16)
    assert _saved_float32_like(lambda a, s: _plain_rms_norm(a, s, 1e-6), x, scale)  # the check bites
    assert not _saved_float32_like(lambda a, s: rms_norm(a, s, 1e-6), x, scale)
    assert not _saved_float32_like(lambda a: layer_norm(a, 1e-6), x)
    # the same gradients as the plain form: the recomputation is the same arithmetic
    loss = lambda f: (lambda a, s: jnp.sum(f(a, s, 1e-6).astype(jnp.float32) ** 2))
    got, want = jax.grad(loss(rms_norm), (0, 1))(x, scale), jax.grad(loss(_plain_rms_norm), (0, 1))(x, scale)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
