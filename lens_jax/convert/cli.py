"""lens-convert: move Lens denoiser weights between diffusers folders and orbax checkpoints.

  lens-convert to-orbax     --src CKPT/transformer --out OUT   # diffusers folder -> orbax
  lens-convert to-diffusers --src OUT --out CKPT2/transformer  # orbax (or diffusers) -> diffusers
  lens-convert inspect      --src DIR                          # config, tensor count, parameters
  lens-convert random       --out DIR --preset tiny            # a random Lens checkpoint (HF layout)

Conversions stream block by block (about one block in memory), write to a temporary folder and
rename it at the end (Ctrl-C or a kill leaves no half-written output; temporary folders of a
killed run are cleaned or reported by the next one). --out may not contain, equal or lie inside
--src, and --overwrite replaces only a folder holding what the command writes. Only safetensors
are read: pickled .bin/.pt/.ckpt files are refused. inspect checks the files themselves
(safetensors headers against file sizes, every tensor present with its shape) and exits 2 on a
broken checkpoint. --src and --out may be gs://BUCKET/PATH: a source is copied to a local
temporary folder first, an output is built locally and uploaded with its JSON files last.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence

import numpy as np

from lens_jax import storage
from lens_jax.errors import CheckpointError

DTYPES = ("float32", "bfloat16", "float16")
# What ``lens-convert random`` writes into its output folder (``--overwrite`` replaces no other).
RANDOM_PATTERNS = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer",
                   "scheduler")


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"--max-shard-size {text!r}: expected e.g. 2GB, 500MB")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("to-orbax", "diffusers folder (or orbax) -> lens_jax orbax checkpoint"),
                            ("to-diffusers", "orbax checkpoint (or diffusers) -> diffusers folder")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--src", required=True,
                       help="source: a diffusers transformer/ folder (config.json + safetensors) "
                            "or an orbax checkpoint written by lens-convert")
        p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
        p.add_argument("--dtype", choices=DTYPES, default=None,
                       help="cast every tensor to this dtype (default: keep the source's)")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        if name == "to-diffusers":
            p.add_argument("--max-shard-size", type=_size, default=2 << 30,
                           help="largest safetensors shard, e.g. 2GB (default), 500MB")
    inspect_help = ("check a checkpoint's files (headers, sizes, every tensor and its shape) without "
                    "reading the weights, and print its config and size; exit 2 if it is broken")
    p = sub.add_parser("inspect", help=inspect_help, description=inspect_help)
    p.add_argument("--src", required=True, help="a diffusers folder or an orbax checkpoint")
    random_help = ("write a random Lens checkpoint in the full Hugging Face layout (model_index.json, "
                   "transformer/, vae/, text_encoder/, tokenizer/, scheduler/) to try the tools")
    p = sub.add_parser("random", help=random_help, description=random_help)
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--preset", choices=("tiny", "small", "full"), default="tiny",
                   help="tiny: ~30 MB, seconds on a CPU; small: ~150 MB; full: the real shapes "
                        "(~22 GB: bf16 denoiser, MXFP4 text encoder), written tensor by tensor")
    p.add_argument("--seed", type=int, default=0, help="random seed of every tensor")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps glibc's malloc arenas (``M_ARENA_MAX``) for the threads started after this call.

    orbax/tensorstore read and write from many threads; with glibc's default of up to 8 arenas
    per core, freed tensor buffers stay spread over the arenas and resident memory creeps from
    ~1.7 GiB to ~3 GiB on the full model. No-op where glibc is absent.
    """
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        try:
            ctypes.CDLL(name).mallopt(-8, arenas)  # -8 = M_ARENA_MAX
        except (OSError, AttributeError):
            pass


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    limit_malloc_arenas()
    args = build_parser().parse_args(argv)
    from lens_jax import output_guard
    from lens_jax.checkpoints import transformer as tconv
    from lens_jax.models import config as config_lib
    try:
        if args.command == "random":
            from lens_jax.checkpoints import random_checkpoint
            if args.overwrite:
                output_guard.check_replaceable(args.out, RANDOM_PATTERNS, "lens-convert random")
            size = random_checkpoint.estimated_bytes(args.preset)
            print(f"writing a random {args.preset} Lens checkpoint (~{size / 1e9:.2f} GB) to {args.out}")
            with output_guard.interrupts_raise():
                out = random_checkpoint.write_random_checkpoint(
                    args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
            print(f"wrote {out}")
            return 0
        if args.command == "inspect":
            cfg = tconv.read_config(args.src)
            size = tconv.check_checkpoint(args.src, cfg)  # headers, sizes, keys, shapes
            shapes = [m.torch_shape for m in tconv.transformer_mappings(cfg)]
            print(f"{args.src}: {'orbax' if tconv.is_orbax(storage.native(args.src)) else 'diffusers'}")
            for k, v in config_lib.to_diffusers_config(cfg).items():
                print(f"  {k}: {v}")
            print(f"  tensors: {len(shapes)} (all present, shapes checked)")
            print(f"  parameters: {sum(int(np.prod(s)) for s in shapes):,}")
            print(f"  bytes on disk: {size:,}")
            return 0
        to = "orbax" if args.command == "to-orbax" else "diffusers"
        with output_guard.interrupts_raise():
            out = tconv.convert(args.src, args.out, to=to, dtype=args.dtype,
                                max_shard_bytes=getattr(args, "max_shard_size", 2 << 30),
                                overwrite=args.overwrite)
            output_guard.raise_if_interrupted()
        print(f"wrote {out}")
        return 0
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"lens-convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"lens-convert: interrupted ({e or 'Ctrl-C'}); nothing was written to "
              f"{getattr(args, 'out', '')}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
