"""The LoRA variant of the training step (``config.lora.rank`` >= 1; ``train.trainer.make_trainer``).

State: ``params`` are the adapters only (``{param: {"lora_a", "lora_b"}}``, float32, the trainable
tree: optimizer state and EMA exist for them alone), ``base`` the frozen model weights in
``config.lora.base_dtype`` (from ``config.init_from`` as in full fine-tuning; saved in each
checkpoint so a run resumes and exports on its own), plus ``step``, ``opt_state``, ``ema`` and
``rng`` as in ``train.trainer``. The forward pass scans the adapters with the base blocks
(``LensTransformer.forward_packed(adapters=...)``): no merged copy of the weights is made, and the
gradient is taken with respect to the adapters only.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from lens_jax import sharding
from lens_jax.lora import adapters as adapters_lib
from lens_jax.train.trainer import Trainer

log = logging.getLogger(__name__)

DROPOUT_STREAM = 0x10AA  # folded into the step key for the adapters' dropout masks


class LoraTrainer(Trainer):
    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None,
                 with_encoders: bool = True):
        self.spec = adapters_lib.LoraSpec.from_config(config.lora)
        self.base_dtype = jnp.dtype(config.lora.base_dtype or config.model.param_dtype)
        super().__init__(config, mesh, with_encoders)
        if not config.init_from:
            log.warning("LoRA on a randomly initialised model: set --config.init_from to the "
                        "weights to adapt (a diffusers transformer/ folder, orbax, or run:WORKDIR)")

    # -- state ------------------------------------------------------------------------------------
    def _adapter_shardings(self) -> dict:
        blocks = self.abstract_params["blocks"]
        shapes = adapters_lib.adapter_shapes(self.spec, blocks)
        abstract = {p: {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in v.items()}
                    for p, v in shapes.items()}
        specs = adapters_lib.logical_specs(self.spec, self.logical_specs["blocks"])
        return sharding.param_shardings(specs, abstract, self.mesh, self.rules)

    def _state_from_params(self, params, rng) -> dict:
        base = jax.tree.map(lambda x: x.astype(self.base_dtype), params)
        lora = adapters_lib.init_adapters(jax.random.fold_in(rng, 0x10AB), self.spec, base["blocks"])
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": lora,
            "base": base,
            "opt_state": self.tx.init(lora),
            "ema": (jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), lora)
                    if self.use_ema else {}),
            "rng": rng,
        }

    def _state_shardings(self) -> dict:
        abstract = self._abstract_state_tree()
        lora_sh = self._adapter_shardings()
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract["opt_state"], lora_sh,
                                       transform_non_params=lambda _: self.replicated)
        return {"step": self.replicated, "params": lora_sh, "base": self.param_shardings,
                "opt_state": opt_sh, "ema": lora_sh if self.use_ema else {}, "rng": self.replicated}

    # -- the step ---------------------------------------------------------------------------------
    def forward_fn(self, state: dict, key: jax.Array):
        base = state["base"]
        dropout_key = jax.random.fold_in(key, DROPOUT_STREAM)

        def forward(lora, *args):
            model = nnx.merge(self.graphdef, base)
            return model.forward_packed(*args, adapters=adapters_lib.scanned(lora, self.spec,
                                                                             dropout_key))
        return forward

    def model_weights(self, state: dict, ema: bool) -> dict:
        """The base with the adapters (EMA or raw) merged in, in the base dtype."""
        lora = state["ema"] if (ema and self.use_ema) else state["params"]
        base = state["base"]
        return dict(base, blocks=adapters_lib.merged_blocks(base["blocks"], lora, self.spec.scale))


def make_trainer(config: ml_collections.ConfigDict, mesh: Mesh | None = None,
                 with_encoders: bool = True) -> Trainer:
    """The trainer of a config: ``LoraTrainer`` when ``config.lora.rank`` > 0, else ``Trainer``
    (used by ``lens-train`` and ``lens-train compile``)."""
    if "lora" in config and int(config.lora.rank) > 0:
        return LoraTrainer(config, mesh, with_encoders)
    return Trainer(config, mesh, with_encoders)
