"""``lens-train export --lora`` / ``--merge`` of a LoRA run (``lens_jax.train.export`` parses the flags).

Restores the adapters (EMA when the run kept one, else raw; ``--raw`` forces raw) of a checkpoint as
host arrays; ``--lora`` writes them as a PEFT or kohya file, ``--merge`` also restores the frozen
base and writes a diffusers ``transformer/`` folder with ``W + scale * alpha/r * B A``. A plain
export of a LoRA run (and ``--config.init_from=run:LORA_RUN``) gets the merged weights at scale 1.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np

from lens_jax.lora import adapters as adapters_lib


def _base_template(config: ml_collections.ConfigDict) -> dict:
    from flax import nnx

    from lens_jax.models.transformer import abstract_model

    dtype = np.dtype(config.lora.base_dtype or config.model.param_dtype)
    abstract = nnx.to_pure_dict(nnx.split(abstract_model(config.model))[1])
    return jax.tree.map(lambda x: np.zeros(x.shape, dtype), abstract)


def restore_lora(workdir: str | Path, step: int = -1, ema: bool = True, with_base: bool = False
                 ) -> tuple[dict, dict | None, int, str, adapters_lib.LoraSpec, ml_collections.ConfigDict]:
    """``(adapters, base or None, step, "ema"|"params", spec, config)`` of a LoRA run's checkpoint."""
    from lens_jax.train.run_files import restore_items, run_config

    config = run_config(workdir)
    if "lora" not in config or int(config.lora.rank) <= 0:
        raise ValueError(f"{workdir} is not a LoRA run (config.lora.rank is 0): export it without "
                         "--lora / --merge")
    spec = adapters_lib.LoraSpec.from_config(config.lora)
    name = "ema" if ema and float(config.ema.decay) > 0 else "params"
    base = _base_template(config)
    shapes = adapters_lib.adapter_shapes(spec, base["blocks"])
    item = {name: {p: {k: np.zeros(s, np.float32) for k, s in v.items()} for p, v in shapes.items()}}
    if with_base:
        item["base"] = base
    out, step = restore_items(workdir, step, item)
    return out[name], out.get("base"), step, name, spec, config


def restore_merged(workdir: str | Path, step: int = -1, ema: bool = True, scale: float = 1.0
                   ) -> tuple[dict, int, str]:
    """``(model weights with the adapters merged at scale, step, "ema"|"params")`` of a LoRA run
    (what ``restore_weights`` returns for it: ``init_from=run:LORA_RUN`` and plain export)."""
    lora, base, step, name, spec, _ = restore_lora(workdir, step, ema, with_base=True)
    merged = dict(base, blocks=adapters_lib.merged_blocks(base["blocks"], lora, scale * spec.scale))
    return jax.device_get(merged), step, name


def export(workdir: str | Path, out: str | Path, step: int = -1, ema: bool = True, *,
           merge: bool = False, spelling: str = "peft", scale: float = 1.0, dtype: str = "",
           overwrite: bool = False) -> Path:
    from lens_jax.lora.files import write_lora

    if not merge:
        lora, _, step, name, spec, _ = restore_lora(workdir, step, ema)
        path = write_lora(out, lora, spec, spelling, overwrite=overwrite)
        print(f"exported the {name} LoRA (rank {spec.rank}, alpha {spec.alpha:g}, "
              f"{', '.join(spec.targets)}) of step {step} from {workdir} to {path} ({spelling} keys)")
        return path
    from lens_jax.checkpoints import keymap
    from lens_jax.checkpoints.transformer import model_from_params, save_transformer
    from lens_jax.train.run_files import run_config

    merged, step, name = restore_merged(workdir, step, ema, scale)
    cfg = ml_collections.ConfigDict(run_config(workdir).model.to_dict())
    cfg.param_dtype = str(np.asarray(merged["img_in"]["kernel"]).dtype)
    cfg.dtype = cfg.param_dtype
    model = model_from_params(cfg, keymap.flatten(merged))
    path = save_transformer(model, out, dtype=np.dtype(dtype) if dtype else None, overwrite=overwrite)
    print(f"exported the base with the {name} LoRA of step {step} merged at scale {scale:g} "
          f"from {workdir} to {path}")
    return path
