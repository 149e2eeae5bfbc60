# Fine-tune the released Lens denoiser (converted PyTorch weights) on your own records:
#   lens-train --config configs/lens_3p8b_finetune.py --workdir /runs/ft \
#       --config.init_from=/ckpt/Lens/transformer --config.data.path=/data/my_records \
#       --config.data.tokenizer=prompt:/ckpt/Lens/tokenizer --config.text_encoder.path=/ckpt/Lens \
#       --config.image_encoder.path=/ckpt/Lens/vae
#   then: lens-train export --workdir /runs/ft --out /ckpt/my_lens/transformer
"""Fine-tuning: start from the diffusers ``transformer/`` folder (or ``lens-convert to-orbax``
output), mixed-resolution buckets, small constant LR after warmup, EMA 0.999, frequent checkpoints.
Batch sizes for one 8-device host; scale ``data.rows_per_host`` / ``grad_accum_steps`` to taste.
"""

import ml_collections

from lens_jax.configs import lens_3p8b_stage2_mixed


def get_config() -> ml_collections.ConfigDict:
    config = lens_3p8b_stage2_mixed.get_config()
    config.init_from = ""                        # --config.init_from=/ckpt/Lens/transformer (required)
    config.num_steps = 20_000
    config.grad_accum_steps = 1
    config.data.rows_per_host = 8
    config.data.worker_count = 16
    o = config.optimizer
    o.lr = 1e-5
    o.warmup_steps = 500
    o.schedule = "cosine"
    o.end_lr_factor = 0.1
    config.ema.decay = 0.999
    config.checkpoint.every = 500
    config.checkpoint.keep_period = 5000
    config.logging.every = 20
    return config
