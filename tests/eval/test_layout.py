"""lens-eval layout: ground-truth renders score ~1, wrong renders ~0, deterministic, CLI + folder
format, held-out prompts disjoint from the training stream."""

import copy
import json

import numpy as np
import pytest

from lens_jax.data import synth_shapes
from lens_jax.data.synth_shapes import OBJECT_COLORS, render_layout
from lens_jax.eval import cli
from lens_jax.eval.layout import (CATEGORIES, EvalPrompt, classify_shape, detect_objects,
                                  format_table, load_folder, make_eval_set, render_eval_set,
                                  score_images, write_sidecar)

NUM = 32  # 8 prompts of each object count (balanced)
COLORS = list(OBJECT_COLORS)


@pytest.fixture(scope="module")
def prompts() -> list[EvalPrompt]:
    return make_eval_set(NUM, seed=7, base_size=64)


@pytest.fixture(scope="module")
def layouts(prompts):
    return [p.layout for p in prompts]


def scores(report) -> dict:
    return {name: row["score"] for name, row in report["categories"].items()}


def with_objects(layout, objects):
    out = copy.deepcopy(layout)
    out["objects"] = objects
    return out


def permuted_colours(layout):
    """Every colour shifted one step round the 8-colour palette: no colour keeps its place and
    the set of colours of a layout never maps onto itself."""
    objects = copy.deepcopy(layout["objects"])
    for obj in objects:
        obj["color"] = COLORS[(COLORS.index(obj["color"]) + 1) % len(COLORS)]
        obj["rgb"] = list(OBJECT_COLORS[obj["color"]])
    return with_objects(layout, objects)


def mirrored(layout):
    """Every object moved to its point reflection through the image centre: every relation
    between two objects flips."""
    w, h = layout["width"], layout["height"]
    objects = copy.deepcopy(layout["objects"])
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        obj["bbox"] = [w - x1, h - y1, w - x0, h - y0]
    return with_objects(layout, objects)


def test_ground_truth_renders_score_one(prompts, layouts):
    images = [render_layout(p.layout, p.width, p.height) for p in prompts]
    report = score_images(images, layouts)
    for name, score in scores(report).items():
        assert score is not None and score >= 0.95, (name, score)
    assert report["categories"]["single_object_colour"]["prompts"] == NUM // 4
    assert report["categories"]["position"]["prompts"] == 3 * NUM // 4
    assert report["overall"] >= 0.95
    # Deterministic: the same inputs give the same report, byte for byte.
    again = score_images([im.copy() for im in images], copy.deepcopy(layouts))
    assert json.dumps(again, sort_keys=True) == json.dumps(report, sort_keys=True)
    table = format_table(report)
    for name in CATEGORIES:
        assert name in table
    # The per-object-count tally partitions the prompts: its counts add up to the totals.
    by_count = report["by_object_count"]
    assert set(by_count) == {"1", "2", "3", "4"} and "2 objects" in table
    for name, row in report["categories"].items():
        assert sum(by_count[n][name]["prompts"] for n in by_count) == row["prompts"]
        assert sum(by_count[n][name]["passed"] for n in by_count) == row["passed"]
    assert by_count["1"]["position"]["score"] is None and by_count["2"]["position"]["prompts"] == NUM // 4


def test_scaled_and_slightly_blurred_renders_still_pass(prompts, layouts):
    from PIL import Image, ImageFilter

    # Rendered at twice the layout's size (the scorer rescales the layout) and blurred a little.
    images = [np.asarray(Image.fromarray(render_layout(p.layout, 2 * p.width, 2 * p.height))
                         .filter(ImageFilter.GaussianBlur(0.8))) for p in prompts]
    got = scores(score_images(images, layouts))
    for name in ("object_present", "count", "colour", "single_object_colour", "position",
                 "region"):
        assert got[name] >= 0.95, (name, got[name])
    assert got["shape"] >= 0.85 and got["colour_binding"] >= 0.8, got


def test_a_wrong_background_colour_creates_no_objects(prompts, layouts):
    """Every background colour is farther than max_color_distance from every object colour:
    objects drawn on another (plain) background are still found, and nothing else."""
    from lens_jax.data.synth_shapes import BACKGROUND_COLORS

    names = list(BACKGROUND_COLORS)
    images = []
    for i, p in enumerate(prompts):
        name = names[i % len(names)]
        background = {"kind": "plain", "colors": [name], "rgb": [list(BACKGROUND_COLORS[name])],
                      "direction": None}
        images.append(render_layout({**p.layout, "background": background}))
    got = scores(score_images(images, layouts))
    for name in ("object_present", "count", "colour", "single_object_colour", "position",
                 "region"):
        assert got[name] >= 0.95, (name, got[name])


