"""Evaluation of generated images (``lens-eval``).

``layout``: a deterministic prompt-following score on the synthetic coloured-shapes task
(GenEval-style categories computed by colour segmentation and geometry). Submodules are imported
explicitly; nothing heavy is imported here.
"""
