"""``lens-train export --workdir DIR [--step N] [--raw] --out DIR``: saved weights -> diffusers folder.

Reads the run's ``config.json`` and restores only the wanted weights (EMA by default, or the raw
parameters with ``--raw``) of a checkpoint as host numpy arrays (no optimizer state, no devices
needed), then writes a diffusers ``LensTransformer2DModel`` folder with ``save_transformer``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_collections
import numpy as np

from lens_jax import storage
from lens_jax.train.run_files import restore_items, run_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lens-train export", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True,
                   help="training run directory, local or gs://BUCKET/PATH (holds config.json, checkpoints/)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step to export (default: the newest)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="ema", action="store_true", default=True,
                         help="export the EMA weights (default; the raw ones when the run kept no EMA)")
    weights.add_argument("--raw", dest="ema", action="store_false", help="export the raw (non-EMA) parameters")
    p.add_argument("--out", required=True,
                   help="output diffusers folder, local or gs:// (written atomically; on gs://, its "
                        "config.json is uploaded last)")
    p.add_argument("--dtype", default="", help="tensor dtype in the folder: float32, bfloat16 (default: as trained)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    lora = p.add_argument_group("LoRA runs (config.lora.rank >= 1)")
    lora.add_argument("--lora", action="store_true",
                      help="write the adapter: OUT/pytorch_lora_weights.safetensors (PEFT keys, no "
                           "prefix) + OUT/adapter_config.json (r, lora_alpha, target_modules)")
    lora.add_argument("--lora-format", choices=("peft", "kohya"), default="peft",
                      help="key spelling of --lora: peft (diffusers, default) or kohya "
                           "(lora_unet_..._lora_down/up + alpha)")
    lora.add_argument("--merge", action="store_true",
                      help="write a full diffusers transformer folder with the adapter merged in")
    lora.add_argument("--lora-scale", type=float, default=1.0,
                      help="--merge: scale of the adapter (W + scale * alpha/r * B A; default 1)")
    return p


def restore_weights(workdir: str | Path, step: int = -1, ema: bool = True) -> tuple[dict, int, str]:
    """``(nested dict of numpy arrays, step, "ema"|"params")`` from a run's checkpoint."""
    import jax
    from flax import nnx

    from lens_jax.models.transformer import abstract_model

    config = run_config(workdir)
    name = "ema" if ema and float(config.ema.decay) > 0 else "params"
    if "lora" in config and int(config.lora.rank) > 0:  # the base with the adapters merged in
        from lens_jax.lora.export import restore_merged

        return restore_merged(workdir, step, ema)
    abstract = nnx.to_pure_dict(nnx.split(abstract_model(config.model))[1])
    item = {name: jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)}
    out, step = restore_items(workdir, step, item)
    return out[name], step, name


def export(workdir: str | Path, out: str | Path, step: int = -1, ema: bool = True, dtype: str = "",
           overwrite: bool = False) -> Path:
    from lens_jax.checkpoints import keymap
    from lens_jax.checkpoints.transformer import model_from_params, save_transformer

    config = run_config(workdir)
    params, step, name = restore_weights(workdir, step, ema)
    cfg = ml_collections.ConfigDict(config.model.to_dict())
    cfg.param_dtype = str(np.asarray(next(iter(keymap.flatten(params).values()))).dtype)
    cfg.dtype = cfg.param_dtype
    model = model_from_params(cfg, keymap.flatten(params))
    path = save_transformer(model, out, dtype=np.dtype(dtype) if dtype else None, overwrite=overwrite)
    print(f"exported {name} weights of step {step} from {workdir} to {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    import contextlib

    from lens_jax import output_guard
    from lens_jax.checkpoints.transformer import DIFFUSERS_PATTERNS
    from lens_jax.train import workdir_lock

    args = build_parser().parse_args(argv)
    try:
        workdir = storage.path(args.workdir)  # local or gs://
        output_guard.check_output(args.out, {"--workdir checkpoints": workdir / "checkpoints",
                                             "--workdir config": workdir / "config.json"})
        if args.lora and args.merge:
            raise ValueError("--lora and --merge: choose one (the adapter file or the merged model)")
        if args.overwrite:
            patterns = (("pytorch_lora_weights.safetensors", "adapter_config.json") if args.lora
                        else DIFFUSERS_PATTERNS)
            output_guard.check_replaceable(args.out, patterns, "lens-train export")
        # Writing into the run directory takes its lock: refused while lens-train runs there.
        inside = output_guard.is_within(args.out, args.workdir)
        with (workdir_lock.acquire(args.workdir, "lens-train export") if inside
              else contextlib.nullcontext()):
            if args.lora or args.merge:
                from lens_jax.lora import export as lora_export

                lora_export.export(args.workdir, args.out, args.step, args.ema, merge=args.merge,
                                   spelling=args.lora_format, scale=args.lora_scale,
                                   dtype=args.dtype, overwrite=args.overwrite)
            else:
                export(args.workdir, args.out, args.step, args.ema, args.dtype, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, workdir_lock.WorkdirLocked) as e:
        print(f"lens-train export: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
