"""``lens-eval``: evaluation of generated images.

  lens-eval prompts --num 200 --seed 0 --base-size 64 --out eval_prompts.jsonl [--render DIR]
  lens-eval layout DIR [--out report.json]

``prompts`` writes held-out prompts of the synthetic coloured-shapes task (a seed stream disjoint
from ``lens-data synth-shapes``), one JSON object per line: ``{"index", "prompt", "caption",
"short_caption", "width", "height", "layout"}`` (``prompt``: the caption chosen by
--prompt-key; ``lens-sample --prompts-file`` reads it); ``--render DIR`` also writes their
ground-truth images with sidecars (what a perfect model would produce: they score 1.0).

``layout`` scores a folder of generated images against their prompts: every ``NAME.png`` (or
.jpg/.jpeg/.webp) needs a sidecar ``NAME.json`` holding ``{"layout": {...}}`` (the prompt's
ground-truth layout; ``caption``/``short_caption`` and other keys are kept but not used), or,
with ``--prompts FILE``, a ``prompt`` found in that prompts file (lens-sample's sidecars). It
prints a per-category table (object present, count, colour, single-object colour, shape,
position, region, colour binding) and writes the full report, per image included, with --out.
The categories and rules are in docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from lens_jax.data.synth_shapes import ASPECTS, PLACEMENTS, SHORT_CAPTION_STYLES
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _groups(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 512,768,1024, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens-eval", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "layout", help="score generated images of shapes prompts (per category)",
        description="Score a folder of generated images against their prompts' layouts by colour "
                    "segmentation and geometry; print the per-category table (object_present, "
                    "count, colour, single_object_colour, shape, position, region, "
                    "colour_binding; rules in docs/eval.md). Each NAME.png (.jpg/.jpeg/.webp) "
                    "needs a sidecar NAME.json: {\"layout\": {...}, \"caption\": ...} with the "
                    "layout of a 'lens-eval prompts' line (or a synth-shapes record's "
                    "metadata), or {\"prompt\": ...} together with --prompts.")
    p.add_argument("folder", help="folder of generated images with JSON sidecars")
    p.add_argument("--out", default=None,
                   help="write the JSON report (categories, overall, per image) to this file")
    p.add_argument("--prompts", default=None,
                   help="JSONL of lens-eval prompts: sidecars without a 'layout' (e.g. those of "
                        "lens-sample) are matched to it by their 'prompt' text")
    p.add_argument("--prompt-kind", choices=("dense", "short", "auto"), default="dense",
                   help="what the images were generated from: dense captions (default: every "
                        "category applies), short captions (they name no positions: position "
                        "and region, and colour of several objects, do not apply), or auto: per "
                        "image, short when its sidecar's 'prompt' is its 'short_caption'")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="score only the first N images (sorted by file name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--held-out-colors", default="",
                   help="comma-separated held-out colours (lens_jax.data.synth_shapes."
                        "HELD_OUT_COLORS: cyan, lime) to segment every image with, besides the "
                        "eight (a layout that names one always adds it): e.g. to catch a LoRA's "
                        "new colour painted for prompts of the old ones")

    p = sub.add_parser("prompts", help="write held-out evaluation prompts (JSONL)",
                       description="Write held-out prompts of the synthetic shapes task, from a "
                                   "seed stream disjoint from lens-data synth-shapes.")
    p.add_argument("--num", type=_positive_int, required=True, help="number of prompts")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation stream (default 0)")
    p.add_argument("--base-size", type=_positive_int, default=64,
                   help="image sizes: training buckets scaled by base/512 (default 64)")
    p.add_argument("--groups", type=_groups, default=(512, 768, 1024),
                   help="bucket groups, comma separated (default 512,768,1024)")
    p.add_argument("--prompt-key", choices=("caption", "short_caption"), default="caption",
                   help="which caption goes into each line's 'prompt' (what lens-sample "
                        "--prompts-file reads; default: the dense caption)")
    p.add_argument("--short-style", choices=SHORT_CAPTION_STYLES, default="plain",
                   help="style of each line's short_caption, as lens-data synth-shapes "
                        "--short-style (default plain)")
    p.add_argument("--placement", choices=PLACEMENTS, default="free",
                   help="where the layouts' objects go, as lens-data synth-shapes --placement "
                        "(default free)")
    p.add_argument("--aspect", choices=ASPECTS, default="all",
                   help="image sizes, as lens-data synth-shapes --aspect: 'all' nine aspect "
                        "ratios of each group (default), 'square' only")
    p.add_argument("--unbalanced", action="store_true",
                   help="object counts as in training (default: 1-4 objects in equal shares)")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--render", default=None,
                   help="also write ground-truth images + sidecars to this folder")
    return parser


def _write_atomic(path: str, write) -> None:
    """``write(file)`` into ``path`` through a temporary file: nothing half-written on failure."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sidecar_prompt_kind(image_path: str) -> str:
    """"short" when the sidecar's ``prompt`` is its ``short_caption`` (and not its caption)."""
    with open(os.path.splitext(image_path)[0] + ".json", encoding="utf-8") as f:
        meta = json.load(f)
    prompt = meta.get("prompt")
    short = prompt is not None and prompt == meta.get("short_caption") != meta.get("caption")
    return "short" if short else "dense"


def run_layout(args: argparse.Namespace) -> int:
    from lens_jax.eval.layout import (ScoreConfig, format_table, load_folder, read_prompts_file,
                                      score_images)

    config = ScoreConfig(extra_colors=tuple(c.strip() for c in args.held_out_colors.split(",")
                                            if c.strip()))
    prompts = read_prompts_file(args.prompts) if args.prompts else None
    images, layouts, names = load_folder(args.folder, limit=args.limit, prompts=prompts)
    kinds: str | list[str] = args.prompt_kind
    if args.prompt_kind == "auto":
        kinds = [_sidecar_prompt_kind(os.path.join(args.folder, n)) for n in names]
    report = score_images(images, layouts, names=names, config=config,
                          show_progress=not args.no_progress, prompt_kind=kinds)
    report["folder"] = os.path.abspath(args.folder)
    print(format_table(report))
    if args.out:
        _write_atomic(args.out, lambda f: json.dump(report, f, indent=1))
        print(f"wrote {args.out}")
    return 0


def run_prompts(args: argparse.Namespace) -> int:
    from lens_jax.eval.layout import make_eval_set, render_eval_set

    prompts = make_eval_set(args.num, seed=args.seed, base_size=args.base_size,
                            groups=args.groups, balanced=not args.unbalanced,
                            short_style=args.short_style, placement=args.placement,
                            aspect=args.aspect)
    def write(f) -> None:
        for index, p in enumerate(prompts):
            prompt = p.caption if args.prompt_key == "caption" else p.short_caption
            f.write(json.dumps({"index": index, "prompt": prompt, "caption": p.caption,
                                "short_caption": p.short_caption, "width": p.width,
                                "height": p.height, "layout": p.layout}, sort_keys=True) + "\n")

    _write_atomic(args.out, write)
    print(f"wrote {len(prompts)} prompts to {args.out}")
    if args.render:
        render_eval_set(prompts, args.render)
        print(f"wrote {len(prompts)} ground-truth images with sidecars to {args.render}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``lens-eval``."""
    args = build_parser().parse_args(argv)
    run = {"layout": run_layout, "prompts": run_prompts}[args.command]
    try:
        return run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"lens-eval {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
