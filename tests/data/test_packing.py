"""Mixed-resolution packing: efficiency, row invariants, batch schema, reassembly."""

import numpy as np
import pytest

from lens_jax.data.buckets import make_buckets, patchify_image, to_unit_range
from lens_jax.data.packing import (BucketBatcher, PackingConfig, StreamingPacker, build_batch,
                                   extract_images, packing_efficiency, plan_rows)
from lens_jax.data.pipeline import default_data_config
from lens_jax.models.positions import image_positions, text_positions


def _size_stream(seed, bases=(512, 768, 1024), probs=(0.6, 0.25, 0.15), limit=None):
    """Segment elements without pixels: the default bucket mix, uniform ratios, captions of
    ~170 +- 50 denoiser tokens (10% dropped to a 30-token scaffold)."""
    rng = np.random.default_rng(seed)
    buckets = make_buckets(bases)
    pos = 0
    while limit is None or pos < limit:
        base = bases[rng.choice(len(bases), p=probs)]
        ratio = int(rng.integers(9))
        bucket = next(b for b in buckets if b.base == base and b.ratio_index == ratio)
        n_text = 30 if rng.random() < 0.1 else int(np.clip(rng.normal(170, 50), 20, 415))
        yield {"latent_hw": bucket.latent_hw, "num_text": n_text, "position": pos}
        pos += 1


def test_default_budget_efficiency_at_least_90_percent():
    c = default_data_config()
    cfg = PackingConfig(image_tokens=c.image_tokens, text_tokens=c.text_tokens,
                        max_segments=c.max_segments, lookahead=c.lookahead, max_wait=c.max_wait)
    packer = StreamingPacker(cfg, c.rows_per_host)
    stream = _size_stream(0)
    real = [0, 0]
    batches = 60
    for _ in range(batches):
        for row in packer.next_rows(lambda: next(stream)):
            assert len(row) <= cfg.max_segments
            n_img = sum(e["latent_hw"][0] * e["latent_hw"][1] for e in row)
            n_txt = sum(e["num_text"] for e in row)
            assert n_img <= cfg.image_tokens and n_txt <= cfg.text_tokens
            real[0] += n_img
            real[1] += n_txt
        assert max(packer.ages, default=0) <= cfg.max_wait + 4  # nobody starves
    rows = batches * c.rows_per_host
    total = sum(real) / (rows * (cfg.image_tokens + cfg.text_tokens))
    image = real[0] / (rows * cfg.image_tokens)
    assert total >= 0.90, (total, image)
    assert image >= 0.92, image


def test_streaming_packer_loses_and_duplicates_nothing():
    cfg = PackingConfig(image_tokens=8448, text_tokens=1024, max_segments=6, lookahead=16)
    packer = StreamingPacker(cfg, 3)
    stream = _size_stream(1, limit=500)
    seen = []
    while (rows := packer.next_rows(lambda: next(stream, None))) is not None:
        for row in rows:
            assert len(row) <= 6
            seen += [e["position"] for e in row]
    assert sorted(seen) == list(range(500))


def test_plan_rows_best_fit_decreasing():
    cfg = PackingConfig(image_tokens=100, text_tokens=100, max_segments=3)
    rows, leftover = plan_rows([(60, 10), (50, 10), (40, 10), (30, 10), (20, 95)], 2, cfg)
    assert rows == [[0, 2], [1, 3]] and leftover == [4]  # 60+40, 50+30; 20 has no text room


def _segment(rng, h, w, n_text, preamble=0, index=0):
    img = rng.integers(0, 256, (h * 16, w * 16, 3), dtype=np.uint8)
    ids = rng.integers(1, 1000, preamble + n_text).astype(np.int32)
    return img, {"patches": patchify_image(img), "latent_hw": np.array([h, w]),
                 "caption_ids": ids, "preamble": preamble, "num_text": n_text,
                 "example_index": index, "position": index}


