# A tiny Lens for tests and CPU runs, e.g.:
#   python -c "from configs import tiny; print(tiny.get_config())"
"""Tiny denoiser: 2 blocks of width 64 (4 heads x 16), small text features; runs in seconds on a CPU."""

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


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = get_model_config()
    return config
