"""Fixtures' builders: tiny random Lens denoiser checkpoints in the real diffusers on-disk layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lens_jax.models import config as config_lib
from tests.reference.lens_torch import LensTransformerReference, randomize_


def reference_from_config(cfg, seed: int = 0) -> LensTransformerReference:
    """The PyTorch reference for our config, every tensor random."""
    model = LensTransformerReference(
        num_layers=cfg.num_layers, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, patch_size=cfg.patch_size,
        enc_hidden_dim=cfg.enc_hidden_dim, num_features=len(cfg.selected_layer_index),
        axes_dims_rope=tuple(cfg.axes_dims_rope))
    return randomize_(model, seed).eval()


def write_diffusers_folder(model: torch.nn.Module, cfg, out: Path, dtype=torch.float32,
                           shards: int = 1) -> Path:
    """``config.json`` + safetensors (``shards`` > 1: sharded with an index), as diffusers writes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_lib.to_diffusers_config(cfg)))
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    keys = list(state)
    if shards == 1:
        save_file(state, str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for s in range(shards):
        name = f"diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out
