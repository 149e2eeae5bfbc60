"""Checkpoints on disk: every read and write of model weights, and the key maps between layouts.

- ``safetensors_io``: the streaming safetensors reader (``SafetensorsFolder``, never unpickles)
  and sharded writer (``ShardedWriter``) every model uses.
- ``keymap``: PyTorch state-dict keys <-> JAX parameter paths (``TensorMapping``).
- ``transformer``: ``load_transformer`` / ``save_transformer`` (diffusers folder or orbax), and the
  streaming diffusers <-> orbax conversion behind ``lens-convert``.
- ``vae``: ``load_vae`` / ``save_vae`` / ``random_vae`` (the model: ``lens_jax.models.vae``).
- ``text_encoder``: ``load_text_encoder`` (the model: ``lens_jax.models.text_encoder``).
- ``random_checkpoint``: a whole random Lens checkpoint in the Hugging Face layout.

Models (``lens_jax.models``) hold no I/O; the ``lens-convert`` command line lives in
``lens_jax.convert.cli``; training-state checkpoints (orbax, resumable runs) in
``lens_jax.train.checkpoint``. Submodules are imported explicitly; nothing heavy is imported here.
"""
