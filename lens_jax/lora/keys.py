"""LoRA target modules and the two key spellings of LoRA files (issue 16).

Targets are named as in diffusers' ``LensTransformer2DModel`` (module paths inside
``transformer_blocks.{N}``); each maps to one stacked kernel of ``models.transformer.BlockStack``.

- PEFT / diffusers (``save_lora_adapter``): ``transformer_blocks.{N}.{module}.lora_A.weight``
  ``[r, in]`` and ``.lora_B.weight`` ``[out, r]``, optionally under a ``transformer.``,
  ``diffusion_model.`` or ``base_model.model.`` prefix (PEFT may also insert the adapter name:
  ``lora_A.default.weight``);
- kohya: ``lora_unet_transformer_blocks_{N}_{module with "." -> "_"}.lora_down.weight`` (= A),
  ``.lora_up.weight`` (= B) and ``.alpha`` (a scalar).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

# diffusers module name -> parameter name in BlockStack, and how many leading kernel axes are inputs
TARGETS: dict[str, str] = {
    "attn.img_qkv": "img_qkv",
    "attn.txt_qkv": "txt_qkv",
    "attn.to_out.0": "img_out",
    "attn.to_add_out": "txt_out",
    "img_mlp.w1": "img_mlp_w1",
    "img_mlp.w2": "img_mlp_w2",
    "img_mlp.w3": "img_mlp_w3",
    "txt_mlp.w1": "txt_mlp_w1",
    "txt_mlp.w2": "txt_mlp_w2",
    "txt_mlp.w3": "txt_mlp_w3",
    "img_mod.1": "img_mod",
    "txt_mod.1": "txt_mod",
}
INPUT_AXES = {"img_out": 2, "txt_out": 2}  # [heads, head_dim] in; every other kernel has one input axis
PEFT_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_KOHYA_MODULES = {m.replace(".", "_"): m for m in TARGETS}
_PEFT_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight$")
_PEFT_ALPHA_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.alpha$")
_KOHYA_RE = re.compile(r"^transformer_blocks_(\d+)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def input_axes(param: str) -> int:
    return INPUT_AXES.get(param, 1)


def select_targets(patterns: str | Sequence[str]) -> tuple[str, ...]:
    """Module names matching any of ``patterns`` (fnmatch, e.g. ``attn.*``, ``*_mlp.w?``; a comma
    separated string is split), in ``TARGETS`` order. A pattern matching nothing is an error."""
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = set()
    for pattern in patterns:
        hits = [m for m in TARGETS if fnmatch.fnmatchcase(m, pattern)]
        if not hits:
            raise ValueError(f"LoRA target pattern {pattern!r} matches no module; modules: "
                             f"{', '.join(TARGETS)}")
        chosen.update(hits)
    if not chosen:
        raise ValueError("no LoRA target modules given")
    return tuple(m for m in TARGETS if m in chosen)


def peft_key(layer: int, module: str, which: str) -> str:
    """``which``: "A" or "B"."""
    return f"transformer_blocks.{layer}.{module}.lora_{which}.weight"


def kohya_key(layer: int, module: str, which: str) -> str:
    """``which``: "A" (lora_down), "B" (lora_up) or "alpha"."""
    suffix = {"A": "lora_down.weight", "B": "lora_up.weight", "alpha": "alpha"}[which]
    return f"lora_unet_transformer_blocks_{layer}_{module.replace('.', '_')}.{suffix}"


class ParsedKey(NamedTuple):
    layer: int
    module: str          # diffusers module name (may be one that is not a target: checked later)
    which: str           # "A", "B" or "alpha"


def parse_key(key: str) -> ParsedKey | None:
    """The (layer, module, A|B|alpha) of a LoRA file key in either spelling; None if it is neither."""
    for prefix in KOHYA_PREFIXES:
        if key.startswith(prefix):
            m = _KOHYA_RE.match(key[len(prefix):])
            if not m:
                return None
            module = _KOHYA_MODULES.get(m.group(2), m.group(2))
            which = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}[m.group(3)]
            return ParsedKey(int(m.group(1)), module, which)
    stripped = key
    changed = True
    while changed:  # "base_model.model.transformer." and the like
        changed = False
        for prefix in PEFT_PREFIXES:
            if stripped.startswith(prefix):
                stripped, changed = stripped[len(prefix):], True
    m = _PEFT_RE.match(stripped)
    if m:
        return ParsedKey(int(m.group(1)), m.group(2), m.group(3)[-1])
    m = _PEFT_ALPHA_RE.match(stripped)
    if m:
        return ParsedKey(int(m.group(1)), m.group(2), "alpha")
    return None


def spelling(keys: Iterable[str]) -> str:
    """"kohya" when any key has a kohya prefix, else "peft"."""
    return "kohya" if any(k.startswith(KOHYA_PREFIXES) for k in keys) else "peft"
