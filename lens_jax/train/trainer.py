"""The training loop: sharded state, jitted step, checkpoints, metrics, preemption, NaN guard.

State (a plain pytree, checkpointed as one orbax item): ``step`` (int32, optimizer steps done),
``params`` (float32 master weights, nested dict as ``nnx.to_pure_dict``), ``opt_state`` (optax),
``ema`` (float32), ``rng`` (uint32[2] base key; the key of step t is ``fold_in(rng, t)``, so the
randomness of a step does not depend on how the run got there). The data iterator's state is saved
beside it (grain), so a resumed run sees the same batches and the same noise as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from lens_jax import storage
from lens_jax.models.transformer import LensTransformer, abstract_model
from lens_jax.sharding import use_rules
from lens_jax.train import mesh as mesh_lib
from lens_jax.train import objective, optim

log = logging.getLogger(__name__)


EAGER_INIT_MAX_PARAMS = 50_000_000  # larger models are initialised by a jitted, sharded init


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stopped without saving."""


# ----------------------------------------------------------------------------- frozen encoders

def text_preamble(config: ml_collections.ConfigDict) -> int:
    """Leading caption ids the denoiser does not see (from the data tokenizer)."""
    from lens_jax.data.tokenize import load_caption_tokenizer

    return int(load_caption_tokenizer(config.data.tokenizer, config.data.template_date,
                                      config.data.caption_length).preamble_length)


def build_frozen(config: ml_collections.ConfigDict) -> dict:
    """Arrays of the frozen encoders used inside the step (replicated)."""
    frozen: dict[str, Any] = {"nan_at_step": jnp.asarray(int(config.debug.nan_at_step), jnp.int32)}
    ie, te, m = config.image_encoder, config.text_encoder, config.model
    if ie.kind == "dct":
        frozen["dct"] = jnp.asarray(objective.dct_basis(m.in_channels))
    elif ie.kind != "vae":
        raise ValueError(f"config.image_encoder.kind={ie.kind!r}: expected dct|vae")
    if te.kind == "embedding":
        key = jax.random.PRNGKey(int(te.seed))
        shape = (len(m.selected_layer_index), int(te.vocab_size), int(m.enc_hidden_dim))
        frozen["text_tables"] = float(te.std) * jax.random.normal(key, shape, jnp.float32)
    elif te.kind == "gpt_oss":
        frozen["text_params"] = _text_encoder(config).params()
    else:
        raise ValueError(f"config.text_encoder.kind={te.kind!r}: expected embedding|gpt_oss")
    return frozen


@functools.lru_cache(maxsize=4)
def _load_text_encoder(path: str, layers: tuple, hidden: int, seed: int):
    from lens_jax.models.text_encoder import GptOssConfig, TextEncoder

    if path == "random":  # tiny random GPT-OSS (tests / demos)
        n = max(layers) + 1
        cfg = GptOssConfig(vocab_size=512, hidden_size=hidden, num_hidden_layers=n, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, intermediate_size=hidden,
                           num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                           layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                             for i in range(n)))
        return TextEncoder.random(cfg, layers=layers, seed=seed)
    from lens_jax.convert.text_encoder import load_text_encoder

    return load_text_encoder(path, layers=layers)


def _text_encoder(config):
    te, m = config.text_encoder, config.model
    if not te.path:
        raise ValueError("config.text_encoder.kind='gpt_oss' needs config.text_encoder.path "
                         "(a GPT-OSS folder, or 'random')")
    return _load_text_encoder(te.path, tuple(m.selected_layer_index), int(m.enc_hidden_dim), int(te.seed))


