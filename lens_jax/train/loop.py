"""The training loop of ``lens-train``: restore or init, then steps until ``config.num_steps``.

The device never waits for the host:
- the next batch is read, VAE-encoded (``image_encoder.kind="vae"``) and given its cached text
  features (``text_encoder.cache_features``) by a background thread (``BatchFeed``) while the
  current step runs, and put on the devices (asynchronously) by the main thread right before its
  step is dispatched: every program that spans several processes is launched from one thread, in
  the same order on every process (the VAE and the cached text encoder run on this host's devices
  only);
- a step's metrics stay on the device until the next step has been dispatched; only then is its
  loss fetched (the non-finite check) and, at logging steps, the rest of its metrics;
- that the devices never waited is measured: ``data/device_waited_steps`` counts the steps
  dispatched after the previous step had already finished (summed over hosts; 0 when the host
  always kept the next step queued);
- the host waits for a step only before saving it or sampling from it.

Each step starts with one agreement over processes (``hosts.agree_any``): stop when any process got
SIGTERM (every process saves the same step, exit 0) or when any host's data ran out (every process
stops at the same step and saves it). A non-finite loss stops every process at the same step
without saving (the loss is one replicated value). Checkpoint restore: ``lens_jax.train.checkpoint``;
the files of the run directory: ``lens_jax.train.rundir``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import ml_collections

from lens_jax.errors import NonFiniteLossError
from lens_jax.train import hosts, rundir
from lens_jax.train import mesh as mesh_lib
from lens_jax.lora.trainer import make_trainer

log = logging.getLogger(__name__)


class FeedItem(NamedTuple):
    batch: dict                # this host's numpy batch (VAE latents in place of pixels)
    data_state: dict           # the data iterator's state after this batch
    data_metrics: dict         # the pipeline's metrics after this batch (this host)


class BatchFeed:
    """Reads and prepares batches ``depth`` steps ahead in a background thread.

    ``next()`` returns a ``FeedItem``, or ``None`` when this host's data ran out; an exception in
    the thread is raised there. ``prepare`` is host work on the pipeline's numpy batch (the VAE).
    ``nice`` (Linux) lowers the thread's scheduling priority by that much, and that of the threads
    it starts (grain's read threads): on a host whose cores also run the step (XLA:CPU) the input
    pipeline then takes the cores' idle time first (``data.feed_nice``, docs/benchmarks.md).
    """

    _END = object()

    def __init__(self, data_iter: Iterator, prepare: Callable[[dict], dict], depth: int = 2,
                 nice: int = 0):
        self._iter = data_iter
        self._prepare = prepare
        self._nice = int(nice)
        self._queue: queue.Queue = queue.Queue(maxsize=max(int(depth), 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lens-batch-feed", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        if self._nice > 0 and sys.platform.startswith("linux"):  # elsewhere it would be the process's
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
            except OSError as e:
                log.warning("data.feed_nice=%d: could not lower the batch feed's priority: %s",
                            self._nice, e)
        try:
            while not self._stop.is_set():
                try:
                    batch = next(self._iter)
                except StopIteration:
                    self._put(self._END)
                    return
                item = FeedItem(self._prepare(batch), self._iter.get_state(), self._iter.metrics())
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)

    def next(self) -> FeedItem | None:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # stays at the end
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


class _Pending(NamedTuple):
    step: int
    metrics: dict              # on the devices
    data_metrics: dict
    device_waited: int         # steps this process dispatched after the previous one had finished


def _data_config(config, mesh):
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.data_axes = mesh_lib.batch_axes(mesh)
    return data


def _restore_or_init(config, workdir, trainer, ckpt, data_iter) -> tuple[dict, int]:
    changes = rundir.config_changes(rundir.read_config(workdir), config)
    context = ("\nConfig fields changed since the run started (" + str(workdir / rundir.CONFIG)
               + "):\n  " + "\n  ".join(changes)) if changes else ""
    restored = ckpt.restore(trainer.abstract_state(),
                            data_iter if config.checkpoint.save_data_state else None, context)
    if restored is None:
        log.info("fresh start (%s)", f"weights from {config.init_from}" if config.init_from
                 else "random init")
        state, start = trainer.init_state(), 0
    else:
        state, start = restored
        log.info("resumed from step %d", start)
    if hosts.is_primary():
        rundir.record_config(workdir, config, start, changes)
        rundir.truncate_metrics(workdir, start)
    return state, start


@contextlib.contextmanager
def _one_writer(workdir) -> Iterator[None]:
    """Holds the run directory's lock (``lens_jax.train.workdir_lock``) while the run writes to it.

    Process 0 takes it for the whole job; every process learns whether it got it, so a refused
    job stops on all hosts at once."""
    from lens_jax.train import workdir_lock

    lock, refused = None, None
    if hosts.is_primary():
        try:
            lock = workdir_lock.acquire(workdir, "lens-train")
        except workdir_lock.WorkdirLocked as e:
            refused = e
    if hosts.agree_any(refused=refused is not None)["refused"]:
        raise refused or workdir_lock.WorkdirLocked(f"{workdir} is in use by another run "
                                                    "(process 0 could not lock it)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) training in ``workdir`` until ``config.num_steps``; returns the final state.

    Refused at once (``WorkdirLocked``) while another live process trains or exports in ``workdir``."""
    mesh_lib.maybe_initialize_distributed(config)
    workdir = rundir.prepare(workdir)
    with _one_writer(workdir):
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir) -> dict:
    from lens_jax.data.pipeline import make_pipeline
    from lens_jax.train.checkpoint import Checkpointer, DataState
    from lens_jax.train.vae_encoding import VAEEncoder
    from lens_jax.train.metrics import MetricWriter, StepFlops, data_metrics_over_hosts

    primary = hosts.is_primary()
    mesh = mesh_lib.make_mesh(config.mesh)
    trainer = make_trainer(config, mesh)
    log.info("mesh %s; %d devices; process %d/%d", dict(mesh.shape), mesh.size, jax.process_index(),
             jax.process_count())
    if config.get("compiled_step_path"):  # lens-train compile --save-executable, checked first
        trainer.load_compiled_step(config.compiled_step_path)
        log.info("the step is the executable in %s", config.compiled_step_path)
    if not config.data.path:
        raise ValueError("config.data.path is empty: give the training records with "
                         "--config.data.path=DIR (e.g. the output of lens-data synth-shapes)")
    data_iter = make_pipeline(_data_config(config, mesh), mesh=None)  # this host's numpy batches
    vae_encoder = VAEEncoder(config) if config.image_encoder.kind == "vae" else None
    ckpt = Checkpointer(rundir.checkpoints(workdir), config.checkpoint)
    num_steps = int(config.num_steps)
    try:
        state, start = _restore_or_init(config, workdir, trainer, ckpt, data_iter)
    except BaseException:
        ckpt.close()
        data_iter.close()
        raise
    if start >= num_steps:
        log.warning("the run in %s is already at step %d (config.num_steps=%d): nothing to do; "
                    "raise --config.num_steps to train further", workdir, start, num_steps)

    def prepare(batch: dict) -> dict:
        batch = vae_encoder(batch) if vae_encoder is not None else batch
        return trainer.prepare_batch(batch)   # text_encoder.cache_features

    writer = MetricWriter(workdir, config.logging, enabled=primary)
    flops = StepFlops(config.model)
    peak = flops.peak_per_device(config.logging.peak_flops_per_device)
    log_every = max(int(config.logging.every), 1)
    save_every = max(int(config.checkpoint.every), 1)
    save_data = bool(config.checkpoint.save_data_state)
    progress = None
    if primary and config.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    sampler = None
    if config.samples.every > 0:
        from lens_jax.train.samples import SampleGrid

        sampler = SampleGrid(config, trainer)

    # Throughput: wall time per step averaged since the last log (data loading included).
    window = {"time": time.perf_counter(), "steps": 0}

    def report(p: _Pending) -> None:
        """Fetches a step's loss (checks it) and, at logging steps, its metrics."""
        loss = float(p.metrics["loss"])  # the step has finished (the next one is already queued)
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss} at step {p.step}: stopping; the last good checkpoint "
                f"(step {ckpt.latest_step()}) is left in place")
        if not (p.step % log_every == 0 or p.step == num_steps):
            return
        host = jax.device_get(p.metrics)
        elapsed = (time.perf_counter() - window["time"]) / max(window["steps"], 1)
        step_flops = flops.train_flops(host["image_tokens"], host["text_tokens"], host["images"],
                                       host["attention_pairs"])
        scalars = {"loss": loss, "grad_norm": float(host["grad_norm"]), "lr": float(host["lr"]),
                   "step_time_s": elapsed, "images_per_s": float(host["images"]) / elapsed,
                   "tokens_per_s": float(host["image_tokens"] + host["text_tokens"]) / elapsed,
                   "tflops_per_device": step_flops / elapsed / mesh.size / 1e12}
        if peak:
            scalars["mfu"] = step_flops / elapsed / mesh.size / peak
        edges = (0.0,) + tuple(config.objective.sigma_buckets) + (1.0,)
        for i in range(len(edges) - 1):
            if host["bucket_images"][i] > 0:
                scalars[f"loss_sigma/{edges[i]:.2f}-{edges[i + 1]:.2f}"] = float(host["bucket_loss"][i])
        scalars.update(data_metrics_over_hosts({**p.data_metrics,
                                                "data/device_waited_steps": p.device_waited}))
        log.info("step %d loss %.8g", p.step, loss)  # on every process
        writer.write_scalars(p.step, scalars)
        window.update(time=time.perf_counter(), steps=0)
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{scalars['lr']:.2e}", refresh=False)

    step = start
    data_state: dict[str, Any] | None = None   # after the last batch a step used
    pending: _Pending | None = None
    device_waited = 0
    feed = (BatchFeed(data_iter, prepare, nice=int(config.data.feed_nice))
            if start < num_steps else None)
    try:
        with hosts.Preemption() as preempt:
            while step < num_steps:
                item = feed.next()
                stop = hosts.agree_any(out_of_data=item is None, sigterm=preempt.requested)
                if stop["sigterm"] or stop["out_of_data"]:
                    if pending is not None:
                        report(pending)
                        pending = None
                    why = ("SIGTERM" if stop["sigterm"] else
                           "a host's data ran out (config.data.num_epochs)")
                    if step > start and ckpt.latest_step() != step:
                        ckpt.save(step, state, DataState(data_state) if save_data else None, force=True)
                        ckpt.wait()
                    log.warning("stopping at step %d (%s); saved step %s", step, why, ckpt.latest_step())
                    break
                batch = trainer.put_batch(item.batch)
                # The devices waited for this host when the previous step is done before this one
                # is dispatched (not counted after a save or a sample grid, which wait on purpose).
                device_waited += pending is not None and pending.metrics["loss"].is_ready()
                state, metrics = trainer.step(state, batch)  # asynchronous
                step += 1
                window["steps"] += 1
                data_state = item.data_state
                if pending is not None:
                    report(pending)   # the previous step: finished or about to
                pending = _Pending(step, metrics, item.data_metrics, device_waited)
                if progress is not None:
                    progress.update(1)
                sample_now = sampler is not None and step % int(config.samples.every) == 0
                if sample_now or step % save_every == 0 or step == num_steps:
                    report(pending)   # never save or sample a non-finite state
                    pending = None
                if sample_now:
                    writer.write_image(step, "samples", sampler(state), rundir.sample_path(workdir, step))
                if step % save_every == 0 or step == num_steps:
                    ckpt.save(step, state, DataState(data_state) if save_data else None)
                    writer.flush()  # gs://: the metrics rows of every saved step are stored
            if pending is not None:
                report(pending)
    finally:
        if feed is not None:
            feed.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
        if progress is not None:
            progress.close()
        data_iter.close()
        if trainer.text_cache is not None:
            log.info("text feature cache: %s", trainer.text_cache.summary())
    return state
