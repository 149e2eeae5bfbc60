# Lens 3.8B pre-training, stage 1 (spec 5): 512^2, 400K steps, global batch 3072, constant LR 2e-4.
#   lens-train --config configs/lens_3p8b_stage1_512.py --workdir gs://bucket/runs/stage1 \
#       --config.data.path=/data/lens800m --config.data.tokenizer=prompt:/ckpt/Lens/tokenizer \
#       --config.text_encoder.path=/ckpt/Lens --config.image_encoder.path=/ckpt/Lens/vae
#   (16 hosts x 8 accelerators = 128 devices as in the paper; other sizes: --config.data.rows_per_host)
"""Stage 1 of the Lens recipe (spec 5; [secondary] source, see LENS_SPEC.md section 5).

Batch: 512-base buckets only (1024 image tokens each), 8 images per packed row (8192 image tokens),
24 rows per host (3 per device on 8-device hosts = the per-GPU batch of 24 images), so 16 hosts
give 384 rows = 3072 images per step. Only the 1:1 ratio (512x512) is kept (data.aspect_ratios);
every image is resized and centre-cropped to it.
"""

import ml_collections

from lens_jax.configs import lens_3p8b
from lens_jax.train.config import train_config


def get_config() -> ml_collections.ConfigDict:
    config = train_config(lens_3p8b.get_config().model)  # fp32 master, bf16 compute, remat
    config.num_steps = 400_000
    config.seed = 0
    # sharding: FSDP over every device of a slice (parameters, Adam moments and EMA split 128-way)
    config.mesh.update(slice=1, data=1, fsdp=-1, tensor=1)
    # frozen encoders: FLUX.2 VAE on host devices per bucket shape; GPT-OSS-20B online
    config.image_encoder.kind = "vae"
    config.image_encoder.path = ""               # --config.image_encoder.path=/ckpt/Lens/vae
    config.text_encoder.kind = "gpt_oss"
    config.text_encoder.path = ""                # --config.text_encoder.path=/ckpt/Lens
    d = config.data
    d.path = ""
    d.tokenizer = ""                             # --config.data.tokenizer=prompt:/ckpt/Lens/tokenizer
    d.base_sizes = (512,)
    d.base_probs = (1.0,)
    d.aspect_ratios = (4,)                       # 1:1 only (buckets.ASPECT_RATIOS[4])
    d.mode = "pack"
    d.image_tokens = 8192                        # 8 x 1024
    d.text_tokens = 2048                         # 8 captions of ~109 words + scaffold
    d.max_segments = 8
    d.rows_per_host = 24
    d.worker_count = 32
    d.caption_dropout = 0.1                      # CFG dropout [UNCONFIRMED upstream]
    d.pixel_dtype = "bfloat16"
    config.objective.sigma_loc = (1.0, 1.3)      # 1.06 at 1024 tokens
    config.objective.sigma_scale = 1.0
    o = config.optimizer
    o.lr = 2e-4
    o.schedule = "constant"
    o.warmup_steps = 1000                        # [UNCONFIRMED upstream]
    o.b1, o.b2 = 0.9, 0.999
    o.weight_decay = 0.0                         # [UNCONFIRMED upstream]
    o.grad_clip = 1.0
    config.ema.decay = 0.9999                    # [UNCONFIRMED upstream]
    config.checkpoint.every = 2000
    config.checkpoint.max_to_keep = 3
    config.checkpoint.keep_period = 50_000
    config.logging.every = 50
    config.samples.every = 0                     # sample from exported weights with lens-sample
    return config
