# Dense vs short captions at toy scale (the paper's central claim), one command:
#   python -m lens_jax.demo ablation --out ablation_out          (or: make ablation)
# One arm by hand (ARM = dense | short | dense_toy_lm | short_toy_lm):
#   lens-train --config configs/ablation_captions.py:dense --workdir runs/dense --config.data.path=DIR \
#       --config.data.tokenizer=json:ablation_out/word_tokenizer.json   (written by the command above)
"""The demo model (configs/demo.py) trained on one caption type only.

``get_config("dense")``: always the dense caption (60-120 words: every object's colour, size, shape
and position, relations between objects, the background); ``get_config("short")``: always the
short one ("a red circle and two blue squares"). Everything else (model, steps, data, seeds) is the
same, so the two runs differ only in their captions. The pipeline picks the caption per example with
``data.short_caption_prob`` (lens_jax/data/pipeline.py ``default_data_config``).

``get_config("dense_toy_lm")`` / ``get_config("short_toy_lm")``: the same two with the frozen text
encoder a toy language model trained on the captions (configs/demo_toy_lm.py, resolved by
lens_jax/demo.py) instead of the random word table: Lens's claim rests on an encoder that reads
language, which a random table does not.
"""

import ml_collections

from lens_jax.configs import demo
from lens_jax.train.toy_text_encoder import ToyLMSettings

# arm -> (data.short_caption_prob, toy language model as the text encoder)
ARMS = {"dense": (0.0, False), "short": (1.0, False), "dense_toy_lm": (0.0, True),
        "short_toy_lm": (1.0, True)}


def get_config(arm: str = "dense") -> ml_collections.ConfigDict:
    if arm not in ARMS:
        raise ValueError(f"configs/ablation_captions.py:{arm}: expected one of {sorted(ARMS)}")
    config = demo.get_config()
    short_caption_prob, toy_lm = ARMS[arm]
    config.data.short_caption_prob = short_caption_prob
    # The 2-block, width-64 model of configs/tiny.py, 3000 steps: a dense arm's step carries 512 text
    # tokens, ~3x the demo's compute per step, so the demo's 4x96 model would need ~30 minutes per
    # arm on 2 cores; this one ~10.
    config.model.num_layers = 2
    config.model.num_attention_heads = 4
    config.num_steps = 3000
    # The images, latents and sigmas its figures in docs/demo.md were measured on (configs/demo.py
    # before 2026-12-06): the 512 group's 9 aspect ratios at base 96 (free layouts: the ablation
    # writes its records with lens-data synth-shapes' defaults), 12 DCT channels, the resolution
    # rule's sigma location.
    config.data.bucket_scale = 0.1875
    config.model.in_channels = 12
    config.model.out_channels = 3
    config.image_encoder.freq_exponent = 0.0
    config.objective.sigma_loc = (1.0, 1.3)
    # Word tokens for both arms (as configs/demo.py): a dense caption is ~110 words (~530 UTF-8
    # bytes), so with a byte tokenizer the dense arm would cost ~20x the short one per step.
    config.data.caption_length = 160  # dense captions: at most ~145 words and punctuation
    config.data.text_tokens = 512     # ~4 dense captions per packed row (both arms: same compute)
    config.text_encoder.vocab_size = 256
    config.samples.every = 0
    if toy_lm:  # as configs/demo_toy_lm.py
        toy = ToyLMSettings()
        config.text_encoder.kind = "gpt_oss"
        config.text_encoder.path = "toy"      # resolved by lens_jax.demo; by hand: the folder
        config.text_encoder.dtype = "float32"
        config.text_encoder.cache_features = True   # each caption encoded once (as demo_toy_lm)
        config.model.enc_hidden_dim = toy.hidden_size
        config.model.selected_layer_index = toy.selected_layers
    return config