def test_build_batch_schema_positions_and_reassembly(rng):
    geom = [(2, 3, 5), (4, 1, 0), (3, 3, 7)]
    images, segments = zip(*[_segment(rng, h, w, n, preamble=2, index=i)
                             for i, (h, w, n) in enumerate(geom)])
    rows = [[segments[0], segments[1]], [segments[2]]]
    batch = build_batch(rows, image_tokens=16, text_tokens=12, max_segments=3, caption_length=16)
    assert batch["image_patches"].shape == (2, 16, 768)
    assert batch["image_patches"].dtype == np.float32
    assert batch["image_positions"].shape == (2, 16, 3)
    assert batch["text_index"].shape == (2, 12, 2)
    assert batch["caption_ids"].shape == (2, 3, 16)
    # Row 0: segment 1 = 2x3 image at offset 0, segment 2 = 4x1 image at offset 6.
    np.testing.assert_array_equal(batch["image_segment_ids"][0],
                                  [1] * 6 + [2] * 4 + [0] * 6)
    np.testing.assert_array_equal(batch["token_offset"][0], [0, 6, 0])
    np.testing.assert_array_equal(batch["latent_hw"][0], [[2, 3], [4, 1], [0, 0]])
    np.testing.assert_array_equal(batch["segment_valid"], [[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(batch["image_positions"][0, :6], image_positions(2, 3))
    np.testing.assert_array_equal(batch["image_positions"][0, 6:10], image_positions(4, 1))
    np.testing.assert_array_equal(batch["image_positions"][0, 10:], 0)
    # Text: 5 tokens of segment 1, none of segment 2 (empty caption), padding.
    np.testing.assert_array_equal(batch["text_segment_ids"][0], [1] * 5 + [0] * 7)
    np.testing.assert_array_equal(batch["text_positions"][0, :5], text_positions(2, 3, 5))
    np.testing.assert_array_equal(batch["text_index"][0, :5], [[0, j] for j in range(5)])
    np.testing.assert_array_equal(batch["text_positions"][1, :7], text_positions(3, 3, 7))
    np.testing.assert_array_equal(batch["text_offset"][0], [0, 5, 0])
    np.testing.assert_array_equal(batch["text_length"][0], [5, 0, 0])
    # caption_ids holds the full ids (preamble included); text_index j maps to id preamble + j.
    for r, s in [(0, 0), (1, 0)]:
        seg = rows[r][s]
        n = len(seg["caption_ids"])
        np.testing.assert_array_equal(batch["caption_ids"][r, s, :n], seg["caption_ids"])
        assert batch["caption_mask"][r, s].sum() == n == batch["caption_length"][r, s]
        k, j = batch["text_index"][r, 0]
        assert batch["caption_ids"][r, k, seg["preamble"] + j] == seg["caption_ids"][2]
    # Exact reassembly of every image.
    got = extract_images(batch, 0) + extract_images(batch, 1)
    for a, b in zip(got, images):
        np.testing.assert_array_equal(a, to_unit_range(b))
    eff = packing_efficiency(batch)
    assert eff["image"] == pytest.approx((6 + 4 + 9) / 32)
    assert eff["text"] == pytest.approx(12 / 24)


def test_build_batch_rejects_overflow(rng):
    _, seg = _segment(rng, 4, 4, 3)
    with pytest.raises(ValueError, match="overflows"):
        build_batch([[seg]], image_tokens=8, text_tokens=8, max_segments=2, caption_length=8)
    with pytest.raises(ValueError, match="max_segments"):
        build_batch([[seg, seg]], image_tokens=64, text_tokens=8, max_segments=1,
                    caption_length=8)


def test_bucket_batcher_rows_share_a_bucket():
    batcher = BucketBatcher(4)
    stream = _size_stream(2, limit=200)
    seen = []
    while (rows := batcher.next_rows(lambda: next(stream, None))) is not None:
        real = [r for r in rows if r]
        assert all(len(r) == 1 for r in real) and len(rows) == 4
        assert len({tuple(r[0]["latent_hw"]) for r in real}) == 1
        seen += [r[0]["position"] for r in real]
    assert sorted(seen) == list(range(200))
