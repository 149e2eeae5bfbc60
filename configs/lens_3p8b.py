# The full Lens denoiser (4,104,225,152 parameters; marketed "3.8B"), e.g.:
#   lens-convert to-orbax --src /ckpt/Lens/transformer --out /ckpt/lens_orbax
#   python -c "from lens_jax.configs import lens_3p8b; print(lens_3p8b.get_config())"
"""Full-size Lens: 48 dual-stream blocks, width 1536, 24 x 64 heads, SwiGLU 4096 (spec 1.1)."""

import ml_collections

from lens_jax.models.config import transformer_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Defaults of transformer_config() are the released architecture; training numerics:
    # fp32 master weights, bf16 compute, matmul outputs saved for the backward pass.
    config.model = transformer_config(param_dtype="float32", dtype="bfloat16", remat="save_dots_no_batch")
    return config