def test_permuted_colours_fail_every_category(prompts, layouts):
    images = [render_layout(permuted_colours(p.layout)) for p in prompts]
    for name, score in scores(score_images(images, layouts)).items():
        assert score <= 0.2, (name, score)


def test_blank_and_noise_images_fail_every_category(prompts, layouts):
    rng = np.random.default_rng(0)
    blank = [render_layout(with_objects(p.layout, [])) for p in prompts]
    noise = [rng.integers(0, 256, (p.height, p.width, 3), dtype=np.uint8) for p in prompts]
    for images in (blank, noise):
        for name, score in scores(score_images(images, layouts)).items():
            assert score == 0.0, (name, score)


def test_moved_objects_fail_position_and_region(prompts):
    # Layouts whose colours are all different (identical objects are interchangeable).
    chosen = [p.layout for p in prompts
              if len({o["color"] for o in p.layout["objects"]}) == len(p.layout["objects"])]
    assert len(chosen) >= 12
    got = scores(score_images([render_layout(mirrored(lay)) for lay in chosen], chosen))
    assert got["position"] <= 0.2 and got["region"] <= 0.2, got
    # What did not change still passes.
    assert got["object_present"] >= 0.95 and got["count"] >= 0.95, got
    assert got["single_object_colour"] >= 0.95, got


def test_removed_objects_fail_count_and_present(prompts, layouts):
    # The first object removed (a 1-object prompt becomes a blank image).
    images = [render_layout(with_objects(p.layout, p.layout["objects"][1:])) for p in prompts]
    report = score_images(images, layouts)
    got = scores(report)
    assert got["count"] <= 0.2 and got["single_object_colour"] == 0.0, got
    # object_present fails exactly where the removed object's colour was unique.
    unique = [sum(o["color"] == p.layout["objects"][0]["color"] for o in p.layout["objects"]) == 1
              for p in prompts]
    present = [r["categories"]["object_present"] for r in report["per_image"]]
    assert present == [not u for u in unique]


