"""The training step of one configuration: sharded state, its init, and the jitted step.

State (a plain pytree, checkpointed as one orbax item): ``step`` (int32, optimizer steps done),
``params`` (float32 master weights, nested dict as ``nnx.to_pure_dict``), ``opt_state`` (optax),
``ema`` (float32), ``rng`` (uint32[2] base key; the key of step t is ``fold_in(rng, t)``, so the
randomness of a step does not depend on how the run got there). The data iterator's state is saved
beside it (grain), so a resumed run sees the same batches and the same noise as an uninterrupted one.
The loop that drives the step is ``lens_jax.train.loop``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from lens_jax.models.transformer import LensTransformer, abstract_model
from lens_jax import sharding
from lens_jax.sharding import use_rules
from lens_jax.train import mesh as mesh_lib
from lens_jax.train import encoders, hosts, objective, optim

log = logging.getLogger(__name__)


EAGER_INIT_MAX_PARAMS = 50_000_000  # larger models are initialised by a jitted, sharded init


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """Holds the mesh, shardings and the jitted init/step functions of one configuration."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None,
                 with_encoders: bool = True):
        """``with_encoders=False`` skips the frozen encoders and tokenizer (shape/sharding analysis)."""
        self.config = config
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
        self.rules = tuple((str(n), tuple(a) if isinstance(a, (list, tuple)) else a)
                           for n, a in config.rules)
        self.graphdef, abstract_state = nnx.split(abstract_model(config.model))
        self.abstract_params = nnx.to_pure_dict(abstract_state)
        self.logical_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
        self.param_shardings = sharding.param_shardings(self.logical_specs, self.abstract_params,
                                                        self.mesh, self.rules)
        self.tx, self.schedule = optim.make_optimizer(config.optimizer, int(config.num_steps))
        self.use_ema = float(config.ema.decay) > 0
        self.replicated = mesh_lib.replicated(self.mesh)
        self.batch_sharding = mesh_lib.data_sharding(self.mesh)
        self.preamble = encoders.text_preamble(config) if with_encoders else 0
        frozen = encoders.build_frozen(config) if with_encoders else {}
        self.frozen_shardings = encoders.frozen_shardings(config, frozen, self.mesh, self.rules)
        self.frozen = jax.device_put(frozen, self.frozen_shardings)
        self.text_cache = (encoders.caption_feature_cache(config, self.preamble)
                           if with_encoders else None)
        self.state_shardings = self._state_shardings()
        self._step_fn = None
        self._step_by_shape: dict[tuple, Callable] = {}   # batch shapes -> compiled step

    # -- state ------------------------------------------------------------------------------------
    def _abstract_state_tree(self) -> dict:
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.abstract_params)
        return jax.eval_shape(lambda p: self._state_from_params(p, jax.random.PRNGKey(0)), params)

    def _state_from_params(self, params, rng) -> dict:
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(self.config.model.param_dtype)), params)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": self.tx.init(params),
            "ema": (jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)
                    if self.use_ema else {}),
            "rng": rng,
        }

    def _state_shardings(self) -> dict:
        abstract = self._abstract_state_tree()
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract["opt_state"],
                                       self.param_shardings,
                                       transform_non_params=lambda _: self.replicated)
        return {"step": self.replicated, "params": self.param_shardings, "opt_state": opt_sh,
                "ema": self.param_shardings if self.use_ema else {}, "rng": self.replicated}

    def abstract_state(self) -> dict:
        """``ShapeDtypeStruct`` tree of the state with this mesh's shardings (restore target)."""
        abstract = self._abstract_state_tree()
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, self.state_shardings)

    def init_state(self) -> dict:
        """Fresh state (random init, or ``config.init_from`` weights), sharded."""
        c = self.config
        rng = jax.random.PRNGKey(int(c.seed) + 1)
        if c.init_from:
            params = self.load_params(c.init_from)
            make = jax.jit(self._state_from_params, out_shardings=self.state_shardings)
            return make(params, rng)

        def fresh(rng):
            model = LensTransformer(c.model, rngs=nnx.Rngs(int(c.seed)))
            return self._state_from_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), rng)

        num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_params))
        if num_params <= EAGER_INIT_MAX_PARAMS:  # small: initialise eagerly (no compile), then place
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                host_state = fresh(rng)
            return jax.device_put(host_state, self.state_shardings)
        return jax.jit(fresh, out_shardings=self.state_shardings)(rng)

    def load_params(self, path: str) -> dict:
        """Denoiser weights, sharded like the params: a diffusers folder, the orbax layout of
        lens-convert, or ``run:WORKDIR[:STEP]`` (raw weights of a lens-train checkpoint)."""
        from lens_jax.checkpoints.transformer import load_transformer, model_params
        from lens_jax.checkpoints import keymap
        from lens_jax.models.config import DIFFUSERS_FIELDS

        m = self.config.model
        if path.startswith("run:"):  # a lens-train run directory: run:WORKDIR[:STEP] (raw weights)
            from lens_jax.train.export import restore_weights

            workdir, _, step = path[4:].partition(":")
            params, _, _ = restore_weights(workdir, int(step) if step else -1, ema=False)
            return jax.device_put(params, self.param_shardings)
        model = load_transformer(path, dtype=m.param_dtype, compute_dtype=m.dtype,
                                 shardings=self.param_shardings)
        mismatch = {k: (model.config[k], m[k]) for k in DIFFUSERS_FIELDS
                    if tuple(np.atleast_1d(model.config[k])) != tuple(np.atleast_1d(m[k]))}
        if mismatch:
            raise ValueError(f"config.init_from={path}: architecture differs from config.model "
                             f"(checkpoint, config): {mismatch}")
        return keymap.unflatten(model_params(model))

    # -- the step ---------------------------------------------------------------------------------
    def apply_fn(self, params, *args) -> jax.Array:
        return nnx.merge(self.graphdef, params).forward_packed(*args)

    def forward_fn(self, state: dict, key: jax.Array) -> Callable:
        """``f(trainable, *args)`` -> velocity, for the step's gradient (LoRA closes over the base)."""
        del state, key
        return self.apply_fn

    def model_weights(self, state: dict, ema: bool) -> dict:
        """The full model parameters (EMA or raw) of a state, e.g. for sampling."""
        return state["ema"] if (ema and self.use_ema) else state["params"]

    def train_step(self, state: dict, batch: dict, frozen: dict) -> tuple[dict, dict]:
        """One optimizer step (with ``grad_accum_steps`` micro-batches); pure, jit it."""
        c = self.config
        o = c.objective
        accum = int(c.grad_accum_steps)
        key = jax.random.fold_in(state["rng"], state["step"])
        params = state["params"]
        forward = self.forward_fn(state, key)

        def micro(mb, k):
            def loss_of(p):
                latents, feats = encoders.encode_inputs(c, frozen, mb, self.preamble)
                return objective.packed_loss(
                    forward, p, mb, jax.lax.stop_gradient(latents), feats, k,
                    sigma_loc=tuple(o.sigma_loc), sigma_tokens=tuple(o.sigma_tokens),
                    sigma_scale=float(o.sigma_scale), sigma_buckets=tuple(o.sigma_buckets))
            (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
            n_txt = mb["text_length"].astype(jnp.float32)
            n_img = mb["num_image_tokens"].astype(jnp.float32)
            metrics["attention_pairs"] = jnp.sum(jnp.where(mb["segment_valid"], jnp.square(n_img + n_txt), 0.0))
            return grads, metrics

        batch = dict(batch, row_index=jnp.arange(batch["segment_valid"].shape[0], dtype=jnp.int32))
        if accum == 1:
            grads, metrics = micro(batch, key)
        else:
            rows = batch["segment_valid"].shape[0]
            if rows % accum:
                raise ValueError(f"rows per step {rows} not divisible by grad_accum_steps {accum}")
            # micro-batch i = rows i, i+A, ...: every device keeps its own rows.
            split = jax.tree.map(lambda x: jnp.moveaxis(x.reshape((rows // accum, accum) + x.shape[1:]), 1, 0),
                                 batch)

            def body(carry, mb):
                g, m = micro(mb, key)  # randomness is keyed by row_index, not by micro-batch
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zeros = jax.eval_shape(micro, jax.tree.map(lambda x: x[0], split), key)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (grads, metrics), _ = jax.lax.scan(body, zeros, split)

        images = jnp.maximum(metrics["images"], 1.0)
        grads = jax.tree.map(lambda g: g / images, grads)
        loss = metrics["loss_sum"] / images
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(state, step=state["step"] + 1, params=new_params, opt_state=opt_state)
        if self.use_ema:
            decay = optim.ema_decay(state["step"], float(c.ema.decay), bool(c.ema.warmup))
            new_state["ema"] = optim.ema_update(state["ema"], new_params, decay)
        bucket_loss = metrics["bucket_loss_sum"] / jnp.maximum(metrics["bucket_images"], 1.0)
        out = {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(state["step"]),
               "images": metrics["images"], "image_tokens": metrics["image_tokens"],
               "text_tokens": metrics["text_tokens"], "attention_pairs": metrics["attention_pairs"],
               "bucket_loss": bucket_loss, "bucket_images": metrics["bucket_images"]}
        return new_state, out

    def batch_shardings(self, batch: dict) -> dict:
        return {k: self.batch_sharding for k in batch}

    def load_compiled_step(self, path: str) -> None:
        """Uses the step that ``lens-train compile --save-executable`` wrote to ``path`` instead of
        jitting one; ``executable.ExecutableMismatchError`` unless it was compiled for this
        config, mesh, device kind and jax version."""
        from lens_jax.train import executable

        wanted = executable.describe(self.config, self.mesh, jax.process_count())
        self._step_fn = executable.load(path, wanted, devices=self.mesh.devices.flat)

    def step_fn(self, batch_example: dict) -> Callable:
        """The jitted step with explicit input/output shardings (state donated), or the one
        ``load_compiled_step`` loaded."""
        if self._step_fn is None:
            def step(state, batch, frozen):
                with use_rules(self.mesh, self.rules):
                    return self.train_step(state, batch, frozen)

            frozen_sh = self.frozen_shardings
            self._step_fn = jax.jit(
                step, in_shardings=(self.state_shardings, self.batch_shardings(batch_example), frozen_sh),
                out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
        return self._step_fn

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One training step, dispatched asynchronously. The first step of each batch shape is
        compiled here, then every process waits for the others (``hosts.barrier``) before running
        it: on multi-process CPU (gloo) a collective's first use fails when its processes arrive
        more than 30 s apart, which a compile finishing earlier on one host would otherwise cause."""
        shapes = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        run = self._step_by_shape.get(shapes)
        if run is None:
            run = self.step_fn(batch)
            if hasattr(run, "lower"):   # jitted here (not lens-train compile's executable)
                run = run.lower(state, batch, self.frozen).compile()
            hosts.barrier("lens_jax.train.first_step " + " ".join(
                f"{k}={'x'.join(map(str, shape))}" for k, shape, _ in shapes))
            self._step_by_shape[shapes] = run
        return run(state, batch, self.frozen)

    def prepare_batch(self, host_batch: dict) -> dict:
        """Host work on a pipeline batch before ``put_batch``: the cached text features of
        ``text_encoder.cache_features`` (``encoders.caption_feature_cache``); else the batch as is."""
        return self.text_cache(host_batch) if self.text_cache is not None else host_batch

    def put_batch(self, host_batch: dict) -> dict:
        """Per-host numpy batch -> global arrays sharded over the batch axes.

        One call for the whole dict: on one process that is one batched transfer (~0.5 ms for the
        tiny config's 16 arrays against ~1.4 ms key by key, on the main thread of every step)."""
        return jax.make_array_from_process_local_data(
            self.batch_sharding, {k: np.asarray(v) for k, v in host_batch.items()})

