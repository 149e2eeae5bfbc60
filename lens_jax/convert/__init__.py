"""lens-convert, the checkpoint conversion command line (``cli.py``); the reading, writing and
key maps it uses live in ``lens_jax.checkpoints``."""
