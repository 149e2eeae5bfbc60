# LoRA on the released Lens denoiser (converted PyTorch weights) with your own records:
#   lens-train --config configs/lens_3p8b_lora.py --workdir /runs/lora \
#       --config.init_from=/ckpt/Lens/transformer --config.data.path=/data/my_records \
#       --config.data.tokenizer=prompt:/ckpt/Lens/tokenizer --config.text_encoder.path=/ckpt/Lens \
#       --config.image_encoder.path=/ckpt/Lens/vae
#   then: lens-train export --workdir /runs/lora --out /ckpt/my_lora --lora   (PEFT file for diffusers)
"""LoRA fine-tuning of the full model: rank 32 adapters (alpha 32) on the fused QKV, attention
outputs and both MLPs of every block, the base frozen in bfloat16 (no gradients, Adam moments or
EMA for it), the optimizer as ``lens_3p8b_finetune`` but with a LoRA-sized learning rate.
"""

import ml_collections

from lens_jax.configs import lens_3p8b_finetune


def get_config() -> ml_collections.ConfigDict:
    config = lens_3p8b_finetune.get_config()
    config.init_from = ""                        # --config.init_from=/ckpt/Lens/transformer (required)
    config.num_steps = 2_000
    config.lora.rank = 32
    config.lora.alpha = 32.0
    config.lora.dropout = 0.0
    config.lora.targets = "attn.*,img_mlp.*,txt_mlp.*"
    config.lora.base_dtype = "bfloat16"
    # lens-train compile, one 8448+1024-token row per chip: 8.30 GiB per v5e chip with full remat,
    # 41.5 GiB (does not fit) with the fine-tune's save_dots_no_batch (docs/training.md)
    config.model.remat = "full"
    o = config.optimizer
    o.lr = 1e-4
    o.warmup_steps = 100
    o.schedule = "constant"
    o.weight_decay = 0.0
    config.ema.decay = 0.0                       # export the adapter as trained
    config.checkpoint.every = 250
    config.checkpoint.keep_period = 0
    return config
