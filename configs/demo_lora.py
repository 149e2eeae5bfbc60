# LoRA on the demo's model, teaching it a colour it never saw (make demo-lora, after make demo):
#   python -m lens_jax.demo lora --base demo_out --out demo_lora_out [--concept cyan]
# or by hand, on the records and extended tokenizer that command writes into demo_lora_out/:
#   lens-train --config configs/demo_lora.py --workdir demo_lora_out/run --config.init_from=run:demo_out/run \
#       --config.data.path=demo_lora_out/data/train --config.data.tokenizer=json:demo_lora_out/word_tokenizer.json
"""LoRA training on the demo model (``configs/demo.py``): rank 8 adapters on the attention projections
and both MLPs of its 4 blocks, base weights frozen (float32: a CPU run), EMA off (the adapter itself
is exported), a few hundred steps: a few CPU minutes. Data, buckets, tokenizer and text stand-in are
the demo's; the driver passes the base run's word tokenizer extended by the new colour word
(``lens_jax.demo.extend_word_tokenizer``: existing ids unchanged) and ``init_from=run:BASE/run``.
"""

import ml_collections

from lens_jax.configs import demo


def get_config() -> ml_collections.ConfigDict:
    config = demo.get_config()
    config.init_from = ""                 # run:DEMO_OUT/run (set by lens_jax.demo lora)
    config.num_steps = 600
    config.lora.rank = 8
    config.lora.alpha = 8.0
    config.lora.dropout = 0.0
    config.lora.targets = "attn.*,img_mlp.*,txt_mlp.*"
    config.lora.base_dtype = "float32"
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 20
    config.optimizer.weight_decay = 0.0
    config.ema.decay = 0.0
    config.checkpoint.every = 300
    config.logging.every = 25
    config.samples.every = 0
    return config
