"""lens_jax: Microsoft Research's Lens text-to-image model in JAX/Flax NNX.

Public API (imported lazily, so ``import lens_jax`` stays cheap):

- ``load_transformer(path, dtype=...)`` / ``save_transformer(model, out_dir)``: the denoiser,
  from and to a diffusers-format folder or an orbax checkpoint written by ``lens-convert``.
- ``LensTransformer``: the Flax NNX denoiser.
- ``load_vae`` / ``save_vae``: the FLUX.2 VAE.
- ``load_text_encoder`` / ``encode_prompts``: the GPT-OSS-20B text encoder.
- ``LensPipeline``: text to image (``LensPipeline.from_pretrained(path)(prompts, ...)``).
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "LensTransformer": "lens_jax.models.transformer",
    "load_transformer": "lens_jax.checkpoints.transformer",
    "save_transformer": "lens_jax.checkpoints.transformer",
    "load_vae": "lens_jax.checkpoints.vae",
    "save_vae": "lens_jax.checkpoints.vae",
    "load_text_encoder": "lens_jax.checkpoints.text_encoder",
    "encode_prompts": "lens_jax.text",
    "LensPipeline": "lens_jax.sampling.pipeline",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lens_jax' has no attribute {name!r}")