def encode_inputs(config: ml_collections.ConfigDict, frozen: dict, batch: dict, preamble: int
                  ) -> tuple[jax.Array, list[jax.Array]]:
    """Latent tokens ``[B, N_img, 128]`` and packed text features of a batch (inside jit)."""
    ie, te = config.image_encoder, config.text_encoder
    if ie.kind == "dct":
        latents = objective.patches_to_latents(batch["image_patches"], frozen["dct"], float(ie.scale))
    else:
        latents = batch["latents"]
    if te.kind == "embedding":
        ids = objective.denoiser_text_ids(batch["caption_ids"], batch["text_index"], preamble)
        feats = objective.embedding_features(frozen["text_tables"], ids, batch["text_segment_ids"])
    else:
        from lens_jax.models.text_encoder import encode

        enc = _text_encoder(config)
        b, k, length = batch["caption_ids"].shape
        out = encode(frozen["text_params"], batch["caption_ids"].reshape(b * k, length),
                     batch["caption_mask"].reshape(b * k, length), config=enc.config,
                     selected=enc.selected, moe_impl=enc.moe_impl)
        out = [jax.lax.stop_gradient(o.astype(jnp.float32)) for o in out]
        feats = objective.gather_text_features(out, batch["text_index"], batch["text_segment_ids"],
                                               preamble, k)
    return latents, feats


