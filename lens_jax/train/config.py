"""Every field of a training run, with its default (``train_config``); configs/*.py override them.

Sections: ``model`` (the denoiser, ``lens_jax.models.config``), ``data`` (the input pipeline,
``lens_jax.data.pipeline.default_data_config``), ``mesh`` and ``rules`` (sharding), ``objective``,
``image_encoder`` / ``text_encoder`` (frozen encoders or stand-ins), ``optimizer``, ``ema``,
``checkpoint``, ``logging``, ``samples``.
"""

from __future__ import annotations

import ml_collections

from lens_jax.data.pipeline import default_data_config

# Logical axis -> mesh axes (first matching rule wins; see lens_jax.sharding). FSDP by default:
# parameters, optimizer state and EMA are split over "fsdp" along their "embed" axis, attention
# heads and MLP hidden units over "tensor"; activations' batch axis over every data-like axis.
DEFAULT_RULES = (
    # fsdp before data: XLA:CPU's SPMD partitioner exchanges batch shards in y @ w when w's columns
    # are over a batch axis that is not the first (docs/sharding.md, five-line repro in
    # benchmarks/sharding_order_minimal.py); with several slices this order is still affected on CPU
    ("batch", ("slice", "fsdp", "data")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("experts", ("fsdp", "tensor")),  # GPT-OSS experts (E=32): the axes whose sizes divide E
    ("mlp", "tensor"),
    ("modulation", "tensor"),
    ("embed_out", "tensor"),
    ("qkv", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("text_embed", None),
    ("time_embed", None),
    ("in_channels", None),
    ("out_channels", None),
)

MESH_AXES = ("slice", "data", "fsdp", "tensor")


def train_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A training config around the denoiser config ``model`` (every field commented)."""
    c = ml_collections.ConfigDict()
    c.model = model
    c.seed = 0                        # parameter init + noise/sigma RNG (data has data.seed)
    c.num_steps = 1000                # optimizer steps of the run (a resumed run stops here too)
    c.init_from = ""                  # "" = fresh init; diffusers folder, orbax layout of lens-convert,
    #                                   or run:WORKDIR[:STEP] (raw weights of a lens-train run)
    c.grad_accum_steps = 1            # micro-batches per optimizer step (rows split evenly)
    c.compiled_step_path = ""         # a lens-train compile --save-executable file: run that step
    #                                   instead of jitting one (refused unless it was compiled for
    #                                   this config, mesh, device kind and jax version)

    c.data = default_data_config()

    # --- devices and sharding
    c.mesh = ml_collections.ConfigDict()
    c.mesh.slice = 1                  # slices (pods) of a multi-slice run; DCN axis
    c.mesh.data = 1                   # pure data parallelism (parameters replicated)
    c.mesh.fsdp = -1                  # data parallel + parameters/optimizer/EMA sharded; -1 = the rest
    c.mesh.tensor = 1                 # tensor parallelism (heads, MLP hidden)
    c.mesh.num_devices = 0            # use the first N devices (0 = all)
    c.mesh.allow_split_physical_axes = False  # TPU: let a physical torus axis be split over several
    #                                   mesh axes (shapes such as data=2 on v5p-128's 4x4x4; their
    #                                   collectives share links); off: such shapes are an error
    #                                   that names shapes which fit
    c.rules = DEFAULT_RULES           # logical axis name -> mesh axes
    c.distributed = "auto"            # jax.distributed.initialize: "auto" (env detection) | "yes" | "no"
    c.coordinator_address = ""        # for distributed="yes" outside a managed cluster
    c.num_processes = 0
    c.process_id = -1
    c.heartbeat_timeout_s = 100       # a process silent this long (killed, host lost) stops the others
    c.shutdown_timeout_s = 60         # at exit, how long a process waits for the others to finish

    # --- objective (spec 5; flow matching, velocity target)
    c.objective = ml_collections.ConfigDict()  # sigma per image: objective.sample_sigmas (the only sampler)
    c.objective.sigma_loc = (1.0, 1.3)    # logit-normal location at sigma_tokens[0] / [1] image tokens
    c.objective.sigma_tokens = (256, 4096)
    c.objective.sigma_scale = 1.0         # logit-normal std [UNCONFIRMED upstream]
    c.objective.sigma_buckets = (0.25, 0.5, 0.75)  # edges of the per-sigma loss metrics

    # --- frozen encoders (or stand-ins)
    c.image_encoder = ml_collections.ConfigDict()
    c.image_encoder.kind = "dct"      # "dct": fixed orthonormal low-frequency DCT of each 16x16 patch
    #                                   (stand-in, no VAE); "vae": the FLUX.2 VAE (path / "random")
    c.image_encoder.path = ""         # kind="vae": diffusers VAE folder, or "random" (tiny random VAE)
    c.image_encoder.scale = 0.125     # dct: multiply coefficients (DC of a [-1,1] patch is <= 16)
    c.image_encoder.freq_exponent = 0.0  # dct: and (1 + u + v) ** this at frequency (u, v)
    #                                   (stand_ins.dct_scales: lifts the faint edge frequencies)
    c.text_encoder = ml_collections.ConfigDict()
    c.text_encoder.kind = "embedding" # "embedding": frozen random table per selected layer (stand-in)
    #                                   | "gpt_oss": GPT-OSS features (path / "random")
    c.text_encoder.path = ""          # gpt_oss: a GPT-OSS folder (config.json + safetensors; a toy
    #                                   one: lens_jax.train.toy_text_encoder), or "random"
    c.text_encoder.dtype = "bfloat16" # gpt_oss folder: parameter/compute dtype of the loaded encoder
    #                                   (GPT-OSS-20B: bfloat16; a toy one on the CPU: "float32")
    c.text_encoder.cache_features = False  # gpt_oss: encode each distinct caption once, on the host,
    #                                   and reuse its features (exact: the encoder is frozen); for a
    #                                   small encoder and corpus (lens_jax.train.text_feature_cache)
    c.text_encoder.vocab_size = 256   # embedding: table rows (token ids must be below this)
    c.text_encoder.seed = 1234        # embedding / random encoders: init seed
    c.text_encoder.std = 1.0

    # --- optimizer (AdamW; spec 5 stage 1: constant 2e-4, betas 0.9/0.999, clip 1.0)
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 2e-4
    c.optimizer.schedule = "constant"  # "constant" | "cosine" (both after linear warmup)
    c.optimizer.warmup_steps = 1000
    c.optimizer.decay_steps = 0        # cosine: steps after warmup to reach end_lr (0: num_steps)
    c.optimizer.end_lr_factor = 0.0    # cosine: final lr = lr * this
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0     # [UNCONFIRMED upstream]; kernels only (no norms, no biases)
    c.optimizer.grad_clip = 1.0        # global-norm clipping (0 = off)

    # --- LoRA (lens_jax.lora): rank 0 trains every weight (full fine-tuning); rank >= 1 trains only
    #     low-rank adapters on the blocks (the base weights frozen: no gradients, optimizer state or EMA)
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0                    # adapter rank r (0 = no LoRA: full training)
    c.lora.alpha = 0.0                 # scale = alpha / r (0 = alpha = r, scale 1)
    c.lora.dropout = 0.0               # dropout on each adapter's input during training
    c.lora.targets = "attn.*,img_mlp.*,txt_mlp.*"  # diffusers module names (fnmatch patterns,
    #                                    comma-separated): attn.img_qkv attn.txt_qkv attn.to_out.0
    #                                    attn.to_add_out {img,txt}_mlp.w{1,2,3} {img,txt}_mod.1
    c.lora.base_dtype = ""             # dtype of the frozen base weights ("" = model.param_dtype)
    c.lora.merge_in_step = False       # True: x (W + s A B) per block inside the step: less activation
    #                                    memory, full fine-tuning's weight-gradient FLOPs; no dropout

    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.9999               # 0 = no EMA kept (exported weights = raw)
    c.ema.warmup = True                # decay_t = min(decay, (1 + t) / (10 + t))

    # --- checkpoints (orbax)
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1000          # save every N steps (and at the end, and on SIGTERM)
    c.checkpoint.max_to_keep = 3
    c.checkpoint.keep_period = 0       # also keep every step divisible by this (0 = off)
    c.checkpoint.async_save = True
    c.checkpoint.save_data_state = True

    # --- what the user watches
    c.logging = ml_collections.ConfigDict()
    c.logging.every = 50               # metrics every N steps (metrics.jsonl, TensorBoard, console)
    c.logging.tensorboard = True
    c.logging.progress = True          # tqdm progress bar
    c.logging.peak_flops_per_device = 0.0   # 0 = from the device table (docs/training.md)

    c.samples = ml_collections.ConfigDict()
    c.samples.every = 0                # sample grid every M steps (0 = off)
    c.samples.prompts = ("a red circle", "two blue squares", "a green star on a black background",
                         "a yellow triangle in the upper left corner")
    c.samples.height = 64
    c.samples.width = 64
    c.samples.steps = 20
    c.samples.guidance = 4.0
    c.samples.use_ema = True
    c.samples.seed = 0
    return c
