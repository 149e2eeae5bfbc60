"""Low-rank adapters (LoRA) for the Lens denoiser: training on the scanned blocks, PEFT/kohya files
in and out. ``keys``: the module names and file key spellings; ``adapters``: the math and the
parameter trees; ``files``: reading, writing and merging adapter files; ``trainer``: the LoRA
variant of the training step; ``export``: ``lens-train export --lora/--merge``."""