def test_detections_and_shapes_of_a_known_layout():
    layout = {"width": 96, "height": 64,
              "background": {"kind": "gradient", "colors": ["black", "pale blue"],
                             "rgb": [[20, 20, 20], [180, 212, 240]], "direction": "horizontal"},
              "objects": []}
    shapes = ("circle", "square", "triangle", "diamond", "star", "hexagon")
    colors = ("red", "orange", "yellow", "green", "blue", "purple")
    for i, (shape, color) in enumerate(zip(shapes, colors)):
        x0, y0 = 4 + 30 * (i % 3), 6 + 30 * (i // 3)
        layout["objects"].append({"shape": shape, "color": color,
                                  "rgb": list(OBJECT_COLORS[color]), "size": "medium",
                                  "bbox": [x0, y0, x0 + 24, y0 + 24],
                                  "center": [x0 + 12, y0 + 12], "position": "centre"})
    detections = detect_objects(render_layout(layout), layout)
    assert sorted((d.color, d.shape) for d in detections) == sorted(zip(colors, shapes))
    for d in detections:
        obj = next(o for o in layout["objects"] if o["color"] == d.color)
        # The bounding box is the drawn one (a hexagon is narrower than its square, a star's
        # points stop short of its bottom edge).
        slack = 3 if d.shape in ("hexagon", "star") else 2
        assert np.abs(np.subtract(d.bbox, obj["bbox"])).max() <= slack, (d, obj["bbox"])
    assert classify_shape(np.ones((9, 9), bool)) == "square"


def test_synth_shapes_records_score_one(tmp_path):
    """Training records of lens-data synth-shapes: their images scored against the layout in
    their metadata (the same layout format as the evaluation prompts)."""
    import io

    from PIL import Image

    from lens_jax.data import records

    synth_shapes.write_dataset(tmp_path / "shapes", num=12, seed=5, base_size=64)
    images, layouts = [], []
    for ex in records.read_examples(tmp_path / "shapes"):
        images.append(np.asarray(Image.open(io.BytesIO(ex.image_bytes)).convert("RGB")))
        layouts.append(ex.metadata_dict()["layout"])
    report = score_images(images, layouts)
    assert report["num_images"] == 12 and report["overall"] == 1.0, format_table(report)


def test_short_prompts_skip_placement(prompts, layouts, tmp_path, capsys):
    """Images from short captions (no positions named): moved objects are not penalised;
    position and region do not apply, colour only to 1-object prompts."""
    images = [render_layout(mirrored(p.layout)) for p in prompts]
    report = score_images(images, layouts, prompt_kind="short")
    got = scores(report)
    assert got["position"] is None and got["region"] is None
    assert report["categories"]["colour"]["prompts"] == NUM // 4
    for name in ("object_present", "count", "colour", "single_object_colour"):
        assert got[name] >= 0.95, (name, got[name])
    assert "n/a" in format_table(report)
    with pytest.raises(ValueError, match="prompt_kind"):
        score_images(images[:1], layouts[:1], prompt_kind="medium")
    # CLI --prompt-kind auto: short where the sidecar's prompt is its short caption.
    render_eval_set(prompts[:4], tmp_path)
    for i, p in enumerate(prompts[:4]):
        write_sidecar(tmp_path / f"{i:05d}.json", p.layout, p.caption, p.short_caption,
                      prompt=p.short_caption if i % 2 else p.caption)
    out = tmp_path / "report.json"
    assert cli.main(["layout", str(tmp_path), "--prompt-kind", "auto", "--out", str(out),
                     "--no-progress"]) == 0
    kinds = [r["prompt_kind"] for r in json.loads(out.read_text())["per_image"]]
    assert kinds == ["dense", "short", "dense", "short"]


def test_bad_inputs_are_named():
    layout = make_eval_set(1, seed=0)[0].layout
    with pytest.raises(ValueError, match="uint8"):
        score_images([np.zeros((64, 64, 3), np.float32)], [layout])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        score_images([np.zeros((64, 64), np.uint8)], [layout])
    with pytest.raises(ValueError, match="1 images but 2 layouts"):
        score_images([np.zeros((64, 64, 3), np.uint8)], [layout, layout])
    with pytest.raises(ValueError, match="lacks"):
        score_images([np.zeros((64, 64, 3), np.uint8)], [{"width": 64}])


def test_eval_set_is_deterministic_balanced_and_held_out():
    a = make_eval_set(24, seed=3, base_size=64)
    assert a == make_eval_set(24, seed=3, base_size=64)
    assert a != make_eval_set(24, seed=4, base_size=64)
    assert [len(p.layout["objects"]) for p in a] == [1 + i % 4 for i in range(24)]
    sizes = set(synth_shapes.bucket_sizes(64))
    for p in a:
        assert (p.width, p.height) in sizes
        assert p.caption == synth_shapes.caption_dense(p.layout)
        assert p.short_caption == synth_shapes.caption_short(p.layout)
    # No held-out layout equals a training layout of the same seed and index range.
    train = set()
    for index in range(200):
        ex = synth_shapes.generate_example(3, index, synth_shapes.bucket_sizes(64))
        train.add(json.dumps(json.loads(ex.metadata)["layout"], sort_keys=True))
    for p in make_eval_set(200, seed=3, base_size=64, balanced=False):
        assert json.dumps(p.layout, sort_keys=True) not in train


def test_cli_prompts_render_and_layout(tmp_path, capsys):
    prompts_file, gt = tmp_path / "prompts.jsonl", tmp_path / "gt"
    assert cli.main(["prompts", "--num", "8", "--seed", "1", "--out", str(prompts_file),
                     "--render", str(gt)]) == 0
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]) == {"index", "prompt", "caption", "short_caption",
                                               "width", "height", "layout"}
    assert rows[0]["caption"] == rows[0]["prompt"] == make_eval_set(8, seed=1)[0].caption
    out = tmp_path / "report.json"
    assert cli.main(["layout", str(gt), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "single_object_colour" in printed and "overall" in printed
    report = json.loads(out.read_text())
    assert report["overall"] == 1.0 and report["num_images"] == 8
    assert [r["name"] for r in report["per_image"]] == [f"{i:05d}.png" for i in range(8)]
    images, layouts, names = load_folder(gt)
    assert len(images) == 8 and names[0] == "00000.png"


def test_cli_layout_looks_prompts_up(tmp_path, capsys):
    """Sidecars of lens-sample (a "prompt", no layout) are matched to the prompts file."""
    prompts_file, gt = tmp_path / "prompts.jsonl", tmp_path / "gt"
    assert cli.main(["prompts", "--num", "4", "--out", str(prompts_file), "--render",
                     str(gt)]) == 0
    for i, line in enumerate(prompts_file.read_text().splitlines()):
        (gt / f"{i:05d}.json").write_text(json.dumps({"prompt": json.loads(line)["prompt"],
                                                      "seed": 0}))
    capsys.readouterr()
    assert cli.main(["layout", str(gt), "--no-progress"]) == 2
    assert "--prompts" in capsys.readouterr().err
    out = tmp_path / "report.json"
    assert cli.main(["layout", str(gt), "--prompts", str(prompts_file), "--out", str(out),
                     "--no-progress"]) == 0
    assert json.loads(out.read_text())["overall"] == 1.0
    # A short caption shared by two different layouts cannot be looked up.
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    rows[1]["short_caption"] = rows[0]["short_caption"]
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (gt / "00000.json").write_text(json.dumps({"prompt": rows[0]["short_caption"]}))
    assert cli.main(["layout", str(gt), "--prompts", str(prompts_file), "--no-progress"]) == 2
    assert "several layouts" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["layout", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(["layout", str(tmp_path)]) == 2
    assert "no images" in capsys.readouterr().err
    prompt = make_eval_set(1, seed=0)[0]
    render_eval_set([prompt], tmp_path)
    (tmp_path / "00000.json").unlink()
    assert cli.main(["layout", str(tmp_path)]) == 2
    assert "sidecar" in capsys.readouterr().err
    write_sidecar(tmp_path / "00000.json", {"objects": []})
    assert cli.main(["layout", str(tmp_path)]) == 2
    assert "lacks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prompts", "--num", "0", "--out", str(tmp_path / "p.jsonl")])


def test_colour_matching_keeps_the_largest_detections():
    """A small red blob where the prompt's red circle is, and a larger red square elsewhere: the
    largest red detection stands for the red object (as GenEval keeps the most confident
    detections), so position and region fail; picking whichever red blob lies closest to the
    prompt's circle would pass an image with blobs of every colour everywhere."""
    def obj(shape, color, box, w=192, h=96):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return {"shape": shape, "color": color, "rgb": list(OBJECT_COLORS[color]), "size": "medium",
                "bbox": list(box), "center": [cx, cy], "position": synth_shapes._position_name(cx, cy, w, h)}

    prompt = {"version": 1, "width": 192, "height": 96,
              "background": {"kind": "plain", "colors": ["white"],
                             "rgb": [list(synth_shapes.BACKGROUND_COLORS["white"])], "direction": None},
              "objects": [obj("square", "red", (10, 34, 38, 62)), obj("square", "blue", (90, 34, 118, 62))]}
    drawn = with_objects(prompt, [obj("square", "red", (14, 38, 34, 58)),       # small, in place
                                  obj("square", "blue", (90, 34, 118, 62)),
                                  obj("square", "red", (140, 20, 190, 70))])     # large, right of blue
    image = render_layout(drawn)
    report = score_images([image], [prompt])
    assert report["categories"]["object_present"]["score"] == 1.0
    assert report["categories"]["position"]["score"] == 0.0
    assert report["categories"]["region"]["score"] == 0.0
    right = score_images([render_layout(prompt)], [prompt])
    assert right["categories"]["position"]["score"] == 1.0 and right["categories"]["region"]["score"] == 1.0


def test_grid_eval_set_and_its_ground_truth_scores(tmp_path):
    prompts_file = tmp_path / "grid.jsonl"
    assert cli.main(["prompts", "--num", "16", "--seed", "2", "--base-size", "128", "--groups",
                     "512", "--placement", "grid", "--short-style", "places",
                     "--out", str(prompts_file)]) == 0
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    grid = make_eval_set(16, seed=2, base_size=128, groups=(512,), short_style="places",
                         placement="grid")
    assert [r["layout"] for r in rows] == [p.layout for p in grid]
    assert grid != make_eval_set(16, seed=2, base_size=128, groups=(512,), short_style="places")
    for p in grid:
        assert len({o["position"] for o in p.layout["objects"]}) == len(p.layout["objects"])
        assert all(o["size"] == synth_shapes.GRID_SIZE_CLASS for o in p.layout["objects"])
    images = [synth_shapes.render_layout(p.layout, p.width, p.height) for p in grid]
    report = score_images(images, [p.layout for p in grid])
    for category in ("single_object_colour", "position", "count", "shape"):
        assert report["categories"][category]["score"] == 1.0, category
