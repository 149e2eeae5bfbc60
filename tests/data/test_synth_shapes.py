"""Synthetic shapes: determinism, captions, layouts, bucket sizes."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from lens_jax.data import records, synth_shapes as S


def _shard_bytes(shards):
    return [open(s, "rb").read() for s in shards]


def test_same_seed_identical_bytes(tmp_path):
    a = S.write_dataset(tmp_path / "a", num=12, seed=7, base_size=64, num_shards=2)
    b = S.write_dataset(tmp_path / "b", num=12, seed=7, base_size=64, num_shards=2, workers=2)
    c = S.write_dataset(tmp_path / "c", num=12, seed=8, base_size=64, num_shards=2)
    assert _shard_bytes(a) == _shard_bytes(b)  # whatever the number of workers
    assert _shard_bytes(a) != _shard_bytes(c)
    assert records.read_manifest(tmp_path / "a")["synth_shapes"]["seed"] == 7


def test_records_images_layouts(tmp_path):
    S.write_dataset(tmp_path / "d", num=24, seed=3, base_size=64)
    sizes = set(S.bucket_sizes(64))
    examples = list(records.read_examples(str(tmp_path / "d")))
    assert len(examples) == 24
    assert len({e.id for e in examples}) == 24
    for ex in examples:
        assert ex.source == "synth-shapes" and records.image_format(ex.image_bytes) == "png"
        assert (ex.width, ex.height) in sizes  # a (scaled) training bucket
        image = np.asarray(Image.open(io.BytesIO(ex.image_bytes)))
        assert image.shape == (ex.height, ex.width, 3)
        meta = json.loads(ex.metadata)
        layout = meta["layout"]
        assert (meta["generator"], layout["width"], layout["height"]) == (
            "synth-shapes", ex.width, ex.height)
        assert 1 <= len(layout["objects"]) <= 4
        # The stored image is exactly the rendered ground truth.
        np.testing.assert_array_equal(image, S.render_layout(layout))
        for obj in layout["objects"]:
            assert set(obj) >= {"shape", "color", "rgb", "size", "bbox", "center", "position"}
            cx, cy = (int(v) for v in obj["center"])
            assert tuple(image[cy, cx]) == tuple(obj["rgb"]), obj
        assert 60 <= len(ex.caption.split()) <= 120
        assert ex.caption == S.caption_dense(layout)
        assert ex.short_caption == S.caption_short(layout)


def test_caption_lengths_and_layout_invariants():
    sizes = S.bucket_sizes(128)
    counts = set()
    for i in range(400):
        rng = np.random.default_rng([11, i])
        width, height = sizes[i % len(sizes)]
        layout = S.sample_layout(rng, width, height)
        objects = layout["objects"]
        counts.add(len(objects))
        words = len(S.caption_dense(layout).split())
        assert 60 <= words <= 120, (words, S.caption_dense(layout))
        assert 1 <= len(S.caption_short(layout).split()) <= 16
        for k, obj in enumerate(objects):
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert obj["color"] in S.OBJECT_COLORS and obj["shape"] in S.SHAPES
            assert obj["size"] in S.SIZE_ORDER
            for other in objects[k + 1:]:  # no overlaps
                a, b = obj["bbox"], other["bbox"]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    assert counts == {1, 2, 3, 4}


def _layout(*objects, width=200, height=100):
    out = []
    for shape, color, size, box in objects:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        out.append({"shape": shape, "color": color, "rgb": list(S.OBJECT_COLORS[color]),
                    "size": size, "bbox": list(box), "center": [cx, cy],
                    "position": S._position_name(cx, cy, width, height)})
    return {"version": 1, "width": width, "height": height,
            "background": {"kind": "plain", "colors": ["white"],
                           "rgb": [list(S.BACKGROUND_COLORS["white"])], "direction": None},
            "objects": out}


def test_caption_content():
    layout = _layout(("circle", "red", "large", (5, 5, 43, 43)),
                     ("square", "blue", "small", (150, 60, 166, 76)),
                     ("square", "blue", "small", (100, 70, 116, 86)))
    assert S.caption_short(layout) == "a red circle and two blue squares"
    dense = S.caption_dense(layout)
    assert 60 <= len(dense.split()) <= 120
    assert "large red circle" in dense and "in the upper left corner" in dense
    assert "plain white background" in dense
    assert ("The red circle is above and to the left of the blue square in the lower right "
            "corner and is larger than it.") in dense
    assert S.caption_short(_layout(("triangle", "orange", "medium", (0, 0, 10, 10)))) == \
        "an orange triangle"


def test_places_caption_names_each_objects_ninth():
    layout = _layout(("circle", "red", "large", (5, 5, 43, 43)),
                     ("square", "blue", "small", (150, 60, 166, 76)),
                     ("square", "blue", "small", (100, 40, 116, 56)))
    assert S.caption_short(layout, "places") == \
        "a red circle upper left, a blue square lower right and a blue square centre"
    assert S.caption_short(_layout(("triangle", "orange", "medium", (0, 0, 10, 10))), "places") == \
        "an orange triangle upper left"
    with pytest.raises(ValueError, match="expected one of"):
        S.caption_short(layout, "long")


def test_short_style_changes_only_the_short_caption(tmp_path):
    sizes = S.bucket_sizes(64)
    plain, places = (S.generate_example(3, 7, sizes, short_style=st) for st in ("plain", "places"))
    assert (plain.image_bytes, plain.caption) == (places.image_bytes, places.caption)
    layout = json.loads(places.metadata)["layout"]
    assert places.short_caption == S.caption_short(layout, "places") != plain.short_caption
    S.write_dataset(tmp_path / "r", 3, seed=3, base_size=64, short_style="places")
    manifest = json.loads((tmp_path / "r" / "lens_records.json").read_text())
    assert manifest["synth_shapes"]["short_style"] == "places"


def test_render_scaling_and_gradient():
    layout = _layout(("square", "green", "large", (50, 25, 100, 75)))
    layout["background"] = {"kind": "gradient", "colors": ["black", "white"],
                             "rgb": [list(S.BACKGROUND_COLORS["black"]),
                                     list(S.BACKGROUND_COLORS["white"])],
                             "direction": "vertical"}
    image = S.render_layout(layout)
    assert image.shape == (100, 200, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == S.BACKGROUND_COLORS["black"]
    assert tuple(image[-1, 0]) == S.BACKGROUND_COLORS["white"]
    assert tuple(image[50, 75]) == S.OBJECT_COLORS["green"]
    half = S.render_layout(layout, 100, 50)
    assert half.shape == (50, 100, 3) and tuple(half[25, 37]) == S.OBJECT_COLORS["green"]
    with pytest.raises(ValueError, match="unknown shape"):
        S.render_layout(_layout(("blob", "red", "small", (0, 0, 10, 10))))


def test_bucket_sizes():
    full = S.bucket_sizes(512)
    assert len(full) == 27 and (352, 704) in full and (1472, 736) in full
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in S.bucket_sizes(64))
    assert all(0.4 <= w / h <= 2.5 for w, h in S.bucket_sizes(64))  # rounding
    assert (128, 128) in S.bucket_sizes(128, groups=(512,))
    with pytest.raises(ValueError, match="unknown bucket group"):
        S.bucket_sizes(64, groups=(640,))


def test_bucket_sizes_match_pipeline_buckets():
    buckets = pytest.importorskip("lens_jax.data.buckets")
    for base in (64, 128, 512):
        expected = [(b.width, b.height) for b in buckets.make_buckets(scale=base / 512)]
        assert S.bucket_sizes(base) == expected


def test_cli_synth_shapes(tmp_path, capsys):
    from lens_jax.data import cli

    code = cli.main(["synth-shapes", "--out", str(tmp_path / "s"), "--num", "5", "--seed", "1",
                     "--base-size", "64", "--groups", "512", "--no-progress"])
    assert code == 0 and "wrote 5 synthetic examples" in capsys.readouterr().out
    sizes = set(S.bucket_sizes(64, groups=(512,)))
    assert all((e.width, e.height) in sizes for e in records.read_examples(str(tmp_path / "s")))


def test_grid_placement_centres_each_object_in_its_own_ninth(tmp_path):
    sizes = S.bucket_sizes(128, groups=(512,))
    counts = set()
    for i in range(200):
        width, height = sizes[i % len(sizes)]
        layout = S.sample_layout(np.random.default_rng([5, i]), width, height, placement="grid")
        objects = layout["objects"]
        counts.add(len(objects))
        side = round(S.GRID_SIDE_FRACTION * min(width, height))
        cells = set()
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            assert (x1 - x0, y1 - y0) == (side, side) and obj["size"] == S.GRID_SIZE_CLASS
            col, row = int(3 * obj["center"][0] / width), int(3 * obj["center"][1] / height)
            # the ninth's centre, to the pixel, and the whole object inside that ninth
            assert abs(obj["center"][0] - (col + 0.5) * width / 3) <= 1
            assert abs(obj["center"][1] - (row + 0.5) * height / 3) <= 1
            assert col * width / 3 <= x0 and x1 <= (col + 1) * width / 3
            assert row * height / 3 <= y0 and y1 <= (row + 1) * height / 3
            assert obj["position"] == S.POSITION_NAMES[row][col]
            cells.add((row, col))
        assert len(cells) == len(objects)  # one object per ninth
        caption = S.caption_short(layout, "places")
        assert all(o["position"] in caption for o in objects)
    assert counts == {1, 2, 3, 4}
    # "free" is the default and draws the same stream as before placements existed
    rng_a, rng_b = np.random.default_rng([5, 0]), np.random.default_rng([5, 0])
    assert S.sample_layout(rng_a, 128, 128) == S.sample_layout(rng_b, 128, 128, placement="free")
    with pytest.raises(ValueError, match="placement 'random'"):
        S.sample_layout(np.random.default_rng(0), 128, 128, placement="random")


def test_cli_synth_shapes_grid_placement(tmp_path):
    from lens_jax.data import cli

    assert cli.main(["synth-shapes", "--out", str(tmp_path / "g"), "--num", "4", "--seed", "1",
                     "--base-size", "128", "--groups", "512", "--placement", "grid",
                     "--no-progress"]) == 0
    assert records.read_manifest(tmp_path / "g")["synth_shapes"]["placement"] == "grid"
    for ex in records.read_examples(str(tmp_path / "g")):
        layout = json.loads(ex.metadata)["layout"]
        assert all(o["size"] == S.GRID_SIZE_CLASS for o in layout["objects"])
        assert len({o["position"] for o in layout["objects"]}) == len(layout["objects"])


def test_square_aspect_keeps_each_groups_square_bucket(tmp_path):
    assert S.bucket_sizes(128, groups=(512,), aspect="square") == [(128, 128)]
    assert S.bucket_sizes(64, aspect="square") == [(64, 64), (96, 96), (128, 128)]
    assert set(S.bucket_sizes(64, aspect="square")) <= set(S.bucket_sizes(64))
    with pytest.raises(ValueError, match="aspect 'wide'"):
        S.bucket_sizes(64, aspect="wide")
    S.write_dataset(tmp_path / "sq", 6, seed=2, base_size=128, groups=(512,), aspect="square",
                    placement="grid", short_style="scene")
    settings = records.read_manifest(tmp_path / "sq")["synth_shapes"]
    assert (settings["aspect"], settings["placement"], settings["short_style"]) == (
        "square", "grid", "scene")
    for ex in records.read_examples(str(tmp_path / "sq")):
        assert (ex.width, ex.height) == (128, 128)
        layout = json.loads(ex.metadata)["layout"]
        assert ex.short_caption == S.caption_short(layout, "places") + " on " + \
            S._background_phrase(layout["background"])
