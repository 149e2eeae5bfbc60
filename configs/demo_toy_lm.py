# The demo with a toy language model as its frozen text encoder instead of the random word table:
#   python -m lens_jax.demo --config configs/demo_toy_lm.py --out demo_toy_out
# or by hand (FOLDER: demo_toy_out/text_encoder, written by the command above, or by
# lens_jax.train.toy_text_encoder.train_or_reuse):
#   lens-train --config configs/demo_toy_lm.py --workdir demo_toy_out/run --config.data.path=... \
#       --config.data.tokenizer=json:demo_toy_out/word_tokenizer.json --config.text_encoder.path=FOLDER
"""configs/demo.py with a tiny GPT-OSS trained on the demo's captions as the text encoder.

``text_encoder.path = "toy"`` is resolved by lens_jax/demo.py (``resolve_toy_text_encoder``): an
8-layer, width-64 GPT-OSS causal LM (4 experts, top-2; ``lens_jax.train.toy_text_encoder``) is
trained on the dense and short captions of the training records, cached in OUT/text_encoder/,
and its layers (1, 3, 5, 7) feed the denoiser as Lens feeds GPT-OSS-20B's 5/11/17/23
(docs/demo.md, "The toy text encoder"). Everything else is configs/demo.py.
"""

import ml_collections

from lens_jax.configs import demo
from lens_jax.train.toy_text_encoder import ToyLMSettings


def get_config() -> ml_collections.ConfigDict:
    config = demo.get_config()
    toy = ToyLMSettings()
    config.text_encoder.kind = "gpt_oss"
    config.text_encoder.path = "toy"        # resolved by lens_jax.demo; by hand: the folder
    config.text_encoder.dtype = "float32"   # the CPU computes float32 faster than bfloat16
    # Each distinct caption is encoded once, on the host, and its features reused at every epoch
    # (lens_jax.train.text_feature_cache): the step does not run the 8-layer encoder over its
    # 32 caption slots again and again.
    config.text_encoder.cache_features = True
    config.model.enc_hidden_dim = toy.hidden_size                # 64
    config.model.selected_layer_index = toy.selected_layers      # (1, 3, 5, 7) of 8
    return config
