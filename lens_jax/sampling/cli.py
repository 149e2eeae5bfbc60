"""lens-sample: text to images with a Lens checkpoint, one PNG + one JSON sidecar per image.

  lens-sample --model path/to/Lens --prompt "a red cube on a table" --out out/
  lens-sample --model path/to/Lens-Turbo --prompts-file prompts.jsonl --bucket 1024:3:4 --out out/
  lens-sample --model path/to/Lens --replay out/00003.json --out again/    # reproduce one image

Image k of a run (prompt-major: every image of prompt 1, then prompt 2, ...) is {k:05d}.png;
its sidecar {k:05d}.json holds every setting (prompt, negative prompt, seed, image index,
steps, guidance, size, date, model, dtype, package version). The starting noise of an image
depends only on (seed, image index), so batch size and device count do not change it.
Every argument is checked before any weight is read. --out may not be (or lie inside, or
contain) the --model folder. A random checkpoint to try this with:
lens-convert random --out /tmp/lens-tiny --preset tiny
lens-sample compile --topology v5e-8 compiles the sampler for a TPU host and prints its memory
(lens_jax.sampling.compile).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lens_jax import storage
from lens_jax.sampling.resolution import parse_bucket, parse_size

DTYPES = ("float32", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens-sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="Lens checkpoint folder in the Hugging Face layout (model_index.json, "
                             "transformer/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub id "
                             "such as microsoft/Lens (downloaded with huggingface_hub if installed)")
    src = parser.add_argument_group("prompts (at least one of --prompt, --prompts-file, --replay)")
    src.add_argument("--prompt", action="append", default=[],
                     help="a prompt; repeat the flag for several")
    src.add_argument("--prompts-file",
                     help="a text file with one prompt per line, or JSONL with one object per line: "
                          '{"prompt": ..., "negative_prompt": ... (optional)}')
    src.add_argument("--replay", metavar="JSON",
                     help="a sidecar JSON written by lens-sample: regenerate that image with its "
                          "settings (prompt, seed, index, size, steps, guidance, date)")
    parser.add_argument("--negative-prompt", default="",
                        help='negative prompt for every prompt (default "": zero features)')
    parser.add_argument("--preset", choices=("lens", "lens-turbo", "lens-base"), default=None,
                        help="sampler defaults: lens = 20 steps / CFG 5, lens-turbo = 4 / 1, "
                             "lens-base = 50 / 5 (default: guessed from the model name)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size", default=None, help="image size WIDTHxHEIGHT, multiples of 16 "
                                                  "(default 1024x1024)")
    size.add_argument("--bucket", default=None,
                      help="an official bucket BASE:W:H, e.g. 1024:3:4 (864x1152) or 1440:1:1")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: preset)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale; 1 disables the unconditional pass "
                             "(default: preset)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed, 0 <= seed < 2^32 (default: %(default)s)")
    parser.add_argument("--num-images-per-prompt", type=int, default=1,
                        help="images per prompt (default: %(default)s)")
    parser.add_argument("--first-index", type=int, default=0,
                        help="image index of the first image, to continue a run without repeating "
                             "noise (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per denoising batch, sharded over the local devices "
                             "(default: %(default)s)")
    parser.add_argument("--date", default=None,
                        help="YYYY-MM-DD rendered into the prompt template (default: today); it "
                             "changes the text features, so keep it to reproduce images")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute/parameter dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--devices", type=int, default=None,
                        help="use the first N local devices (default: all)")
    parser.add_argument("--placement", choices=("auto", "first_chip", "sharded"), default="auto",
                        help="where the weights live: first_chip (GPT-OSS and the VAE on the first "
                             "device, the denoiser on every device), sharded (GPT-OSS's experts and "
                             "both networks' weights split over the devices: 16 GiB chips such as "
                             "v5e), auto (sharded when the weights take more than 3/4 of a device's "
                             "memory; default)")
    parser.add_argument("--bf16-timesteps", action="store_true",
                        help="round the model's time input like the bf16 reference pipeline")
    parser.add_argument("--compilation-cache", default=None, metavar="DIR",
                        help="jax persistent compilation cache folder (default: "
                             "$LENS_JAX_COMPILATION_CACHE or ~/.cache/lens_jax/jax_cache)")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="do not use the persistent compilation cache")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="merge a LoRA file into the denoiser at SCALE (default 1); repeatable. "
                             "PEFT/diffusers (transformer_blocks.N.MODULE.lora_A/B.weight, any "
                             "transformer./diffusion_model. prefix) or kohya keys "
                             "(lora_unet_..., lora_down/lora_up/alpha); FILE may be the folder of "
                             "pytorch_lora_weights.safetensors")
    parser.add_argument("--out", required=True, help="output folder, local or gs://BUCKET/PATH (created if missing)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing {k:05d}.png/.json files in --out")
    return parser


def read_prompts_file(path: str | os.PathLike) -> list[dict]:
    """A prompts file -> ``[{"prompt": ..., "negative_prompt": ...?}]`` (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts-file {path}: no such file")
    jobs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({e})") from e
                if not isinstance(item.get("prompt"), str):
                    raise ValueError(f"{path}:{line_no}: a JSONL line needs a string \"prompt\"")
                jobs.append({k: item[k] for k in ("prompt", "negative_prompt") if k in item})
            else:
                jobs.append({"prompt": line})
    if not jobs:
        raise ValueError(f"--prompts-file {path}: no prompts")
    return jobs


def main(argv: Sequence[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else list(argv))[:1] == ["compile"]:  # lens-sample compile
        from lens_jax.sampling import compile as compile_lib

        return compile_lib.main((sys.argv[1:] if argv is None else list(argv))[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"lens-sample: error: {e}", file=sys.stderr)
        return 2


# Fields a replay sidecar must hold (written by every lens-sample run).
REPLAY_FIELDS = {"prompt": str, "negative_prompt": str, "height": int, "width": int,
                 "num_inference_steps": int, "guidance_scale": (int, float), "seed": int,
                 "image_index": int, "date": str}


def read_replay(path: str | os.PathLike) -> dict:
    """A sidecar JSON written by lens-sample, checked: every field of ``REPLAY_FIELDS`` present
    with its type (``ValueError`` naming the file and the missing or wrong fields)."""
    try:
        with open(path, encoding="utf-8") as f:
            replay = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--replay {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--replay {path}: not a JSON sidecar ({e})") from None
    if not isinstance(replay, dict):
        raise ValueError(f"--replay {path}: expected a JSON object written by lens-sample, found "
                         f"a {type(replay).__name__}")
    missing = [k for k in REPLAY_FIELDS if k not in replay]
    if missing:
        raise ValueError(f"--replay {path}: missing field(s) {', '.join(missing)}")
    wrong = [f"{k} ({replay[k]!r})" for k, kind in REPLAY_FIELDS.items()
             if not isinstance(replay[k], kind) or isinstance(replay[k], bool)]
    if wrong:
        raise ValueError(f"--replay {path}: field(s) of the wrong type: {', '.join(wrong)}")
    return replay


def check_settings(*, steps: int | None, guidance: float | None, seed: int, first_index: int,
                   batch_size: int, n_per_prompt: int, devices: int | None) -> None:
    """Every numeric argument, before anything is loaded (``ValueError`` naming the flag)."""
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps}: must be >= 1")
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"--guidance {guidance}: must be a finite number")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"--seed {seed}: must be in [0, 2^32)")
    if first_index < 0:
        raise ValueError(f"--first-index {first_index}: must be >= 0")
    if batch_size < 1 or n_per_prompt < 1:
        raise ValueError("--batch-size and --num-images-per-prompt must be >= 1")
    if devices is not None:
        import jax

        if not 1 <= devices <= jax.local_device_count():
            raise ValueError(f"--devices {devices}: {jax.local_device_count()} local device(s) "
                             f"available ({jax.default_backend()})")


def parse_lora(spec: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> ``(FILE, SCALE)``; the file must exist."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = spec
    if not Path(path).exists():
        raise FileNotFoundError(f"--lora {spec}: {path} not found")
    return path, scale


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lens_jax import output_guard

    jobs: list[dict] = [{"prompt": p} for p in args.prompt]
    if args.prompts_file:
        jobs += read_prompts_file(args.prompts_file)
    replay = None
    if args.replay:
        replay = read_replay(args.replay)
        jobs.append({"prompt": replay["prompt"], "negative_prompt": replay["negative_prompt"]})
    if not jobs:
        raise ValueError("give at least one --prompt, a --prompts-file or --replay")
    if replay is not None and len(jobs) != 1:
        raise ValueError("--replay regenerates one image: do not combine it with --prompt/--prompts-file")
    for job in jobs:
        job.setdefault("negative_prompt", args.negative_prompt)

    if args.bucket:
        height, width = parse_bucket(args.bucket)
    elif args.size:
        height, width = parse_size(args.size)
    elif replay is not None:
        height, width = replay["height"], replay["width"]
    else:
        height, width = 1024, 1024
    steps, guidance, seed, first_index = args.steps, args.guidance, args.seed, args.first_index
    date, n_per_prompt = args.date, args.num_images_per_prompt
    if replay is not None:
        steps = steps or replay["num_inference_steps"]
        guidance = replay["guidance_scale"] if guidance is None else guidance
        seed, first_index, n_per_prompt = replay["seed"], replay["image_index"], 1
        date = date or replay["date"]
    check_settings(steps=steps, guidance=guidance, seed=seed, first_index=first_index,
                   batch_size=args.batch_size, n_per_prompt=n_per_prompt, devices=args.devices)

    from lens_jax.sampling.pipeline import LensPipeline, date_string
    from lens_jax.sampling.resolution import check_resolution

    check_resolution(height, width)  # fail before loading anything
    loras = [parse_lora(spec) for spec in args.lora]
    date = date_string(date)
    images = [(job, first_index + k) for k, job in
              enumerate(j for j in jobs for _ in range(n_per_prompt))]
    out = storage.native(args.out)  # local or gs://
    output_guard.check_output(args.out, {"--model": args.model})
    written = ({(out / f"{i:05d}{ext}").resolve() for _, i in images for ext in (".png", ".json")}
               if not storage.is_remote(out) else set())
    for flag, path in (("--replay", args.replay), ("--prompts-file", args.prompts_file)):
        if path and Path(path).resolve() in written:
            raise ValueError(f"{flag} {path} is one of the files this run writes in --out {out}; "
                             "choose another --out")
    if not args.overwrite:
        taken = [f"{i:05d}.png" for _, i in images if (out / f"{i:05d}.png").exists()]
        if taken:
            raise FileExistsError(f"{out}: {', '.join(taken[:5])} already exist (pass --overwrite)")

    cache = False if args.no_compilation_cache else (args.compilation_cache or True)
    pipe = LensPipeline.from_pretrained(args.model, preset=args.preset, dtype=args.dtype,
                                        devices=args.devices, bf16_timesteps=args.bf16_timesteps,
                                        placement=args.placement,
                                        compilation_cache=cache, progress=True)
    for path, scale in loras:
        pipe.load_lora(path, scale)
        logging.info("merged LoRA %s at scale %g", path, scale)
    logging.info("%s", pipe)
    storage.makedirs(out)  # only now: a failed load leaves no empty folder (gs://: none needed)
    bar = tqdm(total=len(images), desc="images", unit="img")
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        # The last, short batch is filled with repeats of its last image (dropped afterwards) so
        # that every batch has one shape and the compiled loop is reused.
        filled = chunk + [chunk[-1]] * (args.batch_size - len(chunk))
        result = pipe([j["prompt"] for j, _ in filled], [j["negative_prompt"] for j, _ in filled],
                      height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                      seed=seed, first_index=chunk[0][1], date=date)
        for k, (_, index) in enumerate(chunk):
            settings = dict(result.settings[k], size=f"{width}x{height}", file=f"{index:05d}.png",
                            model=str(args.model))
            if loras:
                settings["loras"] = [{"file": str(p), "scale": sc} for p, sc in loras]
            assert settings["image_index"] == index
            png = io.BytesIO()
            result.images[k].save(png, format="PNG")
            storage.write_bytes(out / f"{index:05d}.png", png.getvalue())  # whole, local or gs://
            storage.write_text(out / f"{index:05d}.json",
                               json.dumps(settings, indent=2, sort_keys=True, allow_nan=False) + "\n")
        bar.set_postfix(denoise_s=f"{result.timings['denoising']:.2f}")
        bar.update(len(chunk))
    bar.close()
    print(f"wrote {len(images)} image(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
