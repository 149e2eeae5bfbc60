# The newcomer demo's training run (make demo runs it through lens_jax/demo.py):
#   python -m lens_jax.demo --out demo_out
# or by hand, on records of lens-data synth-shapes --base-size 64:
#   lens-train --config configs/demo.py --workdir demo_out/run --config.data.path=demo_out/data/train
"""A small Lens that learns the synthetic shapes task on a 2-core CPU in about a quarter of an hour.

configs/tiny.py (2 blocks, width 64, 48-channel DCT stand-in latents, byte-embedding text stand-in)
trained longer, on short captions ("a red circle and two blue squares"), with sample grids.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from configs import tiny  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    # 12-channel DCT stand-in latents: the 4 lowest frequencies (DC, first horizontal and vertical
    # cosines, ...) of each 16x16 patch per colour. A 2-block, width-64 model learns these far
    # faster than the 48 of configs/tiny.py, and decoding them back still recovers an object's
    # colour at these sizes (docs/demo.md "Choices").
    config.model.in_channels = 12
    config.model.out_channels = 3
    config.num_steps = 3000
    d = config.data
    # images of lens-data synth-shapes --base-size 96 --groups 512: the 9 aspect ratios of the
    # 512 base scaled by 96/512 (64x128 .. 96x96 .. 128x64 pixels, 32-48 latent tokens)
    d.base_sizes = (512,)
    d.base_probs = (1.0,)
    d.bucket_scale = 0.1875
    d.rows_per_host = 8
    d.image_tokens = 128              # ~3 images per packed row, ~24 per step
    d.text_tokens = 192
    d.max_segments = 4
    d.short_caption_prob = 1.0        # short captions (configs/ablation_captions.py: dense vs short)
    d.caption_dropout = 0.1           # empty caption 10% of the time: classifier-free guidance
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 50
    config.ema.decay = 0.995
    config.checkpoint.every = 500
    config.checkpoint.max_to_keep = 2
    config.logging.every = 25
    config.samples.every = 500        # sample grids in WORKDIR/samples/
    config.samples.prompts = ("a red circle", "a blue square", "a green star", "a yellow triangle",
                              "a purple hexagon", "an orange diamond")
    config.samples.height = 96
    config.samples.width = 96
    return config
