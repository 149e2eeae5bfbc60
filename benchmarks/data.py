"""Data throughput: ``lens-data build`` records/s per core, the input pipeline's images/s per CPU
core (decode + resize + patchify + pack) and per grain worker at 512^2 and 1024^2, and the rate the
stage-1 / stage-2 configs consume per host (analytic, from their FLOPs per image and an assumed
MFU), hence the workers that keep a host fed (docs/data.md).

    .venv/bin/python benchmarks/data.py [--images 24] [--workers 2] [--build-images 64]
                                        [--mfu 0.4] [--json out.json]

Per-core figures run the per-example loader (JPEG decode, bucket, resize + centre crop, patchify,
tokenize) and the packing/batch build (float32 output) in one thread of the main process. Source
JPEGs are square, quality 90, 1.5x the bucket side (768^2 for the 512 base, 1536^2 for the 1024
base) or 2.5x (2560^2, where JPEG draft decoding at 1/2 scale applies).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lens_jax.data import records  # noqa: E402
from lens_jax.data.buckets import make_buckets  # noqa: E402
from lens_jax.data.packing import PackingConfig, StreamingPacker, build_batch  # noqa: E402
from lens_jax.data.pipeline import _ExampleLoader, default_data_config, make_pipeline  # noqa: E402
from lens_jax.data.tokenize import ByteCaptionTokenizer  # noqa: E402

CAPTION = ("A detailed photograph of a red bicycle leaning against a weathered blue wooden door, "
           "with ivy climbing the brick wall, morning light casting long shadows on the cobbled "
           "street, a small black cat sitting on the step and two potted geraniums by the window.")


def photo_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A photo-like JPEG (smooth colour field + fine noise) of the given size."""
    small = rng.integers(0, 256, (max(height // 64, 2), max(width // 64, 2), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC),
                     np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _raws(n: int, side: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    data = photo_jpeg(rng, side, side)
    return [records.encode_example(records.Example(image_bytes=data, caption=CAPTION, width=side,
                                                   height=side, id=str(i), source="bench"))
            for i in range(n)]


def per_core(base: int, n: int, draft: bool, source_scale: float = 1.5,
             resample: str = "lanczos") -> dict[str, float]:
    """Loader + packing in one thread: images/s."""
    side = int(base * source_scale)
    cfg = default_data_config()
    cfg.base_sizes, cfg.base_probs = (base,), (1.0,)
    cfg.jpeg_draft = draft
    cfg.resample = resample
    cfg.caption_dropout = 0.0
    raws = _raws(n, side)
    loader = _ExampleLoader(raws, cfg, make_buckets((base,)), ByteCaptionTokenizer())
    packing = PackingConfig(image_tokens=cfg.image_tokens, text_tokens=cfg.text_tokens,
                            max_segments=cfg.max_segments, caption_length=cfg.caption_length)
    loader(0, (0, 0, 0))  # warm-up
    t0 = time.perf_counter()
    elements = [loader(i, (i, i, 0)) for i in range(n)]
    t1 = time.perf_counter()
    assert all(not e["skip"] for e in elements)
    stream = iter(elements)
    packer = StreamingPacker(packing, cfg.rows_per_host)
    while (rows := packer.next_rows(lambda: next(stream, None))) is not None:
        build_batch(rows, image_tokens=packing.image_tokens, text_tokens=packing.text_tokens,
                    max_segments=packing.max_segments, caption_length=packing.caption_length)
    t2 = time.perf_counter()
    return {"load_ms": 1e3 * (t1 - t0) / n, "pack_ms": 1e3 * (t2 - t1) / n,
            "images_per_s": n / (t2 - t0)}


def whole_pipeline(n: int, workers: int, batches: int) -> dict[str, float]:
    """make_pipeline over ArrayRecord shards (mixed 512/768/1024 buckets, JPEG sources)."""
    rng = np.random.default_rng(1)
    sides = rng.choice([768, 1152, 1536], size=n, p=[0.6, 0.25, 0.15])
    cache = {s: photo_jpeg(rng, int(s), int(s * 3 // 4)) for s in (768, 1152, 1536)}
    with tempfile.TemporaryDirectory() as tmp:
        records.write_shards(
            (records.Example(image_bytes=cache[int(s)], caption=CAPTION, width=int(s),
                             height=int(s * 3 // 4), id=str(i), source="bench")
             for i, s in enumerate(sides)), os.path.join(tmp, "r"), num_shards=2)
        cfg = default_data_config()
        cfg.path = os.path.join(tmp, "r")
        cfg.worker_count = workers
        cfg.process_index, cfg.process_count = 0, 1
        it = make_pipeline(cfg)
        try:
            t_start = time.perf_counter()
            next(it)  # includes worker start-up
            t0 = time.perf_counter()
            seg0 = it.pack_iterator.segments
            for _ in range(batches):
                next(it)
            t1 = time.perf_counter()
            segs = it.pack_iterator.segments - seg0
            metrics = it.metrics()
        finally:
            it.close()
    return {"startup_s": t0 - t_start, "images_per_s": segs / (t1 - t0),
            "batches_per_s": batches / (t1 - t0),
            "packing_efficiency_total": metrics["data/packing_efficiency/total"],
            "packing_efficiency_image": metrics["data/packing_efficiency/image"]}


def simulated_efficiency(batches: int = 200, seed: int = 0) -> dict[str, float]:
    """Packing efficiency of the default config on the default bucket mix (base areas drawn with
    ``base_probs``, the nine ratios uniform, captions ~N(170, 50) denoiser tokens, 10% dropped to
    a 30-token template scaffold); sizes only, no pixels."""
    cfg = default_data_config()
    packing = PackingConfig(image_tokens=cfg.image_tokens, text_tokens=cfg.text_tokens,
                            max_segments=cfg.max_segments, lookahead=cfg.lookahead,
                            max_wait=cfg.max_wait)
    buckets = make_buckets(tuple(cfg.base_sizes))
    rng = np.random.default_rng(seed)
    bases, probs = list(cfg.base_sizes), np.asarray(cfg.base_probs, float)

    def stream():
        pos = 0
        while True:
            base = bases[rng.choice(len(bases), p=probs / probs.sum())]
            ratio = int(rng.integers(9))
            bucket = next(b for b in buckets if b.base == base and b.ratio_index == ratio)
            n_text = 30 if rng.random() < 0.1 else int(np.clip(rng.normal(170, 50), 20, 415))
            yield {"latent_hw": bucket.latent_hw, "num_text": n_text, "position": pos}
            pos += 1

    source = stream()
    packer = StreamingPacker(packing, cfg.rows_per_host)
    real = np.zeros(2)
    segments = 0
    for _ in range(batches):
        for row in packer.next_rows(lambda: next(source)):
            real += [sum(int(e["latent_hw"][0]) * int(e["latent_hw"][1]) for e in row),
                     sum(e["num_text"] for e in row)]
            segments += len(row)
    rows = batches * cfg.rows_per_host
    return {"image": real[0] / (rows * packing.image_tokens),
            "text": real[1] / (rows * packing.text_tokens),
            "total": real.sum() / (rows * (packing.image_tokens + packing.text_tokens)),
            "segments_per_row": segments / rows,
            "image_tokens_per_image": real[0] / segments,
            "text_tokens_per_image": real[1] / segments}


def build_rate(base: int, n: int, workers: int) -> dict[str, float]:
    """``lens-data build``'s record making (``build.write_items``: PIL full decode, checks,
    encode, ArrayRecord write) over ``n`` photo-like JPEGs of ``base`` x ``base`` (what
    img2dataset writes with ``--image_size base``), in ``workers`` processes: records/s in all and
    per core. Spawning the workers is timed too (run enough images)."""
    from lens_jax.data.build import Item, write_items

    rng = np.random.default_rng(2)
    jpegs = [photo_jpeg(rng, base, base) for _ in range(8)]
    items = [Item(path="", id=str(i), caption=CAPTION, data=jpegs[i % len(jpegs)])
             for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = write_items(items, os.path.join(tmp, "r"), what="bench", num_shards=4,
                             workers=workers)
        seconds = time.perf_counter() - t0
    assert report.written == n, report.format()
    return {"records_per_s": n / seconds, "records_per_s_per_core": n / seconds / workers}


def pipeline_per_worker(base: int, n: int, workers: int, batches: int) -> dict[str, float]:
    """The whole pipeline (``make_pipeline``) on ``base``-only buckets (all nine ratios) from
    JPEGs 1.5x the bucket side: images/s and images/s per worker."""
    rng = np.random.default_rng(3)
    side = int(base * 1.5)
    cache = [photo_jpeg(rng, side, side * 3 // 4) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        records.write_shards(
            (records.Example(image_bytes=cache[i % 4], caption=CAPTION, width=side,
                             height=side * 3 // 4, id=str(i), source="bench") for i in range(n)),
            os.path.join(tmp, "r"), num_shards=2)
        cfg = default_data_config()
        cfg.path = os.path.join(tmp, "r")
        cfg.base_sizes, cfg.base_probs = (base,), (1.0,)
        cfg.worker_count = workers
        cfg.process_index, cfg.process_count = 0, 1
        it = make_pipeline(cfg)
        try:
            next(it)  # worker start-up
            seg0, t0 = it.pack_iterator.segments, time.perf_counter()
            for _ in range(batches):
                next(it)
            seconds = time.perf_counter() - t0
            segs = it.pack_iterator.segments - seg0
        finally:
            it.close()
    return {"images_per_s": segs / seconds, "images_per_s_per_worker": segs / seconds / workers}


# Accelerator hosts the feed rates are given for: (name, devices per host, bf16 dense peak FLOP/s).
HOSTS = (("v5p host (4 chips)", 4, 459e12), ("v6e host (8 chips)", 8, 918e12),
         ("H100/H200 host (8 GPUs)", 8, 989e12))


def feed_rates(mfu: float) -> dict[str, dict[str, float]]:
    """Images/s one host consumes in stage 1 and stage 2 (no timing: model FLOPs per image from
    ``lens_jax.train.metrics.StepFlops``, the denoiser's fwd+bwd only, so an upper bound: the
    VAE and GPT-OSS encoders running on the same chips make the real rate lower)."""
    from lens_jax.configs import lens_3p8b_stage1_512, lens_3p8b_stage2_mixed
    from lens_jax.train.metrics import StepFlops

    mix = simulated_efficiency()
    stages = {
        # stage 1: one 512^2 image (1024 tokens) and ~156 text tokens (the simulated caption mix)
        "stage1_512": (lens_3p8b_stage1_512.get_config(), 1024.0, mix["text_tokens_per_image"]),
        "stage2_mixed": (lens_3p8b_stage2_mixed.get_config(), mix["image_tokens_per_image"],
                         mix["text_tokens_per_image"]),
    }
    out: dict[str, dict[str, float]] = {}
    for stage, (config, image_tokens, text_tokens) in stages.items():
        flops = StepFlops(config.model).train_flops(image_tokens, text_tokens, 1,
                                                    (image_tokens + text_tokens) ** 2)
        out[stage] = {"train_tflops_per_image": flops / 1e12}
        for name, devices, peak in HOSTS:
            out[stage][f"images_per_s/{name}"] = devices * peak * mfu / flops
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Input pipeline throughput (images/s per core; whole pipeline with workers).")
    parser.add_argument("--images", type=int, default=24, help="images per per-core case")
    parser.add_argument("--pipeline-images", type=int, default=120,
                        help="records written for the whole-pipeline case")
    parser.add_argument("--batches", type=int, default=6,
                        help="batches timed in the whole-pipeline case (after the first)")
    parser.add_argument("--workers", type=int, default=2, help="grain worker processes")
    parser.add_argument("--build-images", type=int, default=64,
                        help="images per lens-data build case")
    parser.add_argument("--build-workers", type=int, default=0,
                        help="processes of the parallel build case (default: CPU count, at most 8)")
    parser.add_argument("--worker-images", type=int, default=160,
                        help="records written for each images-per-worker case")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="assumed model FLOPs utilisation for the feed rates (default 0.4)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine()}
    results["packing_efficiency/default_mix"] = simulated_efficiency()
    efficiency = results["packing_efficiency/default_mix"]
    print("packing_efficiency/default_mix",
          json.dumps({k: round(float(v), 3) for k, v in efficiency.items()}), flush=True)
    cases = [(512, 1.5, True, "lanczos"), (1024, 1.5, True, "lanczos"),
             (1024, 1.5, True, "bicubic"), (1024, 2.5, True, "lanczos"),
             (1024, 2.5, False, "lanczos")]
    for base, scale, draft, resample in cases:
        key = (f"per_core/{base}/source_{scale}x/{resample}/"
               f"{'draft' if draft else 'full_decode'}")
        results[key] = per_core(base, args.images, draft, scale, resample)
        print(key, json.dumps({k: round(v, 2) for k, v in results[key].items()}), flush=True)
    key = f"pipeline/{args.workers}_workers"
    results[key] = whole_pipeline(args.pipeline_images, args.workers, args.batches)
    print(key, json.dumps({k: round(v, 3) for k, v in results[key].items()}), flush=True)
    build_workers = args.build_workers or max(1, min(8, os.cpu_count() or 1))
    for base in (512, 1024):
        for workers in sorted({1, build_workers}):
            key = f"build/{base}/{workers}_workers"
            results[key] = build_rate(base, args.build_images, workers)
            print(key, json.dumps({k: round(v, 1) for k, v in results[key].items()}), flush=True)
        key = f"pipeline_per_worker/{base}/{args.workers}_workers"
        results[key] = pipeline_per_worker(base, args.worker_images, args.workers, args.batches)
        print(key, json.dumps({k: round(v, 2) for k, v in results[key].items()}), flush=True)
    results[f"feed_rates/mfu_{args.mfu}"] = rates = feed_rates(args.mfu)
    for stage, values in rates.items():
        print(f"feed_rates/mfu_{args.mfu}/{stage}",
              json.dumps({k: round(v, 1) for k, v in values.items()}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
