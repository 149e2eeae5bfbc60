"""Where the sampler's three networks live on one host: ``first_chip`` or ``sharded``.

``first_chip`` (what fits on a v5p or v6e chip): GPT-OSS-20B and the VAE on the first chip, the
denoiser replicated on every chip of the host, the denoising batch split over the chips.
``sharded`` (for chips whose HBM cannot hold the weights, e.g. v5e's 16 GiB against 19.5 GiB of
bf16 weights): GPT-OSS-20B's experts split over the host's chips and its other weights FSDP-style
along their ``embed`` dim (the MoE runs in ``jax.shard_map``, ``text_encoder.moe_partitioned``),
the denoiser's weights FSDP-style along ``embed`` (all-gathered layer by layer inside the step),
the batch over the chips too; the VAE (0.16 GiB) stays on the first chip. Both placements run
the same programs and give the same images up to summation order (tests/sampling/test_placement.py).
``auto`` picks ``sharded`` when the three networks' weights take more than
``AUTO_SHARD_FRACTION`` of one chip's HBM (the rest is left to activations) and the host has
more than one chip; where the HBM is unknown (CPU) it picks ``first_chip``.

``LensPipeline`` (``placement=``) and ``lens-sample compile --placement`` both take their
meshes, rules and shardings from here, so the compile command compiles what the pipeline runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from lens_jax.sampling.denoise import BATCH_AXIS, SAMPLING_RULES
from lens_jax.sharding import fit_spec, logical_to_spec

PLACEMENTS = ("auto", "first_chip", "sharded")
AUTO_SHARD_FRACTION = 0.75
# Logical axis -> the host's one mesh axis: rows of a batch, the parameters' embed dim (FSDP) and
# GPT-OSS's experts all over the chips (first matching rule per array wins, lens_jax.sharding).
SHARDED_RULES = (("batch", BATCH_AXIS), ("experts", BATCH_AXIS), ("embed", BATCH_AXIS))


def tree_bytes(tree) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) leaf of ``tree``, unsharded."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def device_hbm_bytes(device) -> int | None:
    """The memory one accelerator chip has (``memory_stats()["bytes_limit"]``); None on CPU."""
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit and device.platform != "cpu" else None


def choose(placement: str, weight_bytes: int, num_devices: int, hbm_bytes: int | None) -> str:
    """``first_chip`` or ``sharded`` for ``placement`` (auto|first_chip|sharded); see the module."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
    if placement != "auto":
        return placement
    if num_devices > 1 and hbm_bytes and weight_bytes > AUTO_SHARD_FRACTION * hbm_bytes:
        return "sharded"
    return "first_chip"


@dataclasses.dataclass(frozen=True)
class Placement:
    """The chosen placement over one host's ``devices``; ``mesh`` has the one axis ``"data"``
    (None with a single device), ``rules`` map the networks' logical axes onto it."""

    kind: str
    devices: tuple
    mesh: Mesh | None

    @property
    def sharded(self) -> bool:
        return self.kind == "sharded"

    @property
    def rules(self) -> tuple:
        return SHARDED_RULES if self.sharded else SAMPLING_RULES

    @property
    def first_chip_sharding(self) -> SingleDeviceSharding:
        return SingleDeviceSharding(self.devices[0])

    @property
    def encoder_mesh(self) -> Mesh | None:
        """The mesh GPT-OSS runs on: the host's (sharded) or none (first chip)."""
        return self.mesh if self.sharded else None

    def _fitted(self, names, shape) -> NamedSharding:
        spec = logical_to_spec(tuple(names), self.rules, self.mesh)
        return NamedSharding(self.mesh, fit_spec(spec, shape, self.mesh))

    def denoiser_shardings(self, state: nnx.State):
        """Shardings of the denoiser's ``nnx.state`` (concrete or abstract): replicated over the
        host's chips (first_chip), or each parameter's ``embed`` dim over them (sharded)."""
        if self.mesh is None:
            return jax.tree.map(lambda _: self.first_chip_sharding, state)
        if not self.sharded:
            return jax.tree.map(lambda _: NamedSharding(self.mesh, PartitionSpec()), state)
        specs = nnx.get_partition_spec(state)
        return jax.tree.map(lambda spec, x: self._fitted(spec, x.shape), specs, state,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))

    def text_encoder_shardings(self, config, num_layers: int, mxfp4: bool) -> dict:
        """Shardings of GPT-OSS's parameter tree (``TextEncoder.params()`` layout)."""
        from lens_jax.models.text_encoder import abstract_params, text_encoder_shardings

        if self.sharded:
            return text_encoder_shardings(config, num_layers, mxfp4, self.mesh, self.rules)
        return jax.tree.map(lambda _: self.first_chip_sharding,
                            abstract_params(config, num_layers, mxfp4))

    def loader_placement(self, text_config) -> dict:
        """``mesh``/``rules`` for ``convert.text_encoder.load_text_encoder``: sharded, the experts
        go over the chips as they are read (the rest is replicated until ``place_text_encoder``),
        so GPT-OSS-20B never lands whole on one chip; first_chip: nothing (the default device)."""
        if not self.sharded or text_config.num_local_experts % len(self.devices):
            return {}
        return {"mesh": self.mesh, "rules": {"experts": BATCH_AXIS}}

    def place_text_encoder(self, encoder) -> None:
        """Moves a loaded ``TextEncoder``'s parameters to this placement (in place)."""
        params = encoder.params()
        num_layers = int(params["layers"]["input_norm"].shape[0])
        shardings = self.text_encoder_shardings(encoder.config, num_layers, encoder.mxfp4)
        placed = jax.device_put(params, shardings)
        encoder.embed[...] = placed["embed"]
        for name, value in placed["layers"].items():
            getattr(encoder.layers, name)[...] = value

    def place_denoiser(self, model) -> None:
        """Moves a denoiser's state to this placement (in place)."""
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, self.denoiser_shardings(state)))


def host_placement(placement: str, devices: Sequence, weight_bytes: int,
                   hbm_bytes: int | None = None) -> Placement:
    """The placement over one host's ``devices`` (``hbm_bytes``: per chip; default: what the first
    device reports, none on CPU). One device is always ``first_chip``."""
    devices = tuple(devices)
    if hbm_bytes is None:
        hbm_bytes = device_hbm_bytes(devices[0])
    kind = choose(placement, weight_bytes, len(devices), hbm_bytes)
    if len(devices) == 1:
        return Placement("first_chip", devices, None)
    mesh = Mesh(np.asarray(devices), (BATCH_AXIS,), axis_types=(AxisType.Auto,))
    return Placement(kind, devices, mesh)


def abstract_weight_bytes(denoiser_config, text_config, text_layers: int, mxfp4: bool, dtype) -> int:
    """Bytes of the denoiser's and GPT-OSS's weights in ``dtype`` (the experts MXFP4-packed when
    ``mxfp4``), from their configs alone (``auto`` decides before they are read)."""
    from lens_jax.models.text_encoder import abstract_params
    from lens_jax.models.transformer import abstract_model

    return (tree_bytes(nnx.state(abstract_model(denoiser_config)))
            + tree_bytes(abstract_params(text_config, text_layers, mxfp4, jnp.dtype(dtype))))