class VAEBatchEncoder:
    """Host side: reassembles every image of a packed host batch, VAE-encodes images of the same
    size together (one jitted program per bucket shape) and puts the normalized 128-channel tokens
    back at the image's token slots: adds ``latents [B, N_img, 128]``, drops ``image_patches``.

    ``config.image_encoder.path``: a diffusers VAE folder (``load_vae``) or ``"random"`` (a tiny
    random VAE, for tests). Runs on this host's default device."""

    def __init__(self, config: ml_collections.ConfigDict):
        path = config.image_encoder.path
        if not path:
            raise ValueError("config.image_encoder.kind='vae' needs config.image_encoder.path "
                             "(a VAE folder, or 'random')")
        if path == "random":
            from lens_jax.convert.vae import random_vae
            from lens_jax.models.vae import VAEConfig

            self.vae = random_vae(VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                                            layers_per_block=1), seed=int(config.seed))
        else:
            from lens_jax.convert.vae import load_vae

            self.vae = load_vae(path)
        self.channels = int(config.model.in_channels)

    def __call__(self, batch: dict) -> dict:
        from lens_jax.data.buckets import unpatchify_image

        patches = np.asarray(batch["image_patches"])
        valid, hw, offset = (np.asarray(batch[k]) for k in ("segment_valid", "latent_hw", "token_offset"))
        b, n = patches.shape[:2]
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for r, s in zip(*np.nonzero(valid)):
            groups.setdefault((int(hw[r, s, 0]), int(hw[r, s, 1])), []).append((int(r), int(s)))
        latents = np.zeros((b, n, self.channels), np.float32)
        for (h, w), slots in sorted(groups.items()):
            images = np.stack([unpatchify_image(patches[r, offset[r, s]:offset[r, s] + h * w], h, w)
                               for r, s in slots]).astype(np.float32)
            tokens = np.asarray(self.vae.image_to_latents(images), np.float32)  # [n, h*w, 128]
            for (r, s), t in zip(slots, tokens):
                latents[r, offset[r, s]:offset[r, s] + h * w] = t
        out = {k: v for k, v in batch.items() if k != "image_patches"}
        out["latents"] = latents
        return out


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
        self.param_shardings = mesh_lib.param_shardings(self.logical_specs, self.abstract_params,
                                                        self.mesh, self.rules)
        self.tx, self.schedule = optim.make_optimizer(config.optimizer, int(config.num_steps))
        self.use_ema = float(config.ema.decay) > 0
        self.replicated = mesh_lib.replicated(self.mesh)
        self.batch_sharding = mesh_lib.data_sharding(self.mesh)
        self.preamble = text_preamble(config) if with_encoders else 0
        self.frozen = jax.device_put(build_frozen(config), self.replicated) if with_encoders else {}
        self.state_shardings = self._state_shardings()
        self._step_fn = None

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
        from lens_jax.convert.transformer import load_transformer, model_params
        from lens_jax.convert import keymap
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

    def train_step(self, state: dict, batch: dict, frozen: dict) -> tuple[dict, dict]:
        """One optimizer step (with ``grad_accum_steps`` micro-batches); pure, jit it."""
        c = self.config
        o = c.objective
        accum = int(c.grad_accum_steps)
        key = jax.random.fold_in(state["rng"], state["step"])
        params = state["params"]

        def micro(mb, k):
            def loss_of(p):
                latents, feats = encode_inputs(c, frozen, mb, self.preamble)
                return objective.packed_loss(
                    self.apply_fn, p, mb, jax.lax.stop_gradient(latents), feats, k,
                    sigma_loc=tuple(o.sigma_loc), sigma_tokens=tuple(o.sigma_tokens),
                    sigma_scale=float(o.sigma_scale), sigma_source=o.sigma_source,
                    sigma_buckets=tuple(o.sigma_buckets))
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
        if "nan_at_step" in frozen:  # test hook (a run-time value: the same compiled step for any step)
            bad = state["step"] + 1 == frozen["nan_at_step"]
            loss = jnp.where(bad, jnp.nan, loss)
            grads = jax.tree.map(lambda g: jnp.where(bad, jnp.nan, g), grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state,
                     "ema": state["ema"], "rng": state["rng"]}
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

    def step_fn(self, batch_example: dict) -> Callable:
        """The jitted step with explicit input/output shardings (state donated)."""
        if self._step_fn is None:
            def step(state, batch, frozen):
                with use_rules(self.mesh, self.rules):
                    return self.train_step(state, batch, frozen)

            frozen_sh = jax.tree.map(lambda _: self.replicated, self.frozen)
            self._step_fn = jax.jit(
                step, in_shardings=(self.state_shardings, self.batch_shardings(batch_example), frozen_sh),
                out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
        return self._step_fn

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        return self.step_fn(batch)(state, batch, self.frozen)

    def put_batch(self, host_batch: dict) -> dict:
        """Per-host numpy batch -> global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in host_batch.items()}


# ----------------------------------------------------------------------------- the loop

class _Preemption:
    """SIGTERM -> flag (the loop saves at the current step and exits cleanly)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the current step, then exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _data_config(config, mesh):
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.data_axes = mesh_lib.batch_axes(mesh)
    return data


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops metrics lines of steps after ``last_step`` (logged before a crash, about to be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError):
            continue
    storage.write_text(path, "".join(l + "\n" for l in keep))


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) training in ``workdir`` until ``config.num_steps``; returns the final state."""
    from lens_jax.data.pipeline import make_pipeline
    from lens_jax.train.checkpoint import Checkpointer
    from lens_jax.train.metrics import MetricWriter, StepFlops

    mesh_lib.maybe_initialize_distributed(config)
    workdir = storage.makedirs(workdir)  # local or gs://
    primary = jax.process_index() == 0
    mesh = mesh_lib.make_mesh(config.mesh)
    trainer = Trainer(config, mesh)
    if primary:
        storage.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    log.info("mesh %s; %d devices; process %d/%d", dict(mesh.shape), mesh.size, jax.process_index(),
             jax.process_count())

    # Per-host numpy batches; frozen host-side encoders (the VAE) run here, then global arrays.
    if not config.data.path:
        raise ValueError("config.data.path is empty: give the training records with "
                         "--config.data.path=DIR (e.g. the output of lens-data synth-shapes)")
    data_iter = make_pipeline(_data_config(config, mesh), mesh=None)
    vae_encoder = VAEBatchEncoder(config) if config.image_encoder.kind == "vae" else None
    ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint)
    restored = ckpt.restore(trainer.abstract_state(), data_iter if config.checkpoint.save_data_state else None)
    if restored is None:
        state = trainer.init_state()
        start = 0
        log.info("fresh start (%s)", f"weights from {config.init_from}" if config.init_from else "random init")
    else:
        state, start = restored
        log.info("resumed from step %d", start)
    metrics_path = workdir / "metrics.jsonl"
    if primary:
        _truncate_metrics(metrics_path, start)
    writer = MetricWriter(workdir, config.logging, enabled=primary)
    flops = StepFlops(config.model)
    peak = flops.peak_per_device(config.logging.peak_flops_per_device)
    num_steps = int(config.num_steps)
    log_every = max(int(config.logging.every), 1)
    nan_every = max(int(config.logging.nan_check_every), 1)
    progress = None
    if primary and config.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    sampler = None
    if config.samples.every > 0:
        from lens_jax.train.samples import SampleGrid

        sampler = SampleGrid(config, trainer)

    # Throughput figures: wall time per step averaged since the last log (data loading included),
    # images/tokens/FLOPs of the logged step.
    window = {"time": time.perf_counter(), "steps": 0}
    step = start
    try:
        with _Preemption() as preempt:
            while step < num_steps:
                try:
                    batch = next(data_iter)
                except StopIteration:
                    log.warning("the data ran out at step %d (config.data.num_epochs)", step)
                    if step > start and ckpt.latest_step() != step:
                        ckpt.save(step, state, data_iter)
                    break
                if vae_encoder is not None:
                    batch = vae_encoder(batch)
                state, m = trainer.step(state, trainer.put_batch(batch))
                step += 1
                window["steps"] += 1
                if (step % nan_every == 0 or step % log_every == 0 or step == num_steps
                        or step % int(config.checkpoint.every) == 0 or preempt.requested):
                    loss = float(m["loss"])
                    if not math.isfinite(loss):
                        raise NonFiniteLossError(
                            f"loss is {loss} at step {step}: stopping; the last good checkpoint "
                            f"(step {ckpt.latest_step()}) is left in place")
                if step % log_every == 0 or step == num_steps or preempt.requested:
                    host = jax.device_get(m)
                    now = time.perf_counter()
                    elapsed = now - window["time"]
                    n = window["steps"]
                    step_flops = flops.train_flops(host["image_tokens"], host["text_tokens"],
                                                   host["images"], host["attention_pairs"])
                    scalars = {"loss": float(host["loss"]), "grad_norm": float(host["grad_norm"]),
                               "lr": float(host["lr"]), "step_time_s": elapsed / n,
                               "images_per_s": float(host["images"]) / (elapsed / n),
                               "tokens_per_s": float(host["image_tokens"] + host["text_tokens"]) / (elapsed / n),
                               "tflops_per_device": step_flops / (elapsed / n) / mesh.size / 1e12}
                    if peak:
                        scalars["mfu"] = step_flops / (elapsed / n) / mesh.size / peak
                    edges = (0.0,) + tuple(config.objective.sigma_buckets) + (1.0,)
                    for i in range(len(edges) - 1):
                        if host["bucket_images"][i] > 0:
                            scalars[f"loss_sigma/{edges[i]:.2f}-{edges[i + 1]:.2f}"] = float(host["bucket_loss"][i])
                    scalars.update(data_iter.metrics())
                    writer.write_scalars(step, scalars)
                    window.update(time=time.perf_counter(), steps=0)
                    if progress is not None:
                        progress.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}",
                                             refresh=False)
                if progress is not None:
                    progress.update(1)
                if sampler is not None and step % int(config.samples.every) == 0:
                    writer.write_image(step, "samples", sampler(state), workdir / "samples" / f"step_{step:08d}.png")
                if preempt.requested:
                    ckpt.save(step, state, data_iter, force=True)
                    ckpt.wait()
                    log.warning("saved step %d after SIGTERM; exiting", step)
                    break
                if step % int(config.checkpoint.every) == 0 or step == num_steps:
                    ckpt.save(step, state, data_iter)
                    writer.flush()  # gs://: the metrics of every saved step are stored
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
        if progress is not None:
            progress.close()
        data_iter.close()
    return state
