"""Meshes from the topology (issue 15.4): jax.make_mesh for one slice, the hybrid ICI x DCN mesh
for several, and shapes that do not match the devices are errors naming both."""

import jax
import numpy as np
import pytest

from lens_jax.train import topologies
from lens_jax.train.config import train_config
from lens_jax.train.mesh import make_mesh
from configs.tiny import get_model_config

MISSING = topologies.libtpu_missing_reason()


def _mesh_config(**sizes):
    config = train_config(get_model_config()).mesh
    config.update(sizes)
    return config


def test_one_slice_of_cpu_devices():
    mesh = make_mesh(_mesh_config(fsdp=-1, tensor=2), jax.devices()[:8])
    assert dict(mesh.shape) == {"slice": 1, "data": 1, "fsdp": 4, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices()[:8])


@pytest.mark.parametrize("sizes,message", [
    (dict(fsdp=3, tensor=1, data=1), r"needs 3 devices, 8 are used"),
    (dict(fsdp=-1, tensor=3), r"8 devices are not divisible by the fixed axes"),
    (dict(slice=2, fsdp=-1), r"slice=2 but the 8 devices .* form 1 slice"),
])
def test_a_shape_that_does_not_match_the_devices_names_both(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(_mesh_config(**sizes), jax.devices()[:8])


@pytest.mark.skipif(bool(MISSING), reason=MISSING or "libtpu is installed")
def test_two_slices_put_only_the_slice_axis_across_slices():
    topo = topologies.topology("v5e:2x2")
    devices = topologies.topology_devices(topo, num_slices=2)
    mesh = make_mesh(_mesh_config(slice=2, fsdp=-1), devices)
    assert dict(mesh.shape) == {"slice": 2, "data": 1, "fsdp": 4, "tensor": 1}
    for s in range(2):
        assert {d.slice_index for d in mesh.devices[s].flat} == {s}
    with pytest.raises(ValueError, match=r"form 2 slice\(s\): set --config.mesh.slice=2"):
        make_mesh(_mesh_config(fsdp=-1), devices)
    # one slice on the torus: every chip once
    single = make_mesh(_mesh_config(fsdp=-1), topologies.topology_devices(topo))
    assert sorted(tuple(d.coords) for d in single.devices.flat) == sorted(
        tuple(d.coords) for d in devices if d.slice_index == 0)
    assert np.asarray(single.devices).shape == (1, 1, 4, 1)


@pytest.mark.skipif(bool(MISSING), reason=MISSING or "libtpu is installed")
def test_split_physical_axes_is_a_config_choice_and_the_error_names_shapes_that_fit():
    """v5p-128 is 4x4x4 chips: data=2 x fsdp=32 needs a physical axis split in two."""
    devices = topologies.topology_devices(topologies.topology("v5p-128"))
    assert _mesh_config().allow_split_physical_axes is False
    with pytest.raises(ValueError) as e:
        make_mesh(_mesh_config(data=2, fsdp=-1), devices)
    message = str(e.value)
    assert "set --config.mesh.allow_split_physical_axes=True" in message
    assert "--config.mesh.data=4 --config.mesh.fsdp=16" in message  # the nearest shape that fits
    assert dict(make_mesh(_mesh_config(data=4, fsdp=-1), devices).shape)["fsdp"] == 16
    mesh = make_mesh(_mesh_config(data=2, fsdp=-1, allow_split_physical_axes=True), devices)
    assert dict(mesh.shape) == {"slice": 1, "data": 2, "fsdp": 32, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
