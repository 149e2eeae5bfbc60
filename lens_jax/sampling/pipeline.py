"""``LensPipeline``: prompts -> images with the Lens checkpoints, in JAX (spec section 2).

    pipe = LensPipeline.from_pretrained("path/to/Lens")          # or a hub id, or a random checkpoint
    out = pipe(["a red cube on a table"], height=1024, width=1024, seed=0)
    out.images[0].save("cube.png"); out.latents  # [B, h*w, 128] float32

Stages: prompt encoding (GPT-OSS, spec 2.1), the denoising loop (one jitted ``fori_loop``, the
batch sharded over all local devices, spec 2.3-2.5) and VAE decoding (spec 2.6). Each image's
starting noise depends only on ``(seed, index)`` where ``index`` is its position in the call plus
``first_index``, so splitting a job into batches does not change any image.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lens_jax.checkpoints.safetensors_io import read_json
from lens_jax.errors import CheckpointError
from lens_jax.models.transformer import abstract_model
from lens_jax.sampling import denoise as denoise_lib
from lens_jax.sampling import guidance
from lens_jax.sampling import placement as placement_lib
from lens_jax.sampling.resolution import check_resolution
from lens_jax.sampling.scheduler import SchedulerConfig, sigmas_for

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_CACHE_DIR = Path("~/.cache/lens_jax/jax_cache")
CACHE_ENV = "LENS_JAX_COMPILATION_CACHE"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Recommended sampler settings of one Lens variant (spec 2.7)."""

    name: str
    num_inference_steps: int
    guidance_scale: float
    description: str


PRESETS = {
    "lens": Preset("lens", 20, 5.0, "microsoft/Lens (RL-tuned, default)"),
    "lens-turbo": Preset("lens-turbo", 4, 1.0, "microsoft/Lens-Turbo (4-step distilled, no CFG)"),
    "lens-base": Preset("lens-base", 50, 5.0, "microsoft/Lens-Base (supervised; CFG 5 unconfirmed)"),
}


def preset_for(name_or_path: str | os.PathLike | None) -> str:
    """The preset a checkpoint name suggests: ``...turbo...`` -> lens-turbo, ``...base...`` ->
    lens-base, otherwise lens."""
    name = Path(str(name_or_path or "")).name.lower()
    if "turbo" in name:
        return "lens-turbo"
    if "base" in name:
        return "lens-base"
    return "lens"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------- compilation cache

def enable_compilation_cache(cache_dir: str | os.PathLike | bool | None = True) -> Path | None:
    """Turns on jax's persistent compilation cache so a later run of the same shapes does not
    recompile. ``True``: ``$LENS_JAX_COMPILATION_CACHE`` or ``~/.cache/lens_jax/jax_cache``; a path:
    that folder; ``False``/``None``/``""`` (or the env var set to ``0``/``off``): leave it off.
    Returns the folder in use."""
    if cache_dir is True:
        env = os.environ.get(CACHE_ENV)
        if env is not None and env.strip().lower() in ("", "0", "off", "false", "none"):
            return None
        cache_dir = env or DEFAULT_CACHE_DIR
    if not cache_dir:
        return None
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        # Cache every executable (the default skips those compiling in under a second).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# ----------------------------------------------------------------------------- checkpoint folders

def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint folder; a Hugging Face hub id (``org/name``) that is not a local folder is
    downloaded with ``huggingface_hub.snapshot_download`` (needs the package and network)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder (expected a Lens checkpoint folder)")
        return path
    text = str(path_or_id)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:
            raise CheckpointError(f"{text}: no such folder, and huggingface_hub is not installed to "
                                  "download it as a hub id (pip install huggingface_hub)") from e
        try:
            return Path(snapshot_download(text, allow_patterns=[
                "model_index.json", "*/*.json", "*/*.safetensors", "*/*.jinja", "*/*.txt"]))
        except Exception as e:  # network, auth or missing repo: report, do not guess
            raise CheckpointError(f"{text}: not a local folder and the hub download failed: {e}") from e
    raise CheckpointError(f"{path}: no such checkpoint folder")


