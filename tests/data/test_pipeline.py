"""The grain pipeline: sharding, shuffling, captions, bad data, resume with workers, global
arrays."""

import io

import grain
import jax
import numpy as np
import pytest
from etils import epath
from jax.sharding import Mesh
from PIL import Image

from lens_jax.data import records
from lens_jax.data.buckets import assign_bucket, make_buckets, resize_and_crop, to_unit_range
from lens_jax.data.pipeline import (_ExampleLoader, batch_images, default_data_config,
                                    host_index_dataset, make_pipeline)
from lens_jax.data.tokenize import ByteCaptionTokenizer


def _image_bytes(rng, width, height, fmt="JPEG"):
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 255, 3)
    img = ((base + 0.7 * x[..., None] + 0.5 * y[..., None]) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, quality=90)
    return buf.getvalue()


def _example(rng, i, width=None, height=None, caption=None, short="", data=None):
    width = width or int(rng.integers(40, 100))
    height = height or int(rng.integers(40, 100))
    return records.Example(
        image_bytes=data if data is not None else _image_bytes(rng, width, height),
        caption=f"a picture number {i}" if caption is None else caption, short_caption=short,
        width=width, height=height, id=str(i), source="test")


class ListSource:
    """Random-access source of raw record bytes (picklable into grain workers)."""

    def __init__(self, raws):
        self.raws = list(raws)

    def __len__(self):
        return len(self.raws)

    def __getitem__(self, i):
        return self.raws[i]


def _tiny_config(**overrides):
    cfg = default_data_config()
    cfg.bucket_scale = 1 / 16      # 16..96 px buckets
    cfg.min_side = 32
    cfg.image_tokens = 64
    cfg.text_tokens = 96
    cfg.max_segments = 8
    cfg.caption_length = 64
    cfg.lookahead = 8
    cfg.rows_per_host = 2
    cfg.worker_count = 0
    cfg.read_threads = 1
    cfg.process_index, cfg.process_count = 0, 1
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("records") / "recs"
    records.write_shards([_example(rng, i) for i in range(24)], out, num_shards=2)
    return str(out)


