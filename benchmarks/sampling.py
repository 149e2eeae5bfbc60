# Sampling speed of LensPipeline, split into text encoding / denoising / decoding, compile apart:
#   python benchmarks/sampling.py                                 # CPU: random "small" checkpoint, 256x256
#   python benchmarks/sampling.py --model /ckpt/Lens --size 1024 --steps 20 --dtype bfloat16   # GPU
"""Times ``LensPipeline`` end to end and per stage; prints a table (seconds per image).

The first call compiles every program (text encoder, denoising loop, VAE decoder) and runs them;
the next ``--repeats`` calls only run. Per stage: warm time = median of the repeats; compile time
= first-call time minus warm time. Without ``--model`` a random checkpoint of ``--random-preset``
is written to a temporary folder first (``lens-convert random``). The persistent compilation cache
is off here so that the compile time is real.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from lens_jax.sampling.pipeline import LensPipeline  # noqa: E402

STAGES = ("text_encoding", "denoising", "decoding")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="Lens checkpoint folder (default: a random one)")
    parser.add_argument("--random-preset", choices=("tiny", "small"), default="small",
                        help="size of the random checkpoint written when --model is not given")
    parser.add_argument("--size", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale (1 = no uncond pass)")
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--devices", type=int, default=None, help="local devices (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed warm calls")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from lens_jax.checkpoints.random_checkpoint import write_random_checkpoint
            model = write_random_checkpoint(Path(tmp) / f"lens-{args.random_preset}",
                                            preset=args.random_preset, progress=False)
        start = time.perf_counter()
        pipe = LensPipeline.from_pretrained(model, dtype=args.dtype, devices=args.devices,
                                            compilation_cache=False)
        load_s = time.perf_counter() - start
        prompts = [f"a photo of object number {i} on a table, studio light" for i in range(args.batch)]
        call = dict(height=args.size, width=args.size, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, seed=0, date="2025-06-12")
        start = time.perf_counter()
        first = pipe(prompts, **call)
        first_total = time.perf_counter() - start
        warm = [pipe(prompts, **call).timings for _ in range(args.repeats)]

    c = pipe.transformer.config
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"backend {jax.default_backend()}, {len(pipe.devices)} device(s)")
    print(f"# model: {model if args.model else 'random ' + args.random_preset} "
          f"(denoiser {c.num_layers} blocks x width {c.num_attention_heads * c.attention_head_dim}), "
          f"dtype {pipe.dtype.name}; {args.size}x{args.size}, {args.steps} steps, CFG {args.guidance:g}, "
          f"batch {args.batch}; load {load_s:.1f} s")
    print("| stage | warm s/call | warm s/image | compile s |")
    print("|---|---|---|---|")
    total_warm = 0.0
    for stage in STAGES:
        w = statistics.median(t[stage] for t in warm)
        total_warm += w
        print(f"| {stage} | {w:.3f} | {w / args.batch:.3f} | {max(0.0, first.timings[stage] - w):.1f} |")
    print(f"| total | {total_warm:.3f} | {total_warm / args.batch:.3f} | "
          f"{max(0.0, first_total - total_warm):.1f} |")
    per_step = statistics.median(t["denoising"] for t in warm) / args.steps
    print(f"denoising: {per_step * 1000:.1f} ms per step for the batch of {args.batch}")


if __name__ == "__main__":
    main()
