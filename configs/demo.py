# The newcomer demo's training run (make demo runs it through lens_jax/demo.py):
#   python -m lens_jax.demo --out demo_out
# or by hand (records: lens-data synth-shapes --base-size 128 --groups 512 --short-style scene):
#   lens-train --config configs/demo.py --workdir demo_out/run --config.data.path=demo_out/data/train \
#       --config.data.tokenizer=json:demo_out/word_tokenizer.json   (written by the command above)
#   (the records also take --placement grid --aspect square: objects at their ninths' centres, square)
"""A small Lens that learns the synthetic shapes task on a 2-core CPU in about a quarter of an hour.

configs/tiny.py (byte-embedding text stand-in, DCT stand-in latents) made deeper and wider (4 blocks
of width 96), with a word-level caption tokenizer, trained longer on square 128-pixel images whose
objects sit at the centres of their ninths, with short captions that name each object's place and
the background ("a red circle upper left and a blue square centre on a plain beige background":
lens_jax.demo --short-captions scene --placement grid --aspect square, the defaults), with sample
grids. docs/demo.md ("Choices", "Towards shapes") has the measurements behind each choice.
"""

import ml_collections

from lens_jax.configs import tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    # 24-channel DCT stand-in latents: the 8 lowest frequencies of each 16x16 patch per colour.
    # Through them and back, ground truth scores shape 0.78 on one-object prompts (12 channels:
    # 0.52 or less), and this model learns them within the 4500 steps (docs/demo.md trials 4, 18).
    config.model.in_channels = 24
    config.model.out_channels = 6
    # Each DCT coefficient of frequency (u, v) scaled by (1 + u + v) ** 1, so the edges' channels
    # are not buried under the unit noise of flow matching: shape 0.64 against 0.48 unscaled on
    # validation prompts (docs/demo.md trial 20; lens_jax.train.stand_ins.dct_scales).
    config.image_encoder.freq_exponent = 1.0
    # 4 blocks of width 96 (6 heads x 16): single-object colour 0.90 at guidance 12 on validation
    # prompts, against 0.85 for 4 blocks of width 64 and 0.75 for 2 of width 64 (6000 steps each;
    # docs/demo.md). Each step costs ~2.2x the 2x64 model's.
    config.model.num_layers = 4
    config.model.num_attention_heads = 6
    config.num_steps = 4500
    d = config.data
    # images of lens-data synth-shapes --base-size 128 --groups 512: the 512 group's buckets
    # scaled by 128/512; the demo's records are its square one (--aspect square: 128x128 pixels,
    # 64 latent tokens), the other eight buckets stay empty
    d.base_sizes = (512,)
    d.base_probs = (1.0,)
    d.bucket_scale = 0.25
    d.rows_per_host = 8
    d.image_tokens = 128              # up to 2 square images per packed row, 16 per step
    # Word tokens: "words" is replaced by lens_jax/demo.py with json:OUT/word_tokenizer.json
    # (lens_jax.demo.write_word_tokenizer: the ~120 words of the synth-shapes captions); by hand,
    # pass --config.data.tokenizer=json:FILE. A colour is one token instead of 3-6 bytes: 0.72 vs
    # 0.36 single-object colour after 3000 steps of the 2-block model.
    d.tokenizer = "words"
    d.text_tokens = 64                # a scene caption is 9-43 word tokens: two share a row when they fit
    d.max_segments = 4
    d.short_caption_prob = 1.0        # short captions (configs/ablation_captions.py: dense vs short)
    d.caption_dropout = 0.1           # empty caption 10% of the time: classifier-free guidance
    # training sigmas logit-normal about 0 (median 0.5, SD3's default) instead of the resolution
    # rule's ~1 (median 0.73): the lowest held-out loss and best colour (docs/demo.md trial 12)
    config.objective.sigma_loc = (0.0, 0.0)
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.schedule = "cosine"
    config.optimizer.end_lr_factor = 0.05
    config.ema.decay = 0.995
    config.checkpoint.every = 500
    config.checkpoint.max_to_keep = 2
    config.logging.every = 25
    config.samples.every = 500        # sample grids in WORKDIR/samples/
    config.samples.prompts = ("a red circle centre on a plain white background",
                              "a blue square upper left on a plain beige background",
                              "a green star lower right on a plain pale blue background",
                              "a yellow triangle left on a plain black background",
                              "a purple hexagon top centre on a plain gray background",
                              "an orange diamond right on a plain mint green background")
    config.samples.height = 128
    config.samples.width = 128
    return config