def test_shuffle_is_seeded_changes_per_epoch_and_hosts_partition():
    n = 10
    ds = host_index_dataset(n, seed=3, shuffle=True, num_epochs=0, process_index=0,
                            process_count=1)
    again = host_index_dataset(n, seed=3, shuffle=True, num_epochs=0, process_index=0,
                               process_count=1)
    other = host_index_dataset(n, seed=4, shuffle=True, num_epochs=0, process_index=0,
                               process_count=1)
    e0 = [ds[i][1] for i in range(n)]
    e1 = [ds[i][1] for i in range(n, 2 * n)]
    assert sorted(e0) == sorted(e1) == list(range(n))
    assert e0 != e1  # a new permutation every epoch
    assert [ds[i][2] for i in range(2 * n)] == [0] * n + [1] * n
    assert e0 == [again[i][1] for i in range(n)]
    assert e0 != [other[i][1] for i in range(n)]
    hosts = [host_index_dataset(n, 3, True, 0, p, 2) for p in range(2)]
    firsts = [[h[i][0] for i in range(n // 2)] for h in hosts]
    assert set(firsts[0]).isdisjoint(firsts[1])
    assert sorted(firsts[0] + firsts[1]) == list(range(n))


def test_caption_choice_is_deterministic_with_configured_rates():
    cfg = _tiny_config(caption_dropout=0.2, short_caption_prob=0.3)
    loader = _ExampleLoader(None, cfg, make_buckets(scale=1 / 16), ByteCaptionTokenizer())
    picks = [loader.choose_caption("dense", "short", np.random.default_rng([0, i, 0]))
             for i in range(2000)]
    assert picks == [loader.choose_caption("dense", "short", np.random.default_rng([0, i, 0]))
                     for i in range(2000)]
    assert 0.17 < picks.count("") / 2000 < 0.23
    assert 0.2 < picks.count("short") / 2000 < 0.28  # 0.8 * 0.3
    # Dense missing -> short; short missing -> dense.
    rng = np.random.default_rng(1)
    loader.caption_dropout = 0.0
    assert {loader.choose_caption("", "s", rng) for _ in range(20)} == {"s"}
    assert {loader.choose_caption("d", "", rng) for _ in range(20)} == {"d"}


def test_pipeline_batch_matches_direct_processing(record_dir):
    """Images reassembled from packed rows equal resize + crop of the source, captions match."""
    cfg = _tiny_config(path=record_dir, caption_dropout=0.0, num_epochs=1,
                       jpeg_draft=False)
    it = make_pipeline(cfg)
    drafted = next(make_pipeline(_tiny_config(path=record_dir, caption_dropout=0.0)))
    buckets = make_buckets(scale=1 / 16)
    source = records.open_source(record_dir)
    seen = 0
    for batch in it:
        images = batch_images(batch)
        for r in range(cfg.rows_per_host):
            for s, img in enumerate(images[r]):
                index = int(batch["example_index"][r, s])
                ex = records.decode_example(source[index])
                pil = Image.open(io.BytesIO(ex.image_bytes))
                rng = np.random.default_rng([cfg.seed, index, 0])
                rng.random(2)  # the caption choice draws first
                bucket = assign_bucket(*pil.size, buckets,
                                       base_probs=dict(zip(cfg.base_sizes, cfg.base_probs)),
                                       rng=rng)
                np.testing.assert_array_equal(img, to_unit_range(resize_and_crop(pil, bucket)))
                n = int(batch["caption_length"][r, s])
                assert bytes(batch["caption_ids"][r, s, :n].astype(np.uint8)).decode() == ex.caption
                seen += 1
    assert seen == 24
    # JPEG draft mode (DCT-domain downscaling before Lanczos) changes pixels only slightly.
    exact = next(make_pipeline(_tiny_config(path=record_dir, caption_dropout=0.0,
                                            jpeg_draft=False)))
    assert np.array_equal(drafted["image_segment_ids"], exact["image_segment_ids"])
    assert np.abs(drafted["image_patches"] - exact["image_patches"]).mean() < 0.05
    raw = next(make_pipeline(_tiny_config(path=record_dir, caption_dropout=0.0, jpeg_draft=False,
                                          pixel_dtype="uint8")))
    assert raw["image_patches"].dtype == np.uint8
    np.testing.assert_array_equal(to_unit_range(raw["image_patches"]) * (raw["image_segment_ids"]
                                  > 0)[..., None], exact["image_patches"])
    assert sum(it.skip_counts().values()) == 0
    assert it.metrics()["data/packing_efficiency/image"] > 0.5


def test_bad_data_is_skipped_and_counted_with_a_worker():
    """5% corrupt records (plus other bad kinds): every good example arrives, every bad one is
    counted by reason; decoding runs in a grain worker process."""
    rng = np.random.default_rng(1)
    raws, good, expected = [], set(), {}

    def bad(reason, raw):
        raws.append(raw)
        expected[reason] = expected.get(reason, 0) + 1

    for i in range(60):  # 3 corrupt (5%): truncated JPEG, garbage record, non-image bytes
        if i == 3:
            data = _image_bytes(rng, 64, 64)
            truncated = _example(rng, i, data=data[:len(data) // 3])
            bad("corrupt_image", records.encode_example(truncated))
        elif i == 23:
            bad("bad_record", b"\x00garbage" * 5)
        elif i == 43:
            bad("corrupt_image", records.encode_example(_example(rng, i, data=b"not an image")))
        elif i == 7:     # other bad kinds
            bad("empty_caption", records.encode_example(_example(rng, i, caption=" ")))
        elif i == 8:
            bad("too_small", records.encode_example(_example(rng, i, width=20, height=60)))
        elif i == 9:
            bad("extreme_aspect", records.encode_example(_example(rng, i, width=200, height=40)))
        else:
            raws.append(records.encode_example(_example(rng, i)))
            good.add(len(raws) - 1)
    cfg = _tiny_config(num_epochs=1, worker_count=1)
    it = make_pipeline(cfg, source=ListSource(raws))
    try:
        arrived = [int(i) for b in it for i in b["example_index"].ravel() if i >= 0]
    finally:
        it.close()
    assert sorted(arrived) == sorted(good)
    counts = it.skip_counts()
    assert {k: v for k, v in counts.items() if v} == expected
    assert it.metrics()["data/skipped_total"] == len(raws) - len(good)


def test_resume_with_two_workers_matches_uninterrupted(record_dir, tmp_path):
    cfg = _tiny_config(path=record_dir, worker_count=2, caption_dropout=0.3,
                       short_caption_prob=0.0)
    it = make_pipeline(cfg)
    handler = grain.checkpoint.CheckpointHandler()
    try:
        for _ in range(3):
            next(it)
        handler.save(epath.Path(tmp_path), item=it)   # what orbax's CheckpointSave does
        reference = [next(it) for _ in range(4)]      # crosses the epoch boundary (24 examples)
    finally:
        it.close()
    restored = make_pipeline(cfg)
    try:
        handler.restore(epath.Path(tmp_path), item=restored)
        for ref in reference:
            got = next(restored)
            assert got.keys() == ref.keys()
            for key in ref:
                np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    finally:
        restored.close()


def test_global_arrays_on_a_mesh(record_dir):
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    cfg = _tiny_config(path=record_dir)
    host = next(make_pipeline(cfg))
    batch = next(make_pipeline(cfg, mesh=mesh))
    for key, value in host.items():
        assert isinstance(batch[key], jax.Array)
        assert batch[key].shape == value.shape
        assert batch[key].sharding.spec[0] == "data"
        np.testing.assert_array_equal(np.asarray(batch[key]), value)


def test_bucket_mode_rows_share_one_bucket(record_dir):
    cfg = _tiny_config(path=record_dir, mode="bucket", num_epochs=1, rows_per_host=2)
    shapes = set()
    count = 0
    for batch in make_pipeline(cfg):
        assert batch["segment_valid"].shape == (2, 1)
        h, w = batch["latent_hw"][0, 0]
        assert batch["image_patches"].shape == (2, h * w, 768)
        valid = batch["segment_valid"][:, 0]
        assert np.all(batch["latent_hw"][valid, 0] == (h, w))
        shapes.add((int(h), int(w)))
        count += int(valid.sum())
    assert count == 24 and len(shapes) > 1
    with pytest.raises(ValueError, match="bucket"):
        make_pipeline(cfg, process_index=0, process_count=2)


def test_aspect_ratio_filter_keeps_only_the_chosen_buckets(record_dir):
    cfg = _tiny_config(path=record_dir, mode="bucket", num_epochs=1, rows_per_host=2,
                       aspect_ratios=(4,))  # 1:1 only: every image is cropped to a square bucket
    count = 0
    for batch in make_pipeline(cfg):
        valid = batch["segment_valid"][:, 0]
        hw = batch["latent_hw"][valid, 0]
        assert np.all(hw[:, 0] == hw[:, 1]), hw
        count += int(valid.sum())
    assert count == 24
    with pytest.raises(ValueError, match="aspect_ratios"):
        make_pipeline(_tiny_config(path=record_dir, aspect_ratios=(9,)))


def test_caption_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lens_jax.data.tokenize import (JsonCaptionTokenizer, PromptTokenizerAdapter,
                                        load_caption_tokenizer)

    vocab = {"[UNK]": 0, "a": 1, "red": 2, "cube": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    json_tok = load_caption_tokenizer(f"json:{tmp_path}")
    assert isinstance(json_tok, JsonCaptionTokenizer) and json_tok.preamble_length == 0
    np.testing.assert_array_equal(json_tok.tokenize("a red cube"), [1, 2, 3])
    import pickle
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(json_tok)).tokenize("cube"), [3])
    assert load_caption_tokenizer("bytes").tokenize("ab").tolist() == [97, 98]
    with pytest.raises(ValueError, match="unknown caption tokenizer"):
        load_caption_tokenizer("nope")
    with pytest.raises(ValueError, match="--config.data.tokenizer=json:FILE"):
        load_caption_tokenizer("words")  # configs/demo.py's placeholder, outside lens_jax.demo
    with pytest.raises(FileNotFoundError):
        load_caption_tokenizer(f"json:{tmp_path}/missing.json")

    class FakePromptTokenizer:  # the lens_jax.text.PromptTokenizer call signature
        def preamble_length(self, date=None):
            return 3

        def __call__(self, prompts, date=None, max_length=512):
            ids = [[7, 7, 7] + [len(w) for w in p.split()] + [9] for p in prompts]
            ids = [i[:max_length] for i in ids]
            n = max(len(i) for i in ids)
            out = np.zeros((len(ids), n + 2), np.int32)
            mask = np.zeros((len(ids), n + 2), bool)
            for r, i in enumerate(ids):
                out[r, :len(i)], mask[r, :len(i)] = i, True
            return out, mask

    adapter = PromptTokenizerAdapter(FakePromptTokenizer(), "2026-01-01", max_length=6)
    assert adapter.preamble_length == 3
    np.testing.assert_array_equal(adapter.tokenize("a red cube"), [7, 7, 7, 1, 3, 4])
    np.testing.assert_array_equal(adapter.tokenize(""), [7, 7, 7, 9])
