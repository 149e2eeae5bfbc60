"""The slice table (lens_jax.train.topologies) and XLA's FLOP count with loop trip counts; CPU only."""

import jax
import jax.numpy as jnp
import pytest

from lens_jax.train import topologies
from lens_jax.train.compile import hlo_dot_flops

GiB = 1 << 30


@pytest.mark.parametrize("name,topology,chips,per_host,hbm", [
    ("v5p-8", "v5p:2x2x1", 4, 4, 95 * GiB),
    ("v5p-64", "v5p:2x4x4", 32, 4, 95 * GiB),
    ("v5p-128", "v5p:4x4x4", 64, 4, 95 * GiB),
    ("v4-128", "v4:4x4x4", 64, 4, 32 * GiB),
    ("v5e-8", "v5e:2x4", 8, 8, 16 * GiB),
    ("v5litepod-256", "v5e:16x16", 256, 4, 16 * GiB),
    ("v6e-256", "v6e:16x16", 256, 4, 32 * GiB),
    ("v6e-8", "v6e:2x4", 8, 8, 32 * GiB),
    ("v5p:2x2x2", "v5p:2x2x2", 8, 4, 95 * GiB),
])
def test_slice_names(name, topology, chips, per_host, hbm):
    t = topologies.topology(name)
    assert (t.topology, t.chips, t.chips_per_host, t.hbm_bytes) == (topology, chips, per_host, hbm)
    assert t.hosts * t.chips_per_host == t.chips


@pytest.mark.parametrize("name,message", [
    ("v5p-7", "must be even"), ("v5p-6", "no v5p slice of 3 chips"), ("v9-8", "unknown TPU generation"),
    ("tpu", "expected a slice name"), ("v5e:2x2x2", "2 axes"),
])
def test_bad_names_say_what_is_known(name, message):
    with pytest.raises(ValueError, match=message):
        topologies.topology(name)


def test_loop_bodies_are_scaled_by_their_trip_count():
    """cost_analysis() counts a scan body once; adding the dots' (scaled - once) restores the count
    of the unrolled program."""
    def f(x, w, unroll):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w, unroll=unroll)[0]

    x, w = jnp.ones((16, 32)), jnp.ones((6, 32, 32))
    rolled = jax.jit(lambda x, w: f(x, w, 1)).lower(x, w)
    unrolled = jax.jit(lambda x, w: f(x, w, True)).lower(x, w).compile()
    for text in (rolled.compiler_ir("hlo").as_hlo_text(), rolled.compile().as_text()):
        once, scaled = hlo_dot_flops(text)  # before XLA's passes, and after (CPU)
        assert once == 2 * 16 * 32 * 32 and scaled == 6 * once
    xla = rolled.compile().cost_analysis()["flops"] + scaled - once
    assert abs(xla - unrolled.cost_analysis()["flops"]) / xla < 1e-3


TPU_STYLE_HLO = """\
%fused (p0: f32[4,8], p1: f32[8,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  ROOT %convolution.5 = f32[4,8]{1,0:T(8,128)} convolution(%p0, %p1), dim_labels=bf_io->bf
}

%body (w: (s32[], f32[4,8], f32[8,8])) -> (s32[], f32[4,8], f32[8,8]) {
  %w = (s32[], f32[4,8]{1,0}, f32[8,8]{1,0}) parameter(0)
  %a = f32[4,8]{1,0} get-tuple-element(%w), index=1
  %b = f32[8,8]{1,0} get-tuple-element(%w), index=2
  %fusion.1 = f32[4,8]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused
}

%cond (w: (s32[], f32[4,8], f32[8,8])) -> pred[] {
  %constant.5 = s32[]{:T(128)} constant(6)
  %i = s32[]{:T(128)} get-tuple-element(%w), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %constant.5), direction=LT
}

ENTRY %main (x: f32[4,8], y: f32[8,8]) -> f32[4,8] {
  %t = (s32[], f32[4,8]{1,0}, f32[8,8]{1,0}) tuple(%z, %x, %y)
  %while.9 = (s32[], f32[4,8]{1,0}, f32[8,8]{1,0}) while(%t), condition=%cond, body=%body
}
"""


def test_tpu_loops_take_the_bound_of_their_condition():
    """TPU HLO has no known_trip_count: the loop bound is the constant its condition compares to;
    TPU dots are convolutions whose operand shapes are defined earlier in the computation."""
    assert hlo_dot_flops(TPU_STYLE_HLO) == (2 * 4 * 8 * 8, 6 * 2 * 4 * 8 * 8)


MISSING = topologies.libtpu_missing_reason()


@pytest.mark.skipif(bool(MISSING), reason=MISSING or "libtpu is installed")
@pytest.mark.parametrize("name,kind,peak", [
    ("v4-8", "TPU v4", 275e12), ("v5p-8", "TPU v5", 459e12), ("v5e-4", "TPU v5 lite", 197e12),
    ("v6e-4", "TPU v6 lite", 918e12),
])
def test_peak_flops_of_the_devices_libtpu_builds(name, kind, peak):
    """MFU's peak comes from the device_kind a real slice's devices report ("TPU v5" is v5p)."""
    from lens_jax.train.metrics import device_peak_flops

    device = topologies.topology_devices(topologies.topology(name))[0]
    assert device.device_kind == kind
    assert device_peak_flops(device) == peak == topologies.topology(name).peak_flops


def test_peak_flops_of_gpus_and_unknown_devices():
    from lens_jax.train.metrics import device_peak_flops

    kind = lambda k: type("D", (), {"device_kind": k})()
    assert device_peak_flops(kind("NVIDIA H100 80GB HBM3")) == 989e12
    assert device_peak_flops(kind("NVIDIA A100-SXM4-40GB")) == 312e12
    assert device_peak_flops(kind("cpu")) == 0.0
    assert device_peak_flops(kind("TPU v9")) == 0.0