def _component_folder(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise CheckpointError(f"{root}: missing the {name}/ folder of a Lens checkpoint (expected "
                              f"{', '.join(c + '/' for c in COMPONENTS)} and model_index.json)")
    return folder


def date_string(date: str | datetime.date | None) -> str:
    """The ``YYYY-MM-DD`` rendered into the prompt template (``None``: today's local date).

    A string must be a real calendar date written ``YYYY-MM-DD`` (``ValueError`` otherwise):
    the date changes the text features, so a typo must not silently change the images.
    """
    from lens_jax.text import today
    if date is None:
        return today()
    if isinstance(date, datetime.date):
        return date.isoformat()
    text = str(date)
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError
        datetime.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"date {text!r}: expected a calendar date as YYYY-MM-DD, e.g. "
                         f"{today()}") from None
    return text


def default_dtype() -> str:
    """bfloat16 on GPU/TPU, float32 on CPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def local_devices(devices: int | Sequence | None) -> list:
    """``devices`` of ``LensPipeline``: None (all local devices), a count (the first N) or a list."""
    if devices is None:
        return list(jax.local_devices())
    if isinstance(devices, int):
        if not 1 <= devices <= jax.local_device_count():
            raise ValueError(f"devices={devices}: {jax.local_device_count()} local devices")
        return list(jax.local_devices()[:devices])
    return list(devices)


# ----------------------------------------------------------------------------- outputs

@dataclasses.dataclass
class LensOutput:
    """What a pipeline call returns."""

    images: list                      # PIL images (or float arrays [H, W, 3] in [0, 1] for "np")
    latents: np.ndarray               # [B, h*w, 128] float32, the final denoised latents
    settings: list[dict]              # per image: everything needed to reproduce it
    timings: dict                     # seconds: text_encoding, denoising, decoding (incl. compile)


# ----------------------------------------------------------------------------- the pipeline

class LensPipeline:
    """Lens text-to-image sampling: tokenizer + GPT-OSS encoder + denoiser + VAE + scheduler."""

    def __init__(self, transformer, vae, text_encoder, tokenizer,
                 scheduler_config: SchedulerConfig = SchedulerConfig(), *, preset: str = "lens",
                 devices: int | Sequence | None = None, bf16_timesteps: bool = False,
                 source: str | None = None, placement: "str | placement_lib.Placement" = "auto"):
        """``devices``: how many (or which) local devices shard the batch (default: all local).
        ``bf16_timesteps``: round the model time input like the bf16 reference (spec 2.4).
        ``placement``: where the networks' weights live, ``auto`` | ``first_chip`` | ``sharded``
        (``lens_jax.sampling.placement``; auto: sharded over the chips when one chip's memory
        cannot hold them)."""
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.preset = get_preset(preset)
        self.bf16_timesteps = bool(bf16_timesteps)
        self.source = source
        # Templated prompt lengths are padded to a multiple of this (1: pad to the longest only).
        self.text_length_multiple = 64
        self.devices = local_devices(devices)
        if not isinstance(placement, placement_lib.Placement):
            weights = sum(placement_lib.tree_bytes(tree) for tree in (
                nnx.state(transformer), nnx.state(vae.model), text_encoder.params()))
            placement = placement_lib.host_placement(placement, self.devices, weights)
        self.placement = placement
        self.mesh = placement.mesh
        if self.mesh is not None:
            placement.place_denoiser(self.transformer)
        if placement.sharded:
            placement.place_text_encoder(self.text_encoder)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, preset: str | None = None,
                        dtype: str | None = None, transformer_path: str | os.PathLike | None = None,
                        mxfp4: bool = True, devices: int | Sequence | None = None,
                        bf16_timesteps: bool = False,
                        compilation_cache: str | os.PathLike | bool | None = True,
                        progress: bool = False, placement: str = "auto") -> "LensPipeline":
        """Loads a Lens checkpoint folder in the Hugging Face layout (``model_index.json``,
        ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or a hub id.

        ``preset``: lens | lens-turbo | lens-base (default: guessed from the folder name).
        ``dtype``: compute and parameter dtype of all three networks (default: bfloat16 on
        GPU/TPU, float32 on CPU). ``transformer_path``: load the denoiser from elsewhere, e.g. an
        orbax checkpoint written by ``lens-convert to-orbax`` (``transformer/`` may also hold one).
        ``mxfp4``: keep the text encoder's experts MXFP4-packed. ``compilation_cache``: see
        ``enable_compilation_cache`` (on by default). ``placement``: auto | first_chip | sharded
        (see ``__init__``); sharded weights are placed as they are read, so they never gather on
        one chip.
        """
        from lens_jax.checkpoints import text_encoder as text_encoder_io
        from lens_jax.checkpoints import transformer as transformer_io
        from lens_jax.checkpoints.vae import load_vae
        from lens_jax.text import PromptTokenizer

        enable_compilation_cache(compilation_cache)
        root = resolve_checkpoint(path)
        index_path = root / "model_index.json"
        if index_path.is_file():
            index = read_json(index_path)
            if index.get("_class_name") not in (None, "LensPipeline"):
                raise CheckpointError(f"{index_path}: _class_name {index.get('_class_name')!r}, "
                                      "expected 'LensPipeline'")
        else:
            log.warning("%s has no model_index.json; reading the component folders directly", root)
        scheduler_file = root / "scheduler" / "scheduler_config.json"
        scheduler_config = (SchedulerConfig.from_json(read_json(scheduler_file),  # before any weight
                                                      source=str(scheduler_file))
                            if scheduler_file.is_file() else SchedulerConfig())
        dtype = jnp.dtype(dtype or default_dtype())
        transformer_folder = transformer_path or _component_folder(root, "transformer")
        text_folder = text_encoder_io.resolve_folder(_component_folder(root, "text_encoder"))
        transformer_config = transformer_io.read_config(transformer_folder)
        transformer_config.update(param_dtype=dtype.name, dtype=dtype.name)
        layers = tuple(transformer_config.selected_layer_index)
        text_config = text_encoder_io.read_config(text_folder)
        vae = load_vae(_component_folder(root, "vae"), dtype=dtype)  # 0.16 GiB: the first chip
        chosen = placement_lib.host_placement(
            placement, local_devices(devices),
            placement_lib.abstract_weight_bytes(transformer_config, text_config, max(layers) + 1,
                                                mxfp4, dtype) + placement_lib.tree_bytes(nnx.state(vae.model)))
        shardings = None
        if chosen.sharded:
            abstract = nnx.state(abstract_model(transformer_config))
            shardings = nnx.to_pure_dict(chosen.denoiser_shardings(abstract))
        transformer = transformer_io.load_transformer(transformer_folder, dtype=dtype, compute_dtype=dtype,
                                                  shardings=shardings, progress=progress)
        text_encoder = text_encoder_io.load_text_encoder(
            text_folder, layers=layers, dtype=dtype, mxfp4=mxfp4, progress=progress,
            **chosen.loader_placement(text_config))
        tokenizer = PromptTokenizer.from_pretrained(_component_folder(root, "tokenizer"))
        return cls(transformer, vae, text_encoder, tokenizer, scheduler_config,
                   preset=preset or preset_for(path), devices=devices,
                   bf16_timesteps=bf16_timesteps, source=str(path), placement=chosen)

    loras: tuple = ()                 # (path, scale) of each LoRA merged by load_lora

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> "LensPipeline":
        """Merges a LoRA file into the denoiser: ``W += scale * alpha/r * lora_B @ lora_A`` for each
        adapted module (PEFT/diffusers keys ``transformer_blocks.N.MODULE.lora_A.weight`` with or
        without a ``transformer.``/``diffusion_model.``/``base_model.model.`` prefix, or kohya keys
        ``lora_unet_transformer_blocks_N_MODULE.lora_down.weight``; rank and alpha as
        ``lens_jax.lora.files`` reads them). ``path``: the ``.safetensors`` file or its folder.
        Raises ``lens_jax.errors.LoraFileError`` (a ValueError) naming the keys or shapes of a
        file that does not fit this model, before changing any weight. Returns the pipeline."""
        from lens_jax.lora.files import merge_lora, read_lora

        merge_lora(self.transformer, read_lora(path, self.transformer.config), float(scale))
        self.loras = self.loras + ((str(path), float(scale)),)
        return self

    # -- stages ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.transformer.config.dtype)

    def encode(self, prompts: Sequence[str], date: str) -> tuple[list[jax.Array], jax.Array]:
        """Prompts -> (features per selected layer ``[B, L, D]``, mask ``[B, L]``) in the DiT dtype.

        As ``lens_jax.text.encode_prompts``, except that the templated token sequence is
        right-padded (masked) to a multiple of ``text_length_multiple`` (capped at 512), so that
        prompts of similar length share one compiled encoder and denoising loop. Padding sits after
        every valid token, so the causal encoder and the masked denoiser give the same values
        (up to floating-point reduction order).
        """
        from lens_jax.text import MAX_LENGTH, drop_preamble

        input_ids, mask = self.tokenizer(list(prompts), date=date, max_length=MAX_LENGTH)
        multiple = max(1, int(self.text_length_multiple))
        length = min(MAX_LENGTH, -(-input_ids.shape[1] // multiple) * multiple)
        if length > input_ids.shape[1]:
            extra = length - input_ids.shape[1]
            input_ids = np.pad(input_ids, ((0, 0), (0, extra)), constant_values=self.tokenizer.pad_id)
            mask = np.pad(mask, ((0, 0), (0, extra)), constant_values=False)
        features = self.text_encoder(jnp.asarray(input_ids), jnp.asarray(mask),
                                     mesh=self.placement.encoder_mesh, rules=self.placement.rules)
        features, mask = drop_preamble(list(features), jnp.asarray(mask),
                                       self.tokenizer.preamble_length(date))
        return [f.astype(self.dtype) for f in features], mask

    def decode(self, latents: np.ndarray, latent_hw: tuple[int, int], tiled: bool = False) -> np.ndarray:
        """Latents ``[B, h*w, 128]`` -> images ``[B, H, W, 3]`` float32 in ~[-1, 1], one at a time."""
        images = [np.asarray(self.vae.latents_to_image(jnp.asarray(latents[i:i + 1]), latent_hw,
                                                       tiled=tiled), np.float32)
                  for i in range(latents.shape[0])]
        return np.concatenate(images, axis=0)

    # -- the call --------------------------------------------------------------------------------
    def __call__(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 height: int = 1024, width: int = 1024, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, num_images_per_prompt: int = 1, seed: int = 0,
                 first_index: int = 0, date: str | datetime.date | None = None,
                 noise: np.ndarray | None = None, output_type: str = "pil",
                 tiled_decode: bool = False) -> LensOutput:
        """Generates ``len(prompts) * num_images_per_prompt`` images (prompt-major order).

        ``num_inference_steps``/``guidance_scale`` default to the preset's. Image k of the call
        starts from the noise of ``(seed, first_index + k)``; ``noise`` (``[B, h*w, 128]``)
        overrides it. ``date`` (``YYYY-MM-DD``, default today) is rendered into the prompt
        template and changes the text features: keep it to reproduce an image.
        ``output_type``: "pil" (PIL images), "np" (float arrays in [0, 1]) or "latent" (no decode).
        """
        from lens_jax.text import is_empty_prompt

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type {output_type!r}: expected pil, np or latent")
        steps = int(self.preset.num_inference_steps if num_inference_steps is None
                    else num_inference_steps)
        g = float(self.preset.guidance_scale if guidance_scale is None else guidance_scale)
        n = int(num_images_per_prompt)
        if steps < 1 or n < 1:
            raise ValueError(f"num_inference_steps ({steps}) and num_images_per_prompt ({n}) must be >= 1")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        h, w = check_resolution(height, width)
        if not (0 <= int(first_index) and int(first_index) + len(prompts) * n <= 2 ** 32):
            raise ValueError(f"image indices {first_index}..{int(first_index) + len(prompts) * n - 1} "
                             "must lie in [0, 2**32)")
        date = date_string(date)
        batch = len(prompts) * n
        timings = {}

        start = time.perf_counter()
        features, mask = self.encode(prompts, date)
        neg_features = neg_mask = None
        if g != 1.0:
            if all(is_empty_prompt(p) for p in negatives):  # zeros, all-false mask (spec 2.1.6)
                neg_features, neg_mask = guidance.empty_negative(features, mask)
            else:
                neg_features, neg_mask = self.encode(negatives, date)
        jax.block_until_ready((features, mask, neg_features))
        timings["text_encoding"] = time.perf_counter() - start

        start = time.perf_counter()
        repeat = lambda x: jnp.repeat(x, n, axis=0)
        features, mask = [repeat(f) for f in features], repeat(mask)
        if neg_features is not None:
            neg_features, neg_mask = [repeat(f) for f in neg_features], repeat(neg_mask)
        channels = self.transformer.config.in_channels
        injected = noise is not None
        if noise is None:
            noise = denoise_lib.initial_noise(seed, np.arange(batch) + int(first_index), h * w,
                                              channels, self.dtype)
        else:
            noise = jnp.asarray(noise, self.dtype)
            if noise.shape != (batch, h * w, channels):
                raise ValueError(f"noise shape {tuple(noise.shape)}, expected {(batch, h * w, channels)}")
        # Pad the batch to a multiple of the device count (padded rows are dropped at the end).
        devices = 1 if self.mesh is None else self.mesh.size
        pad = (-batch) % devices
        if pad:
            pad_rows = lambda x: jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
            noise, mask = pad_rows(noise), pad_rows(mask)
            features = [pad_rows(f) for f in features]
            if neg_features is not None:
                neg_features, neg_mask = [pad_rows(f) for f in neg_features], pad_rows(neg_mask)
        sigmas = sigmas_for(steps, h * w, self.scheduler_config)
        latents = denoise_lib.denoise(
            self.transformer, noise, features, mask, sigmas, g, (h, w), neg_features=neg_features,
            neg_mask=neg_mask, bf16_timesteps=self.bf16_timesteps,
            num_train_timesteps=self.scheduler_config.num_train_timesteps, mesh=self.mesh,
            rules=self.placement.rules)
        latents = np.asarray(jax.device_get(latents), np.float32)[:batch]
        timings["denoising"] = time.perf_counter() - start

        start = time.perf_counter()
        images: list = []
        if output_type != "latent":
            pixels = self.decode(latents, (h, w), tiled=tiled_decode)
            if output_type == "pil":
                from PIL import Image

                from lens_jax.models.latents import to_uint8
                images = [Image.fromarray(img) for img in to_uint8(pixels)]
            else:
                images = list((np.clip(pixels, -1.0, 1.0) + 1.0) / 2.0)
        timings["decoding"] = time.perf_counter() - start

        settings = []
        for k in range(batch):
            p = k // n
            settings.append({
                "prompt": prompts[p], "negative_prompt": negatives[p], "seed": int(seed),
                "image_index": int(first_index) + k, "height": int(height), "width": int(width),
                "num_inference_steps": steps, "guidance_scale": g, "date": date,
                "preset": self.preset.name, "model": self.source, "dtype": self.dtype.name,
                "bf16_timesteps": self.bf16_timesteps, "backend": jax.default_backend(),
                "injected_noise": injected, "lens_jax_version": _version(),
            })
        return LensOutput(images=images, latents=latents, settings=settings, timings=timings)

    def __repr__(self) -> str:
        c = self.transformer.config
        return (f"LensPipeline(source={self.source!r}, preset={self.preset.name!r}, "
                f"layers={c.num_layers}, width={c.num_attention_heads * c.attention_head_dim}, "
                f"dtype={self.dtype.name}, devices={len(self.devices)}, "
                f"placement={self.placement.kind!r})")


def _version() -> str:
    import lens_jax
    return lens_jax.__version__
