"""Data side of lens_jax: the record format (``records``), dataset tools (``cli``: ``lens-data``),
a TFDS builder (``tfds_builder``), synthetic shapes (``synth_shapes``) and the grain input pipeline.

Submodules are imported explicitly; nothing heavy is imported here.
"""
