# The newcomer demo's training run (make demo runs it through lens_jax/demo.py):
#   python -m lens_jax.demo --out demo_out
# or by hand, on records of lens-data synth-shapes --base-size 96 --groups 512 --short-style places:
#   lens-train --config configs/demo.py --workdir demo_out/run --config.data.path=demo_out/data/train \
#       --config.data.tokenizer=json:demo_out/word_tokenizer.json   (written by the command above)
"""A small Lens that learns the synthetic shapes task on a 2-core CPU in about a quarter of an hour.

configs/tiny.py (byte-embedding text stand-in, DCT stand-in latents) made deeper and wider (4 blocks
of width 96), with a word-level caption tokenizer, trained longer on short captions that name
each object's place ("a red circle upper left and a blue square centre": lens_jax.demo
--short-captions places, the default), with sample grids. docs/demo.md ("Choices") has the measurements behind
each choice.
"""

import ml_collections

from lens_jax.configs import tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    # 12-channel DCT stand-in latents: the 4 lowest frequencies (DC, first horizontal and vertical
    # cosines, ...) of each 16x16 patch per colour. A 2-block, width-64 model learns these far
    # faster than the 48 of configs/tiny.py, and decoding them back still recovers an object's
    # colour at these sizes (docs/demo.md "Choices").
    config.model.in_channels = 12
    config.model.out_channels = 3
    # 4 blocks of width 96 (6 heads x 16): single-object colour 0.90 at guidance 12 on validation
    # prompts, against 0.85 for 4 blocks of width 64 and 0.75 for 2 of width 64 (6000 steps each;
    # docs/demo.md). Each step costs ~2.2x the 2x64 model's.
    config.model.num_layers = 4
    config.model.num_attention_heads = 6
    config.num_steps = 4500
    d = config.data
    # images of lens-data synth-shapes --base-size 96 --groups 512: the 9 aspect ratios of the
    # 512 base scaled by 96/512 (64x128 .. 96x96 .. 128x64 pixels, 32-48 latent tokens)
    d.base_sizes = (512,)
    d.base_probs = (1.0,)
    d.bucket_scale = 0.1875
    d.rows_per_host = 8
    d.image_tokens = 128              # ~3 images per packed row, ~24 per step
    # Word tokens: "words" is replaced by lens_jax/demo.py with json:OUT/word_tokenizer.json
    # (lens_jax.demo.write_word_tokenizer: the ~120 words of the synth-shapes captions); by hand,
    # pass --config.data.tokenizer=json:FILE. A colour is one token instead of 3-6 bytes: 0.72 vs
    # 0.36 single-object colour after 3000 steps of the 2-block model.
    d.tokenizer = "words"
    d.text_tokens = 64                # a places caption is 4-20 words; 64 fits ~4 of them
    d.max_segments = 4
    d.short_caption_prob = 1.0        # short captions (configs/ablation_captions.py: dense vs short)
    d.caption_dropout = 0.1           # empty caption 10% of the time: classifier-free guidance
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.schedule = "cosine"
    config.optimizer.end_lr_factor = 0.05
    config.ema.decay = 0.995
    config.checkpoint.every = 500
    config.checkpoint.max_to_keep = 2
    config.logging.every = 25
    config.samples.every = 500        # sample grids in WORKDIR/samples/
    config.samples.prompts = ("a red circle centre", "a blue square upper left",
                              "a green star lower right", "a yellow triangle left",
                              "a purple hexagon top centre", "an orange diamond right")
    config.samples.height = 96
    config.samples.width = 96
    return config
