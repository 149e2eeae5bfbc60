"""What a user watches: metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow), and the
analytic model FLOPs / MFU of a step (formula in docs/training.md)."""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from lens_jax.models import config as config_lib
from lens_jax.train import hosts, rundir, topologies

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device (bf16 matmul, no sparsity). TPUs: by the exact ``device_kind`` of
# the generation table (lens_jax.train.topologies.GENERATIONS: "TPU v5" is a v5p, "TPU v5 lite" a
# v5e). GPUs: by substring of ``device_kind`` (lower case; first match wins). Override with
# config.logging.peak_flops_per_device.
GPU_PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l4", 121e12),
)


def device_peak_flops(device=None) -> float:
    """Peak FLOP/s of ``device`` (default: the first device); 0 when unknown (CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    generation = topologies.generation_of_device(kind)
    if generation is not None:
        return generation.peak_flops
    for name, peak in GPU_PEAK_FLOPS:
        if name in kind.lower():
            return peak
    return 0.0


class StepFlops:
    """Model FLOPs of a training step, counted analytically from the real (non-padding) tokens.

    Forward = 2 x multiply-adds of every matmul that touches a real token + attention
    (``4 D n_seg^2`` per layer and segment: QK^T and AV, n_seg = image + text tokens of the
    segment) + the per-segment timestep/modulation matmuls; training = 3 x forward
    (backward = 2 x forward). Rematerialisation and padding are not counted (model FLOPs).
    """

    def __init__(self, model: ml_collections.ConfigDict):
        d = config_lib.width(model)
        f = config_lib.mlp_hidden(model)
        layers = int(model.num_layers)
        block = 4 * d * d + 3 * d * f                      # qkv (3D^2) + out (D^2) + SwiGLU (3DF)
        self.per_image_token = 2 * (layers * block + 2 * model.in_channels * d)
        self.per_text_token = 2 * (layers * block + len(model.selected_layer_index) * model.enc_hidden_dim * d)
        self.per_segment = 2 * (layers * 12 * d * d + 2 * d * d + model.timestep_embed_dim * d + d * d)
        self.per_attention_pair = 4 * d * layers

    def forward_flops(self, image_tokens, text_tokens, segments, attention_pairs) -> float:
        return float(self.per_image_token * image_tokens + self.per_text_token * text_tokens
                     + self.per_segment * segments + self.per_attention_pair * attention_pairs)

    def train_flops(self, image_tokens, text_tokens, segments, attention_pairs) -> float:
        return 3.0 * self.forward_flops(image_tokens, text_tokens, segments, attention_pairs)

    @staticmethod
    def peak_per_device(override: float = 0.0) -> float:
        return float(override) if override and override > 0 else device_peak_flops()


def data_metrics_over_hosts(scalars: dict[str, float]) -> dict[str, float]:
    """The input pipeline's metrics (``LensDataIterator.metrics()``) of every host combined:
    counts (skips, segments, batches) summed; packing efficiencies averaged weighted by each host's
    batches (every host's batch has the same token budget). Every process calls it (a collective)."""
    names = sorted(scalars)
    table = hosts.gather(np.asarray([scalars[n] for n in names], np.float64))  # [P, metrics]
    batches = table[:, names.index("data/batches")] if "data/batches" in names else None
    out = {}
    for i, name in enumerate(names):
        column = table[:, i]
        if name.startswith("data/packing_efficiency/") and batches is not None:
            out[name] = float((column * batches).sum() / max(batches.sum(), 1.0))
        else:
            out[name] = float(column.sum())
    return out


class MetricWriter:
    """Scalars to ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard; images too.

    ``workdir`` is a local folder or ``gs://``. GCS objects cannot be appended to, so on GCS both
    files live in a local mirror (``lens_jax.storage.Mirror``) and are uploaded whole at most every
    ``upload_every_s`` seconds, on ``flush()`` (the trainer calls it with every checkpoint, so the
    rows of every step a resume will not redo are stored) and on ``close``; an existing
    ``metrics.jsonl`` is first copied down and continued. TensorBoard events go to a new event
    file (a new object) once the current one passes ``TB_ROLL_BYTES``, so no upload rewrites more
    than that. Local folders are written in place.
    """

    TB_ROLL_BYTES = 8 << 20

    def __init__(self, workdir: str | os.PathLike, cfg: ml_collections.ConfigDict, enabled: bool = True,
                 upload_every_s: float = 30.0):
        from lens_jax import storage

        self.enabled = enabled
        self.workdir = storage.path(workdir)
        self.jsonl = self.tb = self.mirror = None
        if not enabled:
            return
        self.mirror = storage.Mirror(self.workdir, min_interval_s=upload_every_s)
        self.jsonl = open(self.mirror.pull(rundir.METRICS), "a")
        self._tb_class = None
        if cfg.tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb_class = SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard event files "
                            "(pip install tensorboardX)")
        self._tb_files = 0
        self._open_tb()

    def _open_tb(self) -> None:
        if self._tb_class is not None:
            self._tb_suffix = f".{os.getpid()}.{self._tb_files}"
            self.tb = self._tb_class(str(self.mirror.local / rundir.TENSORBOARD), filename_suffix=self._tb_suffix)
            self._tb_files += 1

    def flush(self) -> None:
        """Uploads what changed now (GCS); nothing to do for a local workdir."""
        if self.enabled:
            self._flush(force=True)

    def _flush(self, force: bool = False) -> None:
        if self.tb is not None:
            self.tb.flush()
            if self.mirror.is_remote:  # a full event file becomes a final object; a new one follows
                current = [f for f in (self.mirror.local / rundir.TENSORBOARD).iterdir()
                           if f.name.endswith(self._tb_suffix)]
                if current and current[0].stat().st_size > self.TB_ROLL_BYTES:
                    self.tb.close()
                    self.mirror.forget(f"{rundir.TENSORBOARD}/{current[0].name}")
                    self._open_tb()
        self.mirror.sync(force=force)

    def write_scalars(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: float(v) for k, v in scalars.items()})
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k if "/" in k else f"train/{k}", float(v), int(step))
        self._flush()

    def write_image(self, step: int, name: str, image: np.ndarray, png_path: str | os.PathLike | None = None) -> None:
        """``image`` uint8 ``[H, W, 3]``; also written as a PNG at ``png_path`` (local or ``gs://``)."""
        if not self.enabled:
            return
        if png_path is not None:
            import io

            from PIL import Image

            from lens_jax import storage

            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            storage.write_bytes(png_path, buf.getvalue())
        if self.tb is not None:
            self.tb.add_image(name, image, int(step), dataformats="HWC")
        self._flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.mirror is not None:
            self.mirror.close()
