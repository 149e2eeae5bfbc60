# Dense vs short captions at toy scale (the paper's central claim), one command:
#   python -m lens_jax.demo ablation --out ablation_out          (or: make ablation)
# One arm by hand (ARM = dense | short):
#   lens-train --config configs/ablation_captions.py:dense --workdir runs/dense --config.data.path=DIR
"""The demo model (configs/demo.py) trained on one caption type only.

``get_config("dense")``: always the dense caption (60-120 words: every object's colour, size, shape
and position, relations between objects, the background); ``get_config("short")``: always the
short one ("a red circle and two blue squares"). Everything else (model, steps, data, seeds) is the
same, so the two runs differ only in their captions. The pipeline picks the caption per example with
``data.short_caption_prob`` (lens_jax/data/pipeline.py ``default_data_config``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from configs import demo  # noqa: E402

ARMS = {"dense": 0.0, "short": 1.0}


def get_config(arm: str = "dense") -> ml_collections.ConfigDict:
    if arm not in ARMS:
        raise ValueError(f"configs/ablation_captions.py:{arm}: expected one of {sorted(ARMS)}")
    config = demo.get_config()
    config.data.short_caption_prob = ARMS[arm]
    # dense captions are up to ~700 bytes (the byte tokenizer): room for them in the caption and
    # in each packed row's text stream
    config.data.caption_length = 768
    config.data.text_tokens = 1536
    config.samples.every = 0
    return config
