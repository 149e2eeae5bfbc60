"""Input pipeline throughput: images/s per CPU core for decode + resize + patchify + pack, and the
whole grain pipeline with worker processes.

    .venv/bin/python benchmarks/data.py [--images 24] [--workers 2] [--json out.json]

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Input pipeline throughput (images/s per core; whole pipeline with workers).")
    parser.add_argument("--images", type=int, default=24, help="images per per-core case")
    parser.add_argument("--pipeline-images", type=int, default=120,
                        help="records written for the whole-pipeline case")
    parser.add_argument("--batches", type=int, default=6,
                        help="batches timed in the whole-pipeline case (after the first)")
    parser.add_argument("--workers", type=int, default=2, help="grain worker processes")
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
