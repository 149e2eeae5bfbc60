# LoRA on the tiny Lens (CPU, seconds per step). First a base model, then adapters on it:
#   lens-train --config configs/tiny.py --workdir /tmp/tiny_run --config.data.path=/tmp/shapes
#   lens-train --config configs/tiny_lora.py --workdir /tmp/tiny_lora --config.init_from=run:/tmp/tiny_run \
#       --config.data.path=/tmp/my_records
#   lens-train export --workdir /tmp/tiny_lora --out /tmp/tiny_lora_file --lora
"""LoRA training on the tiny model (``configs/tiny.py``): rank 4 adapters on the attention
projections and both MLPs, base weights frozen (float32 here: a CPU run), EMA off (the adapter
itself is exported). ``init_from``: a diffusers folder, an orbax layout, or ``run:WORKDIR[:STEP]``.
"""

import ml_collections

from lens_jax.configs import tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    config.init_from = ""                 # --config.init_from=run:/tmp/tiny_run (the model to adapt)
    config.num_steps = 200
    config.lora.rank = 4
    config.lora.alpha = 4.0
    config.lora.dropout = 0.0
    config.lora.targets = "attn.*,img_mlp.*,txt_mlp.*"
    config.lora.base_dtype = "float32"
    config.optimizer.lr = 3e-3
    config.optimizer.warmup_steps = 5
    config.optimizer.weight_decay = 0.0
    config.ema.decay = 0.0
    config.checkpoint.every = 100
    config.logging.every = 10
    return config
