# Dense vs short captions at toy scale (the paper's central claim), one command:
#   python -m lens_jax.demo ablation --out ablation_out          (or: make ablation)
# One arm by hand (ARM = dense | short):
#   lens-train --config configs/ablation_captions.py:dense --workdir runs/dense --config.data.path=DIR \
#       --config.data.tokenizer=json:ablation_out/word_tokenizer.json   (written by the command above)
"""The demo model (configs/demo.py) trained on one caption type only.

``get_config("dense")``: always the dense caption (60-120 words: every object's colour, size, shape
and position, relations between objects, the background); ``get_config("short")``: always the
short one ("a red circle and two blue squares"). Everything else (model, steps, data, seeds) is the
same, so the two runs differ only in their captions. The pipeline picks the caption per example with
``data.short_caption_prob`` (lens_jax/data/pipeline.py ``default_data_config``).
"""

import ml_collections

from lens_jax.configs import demo

ARMS = {"dense": 0.0, "short": 1.0}


def get_config(arm: str = "dense") -> ml_collections.ConfigDict:
    if arm not in ARMS:
        raise ValueError(f"configs/ablation_captions.py:{arm}: expected one of {sorted(ARMS)}")
    config = demo.get_config()
    config.data.short_caption_prob = ARMS[arm]
    # The 2-block, width-64 model of configs/tiny.py, 3000 steps: a dense arm's step carries 512 text
    # tokens, ~3x the demo's compute per step, so the demo's 4x96 model would need ~30 minutes per
    # arm on 2 cores; this one ~10.
    config.model.num_layers = 2
    config.model.num_attention_heads = 4
    config.num_steps = 3000
    # Word tokens for both arms (as configs/demo.py): a dense caption is ~110 words (~530 UTF-8
    # bytes), so with a byte tokenizer the dense arm would cost ~20x the short one per step.
    config.data.caption_length = 160  # dense captions: at most ~145 words and punctuation
    config.data.text_tokens = 512     # ~4 dense captions per packed row (both arms: same compute)
    config.text_encoder.vocab_size = 256
    config.samples.every = 0
    return config
