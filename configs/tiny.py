# A tiny Lens for tests and CPU runs. Train it on synthetic shapes (2-core CPU, a few minutes):
#   python -m lens_jax.data.cli synth-shapes --out /tmp/shapes --num 2000 --seed 0 --base-size 64
#   lens-train --config configs/tiny.py --workdir /tmp/tiny_run --config.data.path=/tmp/shapes --config.num_steps=600
#   (or python -m lens_jax.train.cli ...). With the real encoders' code paths (tiny random VAE and GPT-OSS):
#   ... --config.model.in_channels=128 --config.model.out_channels=32 --config.image_encoder.kind=vae
#       --config.image_encoder.path=random --config.text_encoder.kind=gpt_oss --config.text_encoder.path=random
"""Tiny denoiser: 2 blocks of width 64 (4 heads x 16), small text features; runs in seconds on a CPU.

Training stand-ins (no VAE, no GPT-OSS): images are encoded by a fixed orthonormal DCT projection of
each 16x16 patch to 48 channels (``image_encoder.kind = "dct"``), captions are UTF-8 bytes looked up
in a frozen random embedding table per selected layer (``text_encoder.kind = "embedding"``).
"""

import ml_collections

from lens_jax.models.config import transformer_config


def get_model_config(**overrides) -> ml_collections.ConfigDict:
    fields = dict(
        num_layers=2,
        num_attention_heads=4,
        attention_head_dim=16,
        axes_dims_rope=(4, 6, 6),
        enc_hidden_dim=32,
        selected_layer_index=(1, 3),
        param_dtype="float32",
        dtype="float32",
    )
    fields.update(overrides)
    return transformer_config(**fields)


# get_config().model is get_model_config() with 48 latent channels (16 DCT coefficients per colour
# of each 16x16 patch, the training stand-in latents): the 64-wide residual stream of this model
# cannot carry 128 channels of x_sigma through (a bottleneck that kept the loss near 0.5); 48 fit.
# get_model_config() itself keeps the released 128 channels (VAE latents).
TRAIN_MODEL_OVERRIDES = dict(in_channels=48, out_channels=12)


def get_config() -> ml_collections.ConfigDict:
    from lens_jax.train.config import train_config

    config = train_config(get_model_config(**TRAIN_MODEL_OVERRIDES))
    config.num_steps = 600
    config.seed = 0
    config.mesh.num_devices = 1          # tiny: one device is fastest on a CPU
    # data: lens-data synth-shapes --base-size 64 (48..192 px); buckets 1/8 of the 512/768 sets
    d = config.data
    d.path = ""                          # --config.data.path=DIR
    d.worker_count = 0
    d.base_sizes = (512, 768)
    d.base_probs = (0.7, 0.3)
    d.bucket_scale = 0.125
    d.min_side = 16
    d.tokenizer = "bytes"
    d.caption_dropout = 0.1
    d.short_caption_prob = 1.0           # short captions ("a red circle and two blue squares")
    d.rows_per_host = 8
    d.image_tokens = 96
    d.text_tokens = 192
    d.max_segments = 4
    d.caption_length = 64
    d.lookahead = 16
    config.text_encoder.vocab_size = 256
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 20
    config.optimizer.grad_clip = 1.0
    config.ema.decay = 0.99
    config.checkpoint.every = 100
    config.checkpoint.max_to_keep = 3
    config.logging.every = 10
    config.samples.every = 0
    config.samples.height = 64
    config.samples.width = 64
    return config
