"""Text-to-image sampling: scheduler, guidance, the jitted denoising loop and ``LensPipeline``.

Imported lazily: ``from lens_jax.sampling import LensPipeline``.
"""

import importlib

_LAZY = {
    "LensPipeline": "lens_jax.sampling.pipeline",
    "LensOutput": "lens_jax.sampling.pipeline",
    "PRESETS": "lens_jax.sampling.pipeline",
    "official_buckets": "lens_jax.sampling.resolution",
    "check_resolution": "lens_jax.sampling.resolution",
    "sigmas_for": "lens_jax.sampling.scheduler",
    "empirical_mu": "lens_jax.sampling.scheduler",
    "denoise": "lens_jax.sampling.denoise",
    "initial_noise": "lens_jax.sampling.denoise",
    "guide": "lens_jax.sampling.guidance",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lens_jax.sampling' has no attribute {name!r}")
