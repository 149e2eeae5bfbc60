"""Scoring speed of ``lens-eval layout``: ``score_images`` on ground-truth renders of held-out prompts.

    .venv/bin/python benchmarks/eval_layout.py [--cases 64:200,256:40,512:20] [--seed 11]

For each ``BASE:N`` case: ``make_eval_set(N, seed, base_size=BASE)``, each prompt rendered at its
own size (``render_layout``), then ``score_images`` timed over the N images after a 2-image warm-up
(which pays the scipy import and the shape prototypes). Prints a markdown table: images, the
shorter sides, total and per-image time, and the overall score (near 1 on ground truth: a check that
the scorer ran on what it should).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for item in text.split(","):
        try:
            base, num = (int(v) for v in item.split(":"))
        except ValueError:
            raise SystemExit(f"--cases: {item!r} is not BASE:N (e.g. 64:200)") from None
        if base < 16 or num < 1:
            raise SystemExit(f"--cases: {item!r} needs BASE >= 16 and N >= 1")
        cases.append((base, num))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="64:200,256:40,512:20",
                        help="comma-separated BASE:N: N held-out prompts of training buckets at base size BASE")
    parser.add_argument("--seed", type=int, default=11, help="seed of the held-out prompts")
    args = parser.parse_args()

    from lens_jax.data.synth_shapes import render_layout
    from lens_jax.eval.layout import make_eval_set, score_images

    rows = []
    for base, num in parse_cases(args.cases):
        prompts = make_eval_set(num, seed=args.seed, base_size=base)
        images = [render_layout(p.layout, p.width, p.height) for p in prompts]
        layouts = [p.layout for p in prompts]
        score_images(images[:2], layouts[:2])  # warm-up
        start = time.perf_counter()
        report = score_images(images, layouts)
        seconds = time.perf_counter() - start
        sides = [min(p.width, p.height) for p in prompts]
        rows.append((base, num, f"{min(sides)}-{max(sides)}", seconds, report["overall"]))
        print(f"base {base}: {num} images in {seconds:.2f} s", file=sys.stderr, flush=True)

    print("| base size | images | shorter side (px) | time (s) | per image (ms) | overall score |")
    print("|---|---|---|---|---|---|")
    for base, num, sides, seconds, overall in rows:
        print(f"| {base} | {num} | {sides} | {seconds:.2f} | {1000 * seconds / num:.1f} | {overall:.3f} |")


if __name__ == "__main__":
    main()
