"""Training: sharded flow-matching training of the Lens denoiser (optax, orbax, grain).

Entry points: ``lens-train`` (``lens_jax.train.cli``), ``lens_jax.train.loop.train(config, workdir)``,
``lens-train export`` (``lens_jax.train.export``), ``python -m lens_jax.train.evaluate``. Design and figures: docs/training.md.
"""
