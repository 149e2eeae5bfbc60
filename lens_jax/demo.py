"""The newcomer demo (``make demo``): train a small Lens on a CPU and watch it learn to follow prompts.

  python -m lens_jax.demo --out demo_out                       # the whole demo (make demo)
  python -m lens_jax.demo ablation --out ablation_out          # dense vs short captions (x2 encoders)
  python -m lens_jax.demo lora --base demo_out --out demo_lora_out   # a new colour with LoRA

``run`` (the default) does, one stage after another, with the project's own tools:

1. data: ``lens-data synth-shapes`` writes the training records (seed 0) and a held-out split
   (seed 1), and ``lens-eval prompts`` the held-out evaluation prompts (a disjoint seed stream);
2. train: ``lens-train --config configs/demo.py`` on the CPU (tqdm bar with the time left;
   resumes when ``--out`` already holds the run);
3. held-out loss of the initial and the trained (EMA) weights (``lens_jax.train.evaluate``);
4. sample: the trained (EMA) model and the untrained model at init, on every evaluation prompt,
   from the same noise (Euler sampler of ``lens_jax.sampling`` with classifier-free guidance),
   decoded with the run's image encoder; a grid (ground truth / trained / untrained);
5. score both sample folders with ``lens-eval layout``;
6. export the EMA weights to a diffusers folder (``lens-train export``), load it back with
   ``lens_jax.load_transformer`` and check that its output equals the trained model's;
7. print where every output is; ``summary.json`` keeps the figures (stage times, scores).

``ablation`` trains the model of ``configs/ablation_captions.py`` four times (``--arms``): on the
dense and on the short captions, with the random word table and with the toy language model as the
text encoder; samples each on the same held-out layouts (each prompted in the caption style it was
trained on) and compares their ``lens-eval layout`` scores.

``lora`` teaches the model of a finished ``run`` (``--base``) a colour it never saw
(``--concept``, one of ``synth_shapes.HELD_OUT_COLORS``) with a LoRA (``configs/demo_lora.py``):
records whose objects are partly of the new colour, the base run's word tokenizer extended by the
new word (existing ids unchanged; the frozen text table already has a row for it, never trained
on), ``lens-eval layout`` on held-out one-object prompts of the new colour and, as a check that
the old colours did not collapse, the same layouts in their original colours, before (base model)
and after (base + LoRA); then ``lens-train export --lora`` and a before/after table.

``make demo`` (and ``make ablation``, ``make demo-lora``) runs these with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: glibc then asks for transparent huge pages for the
memory XLA:CPU allocates afresh at every step, and training steps take ~17% less time on a 2-core
CPU (Makefile ``CPU_ENV``, docs/demo.md). Set it yourself when you run this module by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lens_jax.train import config_files

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.py"
ABLATION_CONFIG = REPO_ROOT / "configs" / "ablation_captions.py"
LORA_CONFIG = REPO_ROOT / "configs" / "demo_lora.py"
CATEGORIES = ("object_present", "count", "colour", "single_object_colour", "shape", "position",
              "region", "colour_binding")
# What the trained model should reach on the held-out prompts (issue 18): (object count of the
# prompts, lens-eval layout category, at least). The untrained model's scores are printed beside.
TARGETS = (("1", "single_object_colour", 0.9), ("1", "shape", 0.6), ("2", "count", 0.4),
           ("2", "position", 0.4))


# ----------------------------------------------------------------------------- small helpers

def _say(text: str) -> None:
    print(text, flush=True)


def _stage(title: str) -> None:
    _say(f"\n=== {title} " + "=" * max(3, 76 - len(title)))


def _command(args: Sequence[str]) -> None:
    _say("$ " + " ".join(str(a) for a in args))


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()):
    """The config of ``path`` (``FILE`` or ``FILE:ARG``) with ``--config.FIELD=VALUE`` overrides,
    parsed exactly as ``lens-train`` parses them (``lens_jax.train.config_files``)."""
    return config_files.load(str(path), overrides)


def _setup_logging() -> None:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("lens_jax")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"{what} failed with exit status {rc}")


def data_sizes(config) -> tuple[int, tuple[int, ...]]:
    """``(base size, bucket groups)`` of the records and prompts that match the config's buckets:
    the pipeline's buckets are the bases ``data.base_sizes`` scaled by ``data.bucket_scale``."""
    return round(512 * float(config.data.bucket_scale)), tuple(int(b) for b in config.data.base_sizes)


# ----------------------------------------------------------------------------- stages

def make_records(out: Path, num: int, seed: int, base_size: int, groups: Sequence[int],
                 short_style: str = "plain", placement: str = "free", aspect: str = "all") -> Path:
    """``lens-data synth-shapes`` (reused when ``out`` already holds the same records)."""
    from lens_jax.data import cli as data_cli
    from lens_jax.data.records import read_manifest

    manifest = read_manifest(out) if out.exists() else None
    wanted = {"seed": seed, "num": num, "base_size": base_size, "groups": list(groups),
              "short_style": None if short_style == "plain" else short_style,
              "placement": None if placement == "free" else placement,
              "aspect": None if aspect == "all" else aspect}
    if manifest and all(manifest.get("synth_shapes", {}).get(k) == v for k, v in wanted.items()):
        _say(f"reusing {out} ({num} records, seed {seed})")
        return out
    argv = ["synth-shapes", "--out", str(out), "--num", str(num), "--seed", str(seed),
            "--base-size", str(base_size), "--groups", ",".join(str(g) for g in groups),
            "--short-style", short_style, "--placement", placement, "--aspect", aspect,
            "--overwrite"]
    _command(["lens-data"] + argv)
    _check(data_cli.main(argv), "lens-data synth-shapes")
    return out


def make_prompts(path: Path, num: int, base_size: int, groups: Sequence[int], seed: int = 0,
                 short_style: str = "plain", placement: str = "free", aspect: str = "all"
                 ) -> list[dict]:
    """``lens-eval prompts`` -> the JSONL lines (held-out layouts with dense and short captions)."""
    from lens_jax.eval import cli as eval_cli

    argv = ["prompts", "--num", str(num), "--seed", str(seed), "--base-size", str(base_size),
            "--groups", ",".join(str(g) for g in groups), "--short-style", short_style,
            "--placement", placement, "--aspect", aspect, "--out", str(path)]
    _command(["lens-eval"] + argv)
    _check(eval_cli.main(argv), "lens-eval prompts")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_run(config, workdir: Path, config_path: Path, overrides: Sequence[str]) -> None:
    """``lens-train --config CONFIG --workdir DIR`` in this process (resumes an existing run).

    The printed command line holds the user's ``overrides`` and the fields the driver set:
    ``data.path`` and a ``json:`` tokenizer (the resolved ``"words"``)."""
    from lens_jax.train.loop import train

    driver_set = [f"data.path={config.data.path}"]
    if config.init_from:
        driver_set.append(f"init_from={config.init_from}")
    if str(config.data.tokenizer).startswith("json:"):
        driver_set.append(f"data.tokenizer={config.data.tokenizer}")
    if config.text_encoder.kind == "gpt_oss":  # the resolved "toy" (resolve_toy_text_encoder)
        driver_set.append(f"text_encoder.path={config.text_encoder.path}")
    _command(["lens-train", "--config", str(config_path), "--workdir", str(workdir)]
             + list(overrides) + [f"--config.{o}" for o in driver_set])
    _say(f"model: {config.model.num_layers} blocks, width "
         f"{config.model.num_attention_heads * config.model.attention_head_dim}, "
         f"{config.model.in_channels}-channel {config.image_encoder.kind} latents, "
         f"{config.text_encoder.kind} text features; {config.num_steps} steps of "
         f"{config.data.rows_per_host} packed rows; captions: "
         f"{'short' if config.data.short_caption_prob >= 0.5 else 'dense'}")
    train(config, workdir)
    ckpt = workdir / "checkpoints"
    done = max((int(p.name) for p in ckpt.iterdir() if p.name.isdigit()), default=0) if ckpt.exists() else 0
    if done < int(config.num_steps):
        raise RuntimeError(f"training stopped at step {done} of {config.num_steps} (interrupted?); "
                           f"run the same command again to resume it")


def write_word_tokenizer(path: Path, num_layouts: int = 3000, seed: int = 777) -> Path:
    """A word-level ``tokenizer.json`` (lower case, ``Whitespace`` pre-tokenizer, ``[UNK]`` = 0)
    over every word of the synth-shapes captions (dense and short) of ``num_layouts`` layouts:
    about 120 words, so a dense caption is ~110 tokens instead of ~530 bytes."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from lens_jax.data.synth_shapes import bucket_sizes, caption_dense, caption_short, sample_layout

    pre = pre_tokenizers.Whitespace()
    sizes = bucket_sizes(512)
    words: set[str] = set()
    for i in range(num_layouts):
        width, height = sizes[i % len(sizes)]
        layout = sample_layout(np.random.default_rng([seed, i]), width, height)
        for caption in (caption_dense(layout), caption_short(layout)):
            words.update(w for w, _ in pre.pre_tokenize_str(caption.lower()))
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(sorted(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    _say(f"wrote {path} (word-level tokenizer, {len(vocab)} entries)")
    return path


def resolve_word_tokenizer(configs: Sequence[Any], out: Path) -> Path | None:
    """``data.tokenizer = "words"`` (configs/demo.py) -> ``json:OUT/word_tokenizer.json``, written
    once by ``write_word_tokenizer``; returns its path (None when no config asks for it)."""
    wanted = [c for c in configs if c.data.tokenizer == "words"]
    if not wanted:
        return None
    path = out / "word_tokenizer.json"
    if not path.is_file():
        write_word_tokenizer(path)
    for c in wanted:
        c.data.tokenizer = f"json:{path}"
    return path


def resolve_toy_text_encoder(configs: Sequence[Any], out: Path, train_dir: Path) -> Path | None:
    """``text_encoder.path = "toy"`` (with ``kind="gpt_oss"``, configs/demo_toy_lm.py) -> the
    folder ``OUT/text_encoder`` of a tiny GPT-OSS LM trained on the dense and short captions of
    the records in ``train_dir`` (``lens_jax.train.toy_text_encoder.train_or_reuse``: reused when
    the corpus and settings are unchanged); checks each config's ``model.selected_layer_index``
    and ``enc_hidden_dim`` against it. Returns the folder (None when no config asks for it)."""
    from lens_jax.data.records import read_examples
    from lens_jax.train import toy_text_encoder

    wanted = [c for c in configs if c.text_encoder.kind == "gpt_oss" and c.text_encoder.path == "toy"]
    if not wanted:
        return None
    spec = str(wanted[0].data.tokenizer)
    if any(str(c.data.tokenizer) != spec for c in wanted):
        raise ValueError("text_encoder.path='toy': the configs use different data.tokenizer values")
    texts = [t for ex in read_examples(train_dir) for t in (ex.caption, ex.short_caption) if t]
    folder = toy_text_encoder.train_or_reuse(texts, spec, out / "text_encoder", log=_say)
    for c in wanted:
        toy_text_encoder.check_matches(folder, c.model.selected_layer_index, c.model.enc_hidden_dim)
        c.text_encoder.path = str(folder)
    return folder


def heldout_loss(workdir: Path, data: Path, batches: int) -> dict[str, float]:
    """Mean held-out loss over sigma 0.1..0.9 of the initial and the trained (EMA) weights."""
    from lens_jax.train import evaluate

    path = workdir / "heldout_loss.json"
    argv = ["--workdir", str(workdir), "--data", str(data), "--steps", "0,last", "--ema",
            "--batches", str(batches), "--json", str(path)]
    _command(["python", "-m", "lens_jax.train.evaluate"] + argv)
    _check(evaluate.main(argv), "lens_jax.train.evaluate")
    raw = json.loads(path.read_text())
    return {("init" if step == "0" else f"step_{step}_ema"): float(np.mean(list(v.values())))
            for step, v in raw.items()}


class Sampler:
    """Samples a run's models (trained EMA weights / weights at init) on evaluation prompts."""

    def __init__(self, workdir: Path, steps: int, guidance: float, seed: int = 0, batch: int = 8,
                 tokenizer: str | None = None, untrained: bool = True):
        """``tokenizer``: a ``data.tokenizer`` replacing the run's (``lora``: the extended one);
        ``untrained=False``: no "untrained" model (a LoRA run's init is its base)."""
        import jax

        from lens_jax.train.export import restore_weights
        from lens_jax.train.run_files import run_config
        from lens_jax.train.trainer import Trainer

        config = run_config(workdir)
        config.mesh.num_devices = 1
        config.mesh.update(slice=1, data=1, fsdp=1, tensor=1)
        if tokenizer is not None:
            config.data.tokenizer = tokenizer
        if not untrained:
            config.init_from = ""  # Trainer() loads nothing then
        self.config = config
        self.trainer = Trainer(config)
        self.params = {}
        self.params["trained"], self.step, self.weights = restore_weights(workdir, -1, ema=True)
        if untrained:
            self.params["untrained"] = jax.device_get(self.trainer.init_state()["params"])
        self.steps, self.guidance, self.seed, self.batch = int(steps), float(guidance), int(seed), int(batch)

    def model(self, which: str):
        from flax import nnx

        return nnx.merge(self.trainer.graphdef, self.params[which])

    def _features(self, texts: list[str]):
        import jax.numpy as jnp

        from lens_jax.train.samples import prompt_features

        feats, mask = prompt_features(self.config, self.trainer.frozen, texts)
        length = -(-mask.shape[1] // 64) * 64  # pad to a multiple of 64: few compiled programs
        pad = length - mask.shape[1]
        feats = [jnp.pad(f, ((0, 0), (0, pad), (0, 0))) for f in feats]
        return feats, jnp.pad(mask, ((0, 0), (0, pad)))

    def sample(self, which: str, texts: list[str], indices: list[int], width: int, height: int
               ) -> np.ndarray:
        """uint8 ``[len(texts), height, width, 3]``; image k starts from noise (seed, indices[k])."""
        from lens_jax.sampling.denoise import denoise, initial_noise
        from lens_jax.sampling.scheduler import sigmas_for
        from lens_jax.train.samples import decode_latents

        hw = (height // 16, width // 16)
        n = hw[0] * hw[1]
        model = self.model(which)
        out = []
        for start in range(0, len(texts), self.batch):
            chunk, idx = texts[start:start + self.batch], indices[start:start + self.batch]
            fill = self.batch - len(chunk)  # same batch size always: one program per size
            feats, mask = self._features(chunk + [""] * fill)
            noise = initial_noise(self.seed, idx + [0] * fill, n, int(self.config.model.in_channels))
            latents = denoise(model, noise, feats, mask, sigmas_for(self.steps, n), self.guidance, hw)
            out.append(decode_latents(self.config, self.trainer.frozen, latents, hw)[:len(chunk)])
        return np.concatenate(out)


def sample_prompts(sampler: Sampler, which: str, prompts: list[dict], prompt_key: str, folder: Path
                   ) -> list[np.ndarray]:
    """Samples every prompt at its size into ``folder`` (NAME.png + NAME.json sidecar)."""
    from PIL import Image
    from tqdm import tqdm

    from lens_jax.eval.layout import write_sidecar

    folder.mkdir(parents=True, exist_ok=True)
    images: list[np.ndarray | None] = [None] * len(prompts)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(prompts):
        by_size.setdefault((int(p["width"]), int(p["height"])), []).append(i)
    with tqdm(total=len(prompts), desc=f"sample {which}", unit="img", dynamic_ncols=True) as bar:
        for (width, height), members in sorted(by_size.items()):
            texts = [prompts[i][prompt_key] for i in members]
            for i, image in zip(members, sampler.sample(which, texts, members, width, height)):
                images[i] = image
                name = f"{i:05d}"
                Image.fromarray(image).save(folder / f"{name}.png")
                p = prompts[i]
                write_sidecar(folder / f"{name}.json", p["layout"], p["caption"], p["short_caption"],
                              prompt=p[prompt_key], index=i, model=which, step=sampler.step,
                              steps=sampler.steps, guidance=sampler.guidance, seed=sampler.seed)
            bar.update(len(members))
    return images


def save_grid(path: Path, rows: dict[str, list[np.ndarray]], texts: list[str]) -> Path:
    """One column per prompt, one labelled row per model; prompts listed in ``path.txt``."""
    from PIL import Image, ImageDraw

    cell = max(max(im.shape[0], im.shape[1]) for row in rows.values() for im in row)
    label_w, pad = 70, 4
    cols = len(texts)
    canvas = Image.new("RGB", (label_w + cols * (cell + pad), len(rows) * (cell + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows.items()):
        y = r * (cell + pad)
        draw.text((4, y + cell // 2 - 5), label, fill=(0, 0, 0))
        for c, im in enumerate(images):
            h, w = im.shape[:2]
            canvas.paste(Image.fromarray(im), (label_w + c * (cell + pad) + (cell - w) // 2, y + (cell - h) // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    path.with_suffix(".txt").write_text("".join(f"column {c}: {t}\n" for c, t in enumerate(texts)))
    return path


def score_folder(folder: Path, out: Path, held_out_colors: Sequence[str] = ()) -> dict[str, Any]:
    """``lens-eval layout FOLDER --out OUT [--held-out-colors ...]`` -> the report."""
    from lens_jax.eval import cli as eval_cli

    argv = ["layout", str(folder), "--out", str(out), "--no-progress"]
    if held_out_colors:
        argv += ["--held-out-colors", ",".join(held_out_colors)]
    _command(["lens-eval"] + argv)
    _check(eval_cli.main(argv), "lens-eval layout")
    return json.loads(out.read_text())


def target_check(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``TARGETS`` against the trained and untrained reports' ``by_object_count`` scores (a
    category the prompts lack scores 0: not met)."""
    rows = []
    for objects, category, at_least in TARGETS:
        scores = {which: (reports[which]["by_object_count"].get(objects, {}).get(category, {})
                          .get("score") or 0.0) for which in ("trained", "untrained")}
        rows.append({"objects": objects, "category": category, "at_least": at_least, **scores,
                     "met": scores["trained"] >= at_least})
    return rows


def compare_table(reports: dict[str, dict[str, Any]]) -> str:
    names = list(reports)
    lines = [f"{'category':<22}" + "".join(f"{n:>12}" for n in names), "-" * (22 + 12 * len(names))]
    for cat in CATEGORIES:
        lines.append(f"{cat:<22}" + "".join(
            f"{reports[n]['categories'][cat]['score']:>12.3f}" for n in names))
    lines.append(f"{'overall':<22}" + "".join(f"{reports[n]['overall']:>12.3f}" for n in names))
    return "\n".join(lines)


# The line the demo ends with: what the scores are.
SCORES_MEAN = ("Each score is the fraction of held-out prompts whose sample lens-eval layout "
               "(colour segmentation of the image against the prompt's layout) finds right; "
               "the untrained model's noise holds blobs of every colour, so it passes "
               "object_present, position and region by chance: compare the colour and shape rows.")
# ... and, with the default records (--placement grid --aspect square), what the task leaves out.
TASK_IS_EASIER = ("The task is easier than Lens's: one image size, each object at the centre of "
                  "its named ninth in one size, a caption that fixes the image (--placement grid "
                  "--aspect square); the model, training and sampler are Lens's. With --placement "
                  "free --aspect all this model draws colour patches, not shapes, within these "
                  "steps (docs/demo.md, 'Towards shapes').")


def by_object_count_table(reports: dict[str, dict[str, Any]],
                          rows: Sequence[tuple[str, str]] = (("1", "single_object_colour"),
                                                             ("1", "shape"), ("2", "count"),
                                                             ("2", "position"), ("2", "colour"))
                          ) -> str:
    """Selected categories on the prompts of one object count (``by_object_count`` of the
    reports), one column per model; "n/a" where the category does not apply."""
    names = list(reports)
    lines = [f"{'objects: category':<22}" + "".join(f"{n:>12}" for n in names)]
    for count, cat in rows:
        cells = []
        for n in names:
            row = reports[n].get("by_object_count", {}).get(count, {}).get(cat)
            cells.append(f"{'n/a':>12}" if not row or row["score"] is None else f"{row['score']:>12.3f}")
        lines.append(f"{count + ': ' + cat:<22}" + "".join(cells))
    return "\n".join(lines)


def export_and_check(workdir: Path, out: Path, sampler: Sampler) -> dict[str, Any]:
    """``lens-train export`` the EMA weights, reload with ``lens_jax.load_transformer``, compare."""
    import jax
    import jax.numpy as jnp

    import lens_jax
    from lens_jax.train import export as export_cli

    argv = ["--workdir", str(workdir), "--out", str(out), "--overwrite"]
    _command(["lens-train", "export"] + argv)
    _check(export_cli.main(argv), "lens-train export")
    reloaded = lens_jax.load_transformer(str(out))
    trained = sampler.model("trained")
    cfg = sampler.config.model
    rng = np.random.default_rng(0)
    hw, n_txt, b = (3, 4), 7, 2
    latents = jnp.asarray(rng.standard_normal((b, hw[0] * hw[1], cfg.in_channels)), jnp.float32)
    feats = [jnp.asarray(rng.standard_normal((b, n_txt, cfg.enc_hidden_dim)), jnp.float32)
             for _ in cfg.selected_layer_index]
    mask = jnp.asarray(np.arange(n_txt)[None, :] < np.array([[n_txt], [4]]))
    t = jnp.asarray([0.3, 0.8], jnp.float32)
    expected = np.asarray(trained(latents, feats, t, latent_hw=hw, text_mask=mask))
    got = np.asarray(reloaded(latents, feats, t, latent_hw=hw, text_mask=mask))
    err = float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))
    ok = bool(err <= 1e-6)
    _say(f"reloaded {out} with lens_jax.load_transformer: output vs the trained EMA model on a fixed "
         f"input: max relative error {err:.2e} ({'equal' if ok else 'DIFFERENT'}); "
         f"{sum(x.size for x in jax.tree.leaves(sampler.params['trained'])):,} parameters")
    if not ok:
        raise RuntimeError(f"the exported folder {out} does not reproduce the trained model "
                           f"(max relative error {err:.2e})")
    return {"max_rel_err": err, "equal": ok}


# ----------------------------------------------------------------------------- run

def run(args: argparse.Namespace) -> dict[str, Any]:
    _setup_logging()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    config_path = Path(args.config)
    config = load_config(config_path, args.overrides)
    base_size, groups = data_sizes(config)
    prompt_key = "short_caption" if config.data.short_caption_prob >= 0.5 else "caption"
    words = resolve_word_tokenizer([config], out)

    _stage("1/7 data: synthetic shapes records and held-out prompts")
    t = time.perf_counter()
    train_dir = make_records(out / "data" / "train", args.train_num, 0, base_size, groups,
                             args.short_captions, args.placement, args.aspect)
    heldout_dir = make_records(out / "data" / "heldout", args.heldout_num, 1, base_size, groups,
                               args.short_captions, args.placement, args.aspect)
    prompts = make_prompts(out / "eval_prompts.jsonl", args.eval_num, base_size, groups,
                           short_style=args.short_captions, placement=args.placement,
                           aspect=args.aspect,
                           seed=args.eval_seed)
    timings["data"] = time.perf_counter() - t
    t = time.perf_counter()
    toy_lm = resolve_toy_text_encoder([config], out, train_dir)
    if toy_lm:
        timings["text_encoder"] = time.perf_counter() - t

    _stage("2/7 train on the CPU")
    t = time.perf_counter()
    workdir = out / "run"
    config.data.path = str(train_dir)
    train_run(config, workdir, config_path, args.overrides)
    timings["train"] = time.perf_counter() - t
    metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]

    _stage("3/7 held-out loss (sigma 0.1..0.9), initial vs trained weights")
    t = time.perf_counter()
    losses = heldout_loss(workdir, heldout_dir, args.heldout_batches)
    timings["heldout_loss"] = time.perf_counter() - t

    _stage(f"4/7 sample {len(prompts)} held-out prompts: trained (EMA) and untrained (init) model")
    t = time.perf_counter()
    sampler = Sampler(workdir, args.sample_steps, args.guidance)
    folders = {"trained": out / "samples" / "trained", "untrained": out / "samples" / "untrained"}
    images = {which: sample_prompts(sampler, which, prompts, prompt_key, folder)
              for which, folder in folders.items()}
    from lens_jax.data.synth_shapes import render_layout

    g = min(args.grid, len(prompts))
    truth = [render_layout(p["layout"], p["width"], p["height"]) for p in prompts[:g]]
    grid = save_grid(out / "grid.png", {"truth": truth, "trained": images["trained"][:g],
                                        "untrained": images["untrained"][:g]},
                     [p[prompt_key] for p in prompts[:g]])
    _say(f"wrote {grid} (rows: ground truth, trained, untrained; prompts in {grid.with_suffix('.txt')})")
    timings["sample"] = time.perf_counter() - t

    _stage("5/7 score with lens-eval layout")
    t = time.perf_counter()
    reports = {which: score_folder(folder, out / f"scores_{which}.json") for which, folder in folders.items()}
    table = compare_table(reports)
    _say("\n" + table)
    targets = target_check(reports)
    target_lines = [f"target: {row['category']} on {row['objects']}-object prompts >= "
                    f"{row['at_least']}: trained {row['trained']:.2f} vs untrained "
                    f"{row['untrained']:.2f} ({'met' if row['met'] else 'NOT met'})" for row in targets]
    _say("\n".join(target_lines))
    timings["score"] = time.perf_counter() - t

    _stage("6/7 export the EMA weights to a diffusers folder and load them back")
    t = time.perf_counter()
    exported = out / "export" / "transformer"
    check = export_and_check(workdir, exported, sampler)
    timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    summary = {
        "config": str(config_path), "overrides": list(args.overrides), "num_steps": int(config.num_steps),
        "prompt_key": prompt_key, "short_captions": args.short_captions,
        "placement": args.placement, "aspect": args.aspect,
        "sample_steps": args.sample_steps, "guidance": args.guidance,
        "final_train_loss": metrics[-1]["loss"] if metrics else None, "heldout_loss": losses,
        "scores": {which: {c: r["categories"][c]["score"] for c in CATEGORIES} | {"overall": r["overall"]}
                   for which, r in reports.items()},
        "scores_by_object_count": {which: {n: {c: row["score"] for c, row in cats.items()}
                                           for n, cats in r["by_object_count"].items()}
                                   for which, r in reports.items()},
        "targets": targets, "export_check": check,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "outputs": {
            "train_records": str(train_dir), "heldout_records": str(heldout_dir),
            "eval_prompts": str(out / "eval_prompts.jsonl"),
            **({"word_tokenizer": str(words)} if words else {}),
            **({"toy_text_encoder": str(toy_lm)} if toy_lm else {}), "workdir": str(workdir),
            "metrics": str(workdir / "metrics.jsonl"), "tensorboard": str(workdir / "tensorboard"),
            "training_sample_grids": str(workdir / "samples"), "grid": str(grid),
            "samples_trained": str(folders["trained"]), "samples_untrained": str(folders["untrained"]),
            "scores_trained": str(out / "scores_trained.json"),
            "scores_untrained": str(out / "scores_untrained.json"),
            "heldout_loss": str(workdir / "heldout_loss.json"),
            "exported_transformer": str(exported), "summary": str(out / "summary.json")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    _stage("7/7 done: where everything is")
    for k, v in summary["outputs"].items():
        _say(f"  {k:<22} {v}")
    _say("  " + "  ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items()))
    _say(f"  held-out loss: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    _say(f"  tensorboard --logdir {workdir / 'tensorboard'}   (if TensorBoard is installed)")
    _say("")
    _say(table)  # stage 5's, repeated so that the run ends with it
    _say(by_object_count_table(reports))
    _say("\n".join(target_lines))
    _say(f"grid (ground truth / trained / untrained, first {args.grid} prompts): {grid}")
    _say(SCORES_MEAN)
    if args.placement == "grid" and args.aspect == "square":
        _say(TASK_IS_EASIER)
    return summary


# ----------------------------------------------------------------------------- ablation

def ablation(args: argparse.Namespace) -> dict[str, Any]:
    _setup_logging()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    arms = tuple(args.arms)
    timings: dict[str, float] = {}
    if not arms:
        raise ValueError("--arms: no arm given (e.g. --arms dense,short)")
    configs = {arm: load_config(f"{args.config}:{arm}", args.overrides) for arm in arms}
    base_size, groups = data_sizes(configs[arms[0]])
    if any(data_sizes(c) != (base_size, groups) for c in configs.values()):
        raise ValueError(f"--arms {','.join(arms)}: the arms' data.bucket_scale / data.base_sizes "
                         "differ; they must train on the same records")
    resolve_word_tokenizer(list(configs.values()), out)

    _stage("data: synthetic shapes records and held-out prompts")
    t = time.perf_counter()
    train_dir = make_records(out / "data" / "train", args.train_num, 0, base_size, groups)
    prompts = make_prompts(out / "eval_prompts.jsonl", args.eval_num, base_size, groups,
                           seed=args.eval_seed)
    timings["data"] = time.perf_counter() - t
    if any(c.text_encoder.path == "toy" for c in configs.values()):
        _stage("toy text encoder: a tiny GPT-OSS trained on the captions")
        t = time.perf_counter()
        resolve_toy_text_encoder(list(configs.values()), out, train_dir)
        timings["toy_text_encoder"] = time.perf_counter() - t

    reports = {}
    for arm in arms:
        config = configs[arm]
        config.data.path = str(train_dir)
        _stage(f"train on the {arm} captions")
        t = time.perf_counter()
        workdir = out / f"run_{arm}"
        train_run(config, workdir, Path(f"{args.config}:{arm}"), args.overrides)
        timings[f"train_{arm}"] = time.perf_counter() - t
        _stage(f"sample and score the {arm}-caption model")
        t = time.perf_counter()
        sampler = Sampler(workdir, args.sample_steps, args.guidance)
        key = "caption" if float(config.data.short_caption_prob) == 0.0 else "short_caption"
        sample_prompts(sampler, "trained", prompts, key, out / "samples" / arm)
        reports[arm] = score_folder(out / "samples" / arm, out / f"scores_{arm}.json")
        timings[f"sample_score_{arm}"] = time.perf_counter() - t

    table = compare_table(reports)
    _stage("dense vs short captions (same held-out layouts; each model prompted in its own style)")
    _say(table)
    summary = {"config": str(args.config), "overrides": list(args.overrides),
               "num_steps": {arm: int(configs[arm].num_steps) for arm in arms},
               "scores": {arm: {c: r["categories"][c]["score"] for c in CATEGORIES} | {"overall": r["overall"]}
                          for arm, r in reports.items()},
               "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "outputs": {"train_records": str(train_dir), "eval_prompts": str(out / "eval_prompts.jsonl"),
                           **{f"workdir_{a}": str(out / f"run_{a}") for a in arms},
                           **{f"samples_{a}": str(out / "samples" / a) for a in arms},
                           **{f"scores_{a}": str(out / f"scores_{a}.json") for a in arms}}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _say(f"wrote {out / 'summary.json'}")
    return summary


# ----------------------------------------------------------------------------- lora

def extend_word_tokenizer(base: Path, out: Path, texts: Sequence[str], vocab_size: int) -> list[str]:
    """``base``'s word-level tokenizer with every word of ``texts`` it lacks appended (ids after
    the existing ones, which keep theirs: the base model reads old captions exactly as before),
    saved as ``out``; returns the new words. ``vocab_size``: rows of the frozen text table
    (``text_encoder.vocab_size``), which every id must stay below."""
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer.from_file(str(base))
    vocab = tokenizer.get_vocab()
    new: list[str] = []
    for text in texts:
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text)):
            if word not in vocab and word not in new:
                new.append(word)
    vocab = vocab | {w: len(vocab) + i for i, w in enumerate(new)}
    if len(vocab) > vocab_size:
        raise ValueError(f"{base}: {len(vocab)} words with {new} do not fit the text table of "
                         f"text_encoder.vocab_size={vocab_size} rows")
    extended = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    extended.normalizer = tokenizer.normalizer
    extended.pre_tokenizer = tokenizer.pre_tokenizer
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    extended.save(str(tmp))
    tmp.replace(out)
    _say(f"wrote {out} ({base.name} + {new or 'no new words'}: ids {len(vocab) - len(new)}.."
         f"{len(vocab) - 1})")
    return new


def concept_prompts(num: int, seed: int, base_size: int, groups: Sequence[int], color: str,
                    short_style: str = "plain", placement: str = "free", aspect: str = "all"
                    ) -> tuple[list[dict], list[dict]]:
    """``num`` held-out one-object prompts of the new ``color`` and the same layouts in their
    original colours (``make_eval_set``'s stream, disjoint from every training stream): same
    shapes, sizes, places, backgrounds and noise; only the colour word differs. Short captions
    of ``short_style``, layouts of ``placement`` and sizes of ``aspect`` (the base run's)."""
    from lens_jax.data.synth_shapes import caption_dense, caption_short, with_new_color
    from lens_jax.eval.layout import make_eval_set

    singles = [p for p in make_eval_set(4 * num, seed, base_size, groups, placement=placement,
                                        aspect=aspect)
               if len(p.layout["objects"]) == 1]

    def row(layout: dict, p) -> dict:
        return {"caption": caption_dense(layout), "short_caption": caption_short(layout, short_style),
                "width": p.width, "height": p.height, "layout": layout}

    old = [row(p.layout, p) for p in singles[:num]]
    new = [row(with_new_color(p.layout, np.random.default_rng([seed, i]), color), p)
           for i, p in enumerate(singles[:num])]
    return new, old


def lora_table(reports: dict[str, dict[str, Any]], color: str) -> str:
    """Before/after rows (base, base + LoRA) for the new colour's and the old colours' prompts."""
    # no shape row: 12 DCT channels cannot carry shapes (docs/demo.md), so it scores noise
    rows = (("single_object_colour", "single-object colour"), ("object_present", "colour present"),
            ("count", "no extra objects"))
    lines = [f"{'prompts':<14} {'lens-eval layout':<22} {'before (base)':>14} {'after (+LoRA)':>14}",
             "-" * 67]
    for prompts, label in ((color, f"new: {color}"), ("old", "old colours")):
        for key, name in rows:
            b = reports[f"{prompts}_before"]["categories"][key]
            a = reports[f"{prompts}_after"]["categories"][key]
            lines.append(f"{label:<14} {name:<22} {b['score']:>8.3f} ({b['passed']:>2}) "
                         f"{a['score']:>8.3f} ({a['passed']:>2})")
        n = reports[f"{prompts}_before"]["num_images"]
        lines.append(f"{'':<14} ({n} one-object prompts, passed in brackets; segmented with the "
                     f"eight colours and {color})")
    return "\n".join(lines)


def lora(args: argparse.Namespace) -> dict[str, Any]:
    _setup_logging()
    from lens_jax.data.synth_shapes import HELD_OUT_COLORS, write_dataset
    from lens_jax.train.run_files import run_config

    base_run = Path(args.base).absolute() / "run"
    out = Path(args.out).absolute()
    if not (base_run / "config.json").is_file():
        raise FileNotFoundError(f"--base {args.base}: no finished demo run in {base_run} (run "
                                "python -m lens_jax.demo --out DIR first, or make demo)")
    if args.concept not in HELD_OUT_COLORS:
        raise ValueError(f"--concept {args.concept}: not a held-out colour; known: {sorted(HELD_OUT_COLORS)}")
    out.mkdir(parents=True, exist_ok=True)
    # A finished LoRA run in --out is reused (not retrained): only for the same base and data.
    settings = {"base": str(base_run), "concept": args.concept, "train_num": args.train_num}
    settings_file = out / "lora_settings.json"
    if (out / "run" / "config.json").is_file() and settings_file.is_file():
        before = json.loads(settings_file.read_text())
        if before != settings:
            raise ValueError(f"--out {out} holds a LoRA run of {before}, not {settings}: "
                             "choose another --out")
    settings_file.write_text(json.dumps(settings))
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    base_config = run_config(base_run)
    config_path = Path(args.config)
    config = load_config(config_path, args.overrides)
    base_size, groups = data_sizes(config)
    prompt_key = "short_caption" if config.data.short_caption_prob >= 0.5 else "caption"
    color = args.concept
    # the base run's short-caption style (its records' manifest; runs before the styles: plain)
    from lens_jax.data.records import read_manifest

    base_manifest = read_manifest(Path(str(base_config.data.path))) or {}
    settings = base_manifest.get("synth_shapes", {})  # a key is written when not the default
    short_style = settings.get("short_style", "plain")
    placement = settings.get("placement", "free")
    aspect = settings.get("aspect", "all")

    _stage(f"1/6 data: records with the new colour '{color}', held-out prompts, tokenizer")
    t = time.perf_counter()
    base_tok = str(base_config.data.tokenizer)
    if not base_tok.startswith("json:"):
        raise ValueError(f"{base_run}/config.json: data.tokenizer={base_tok!r}; the lora demo "
                         "extends the base run's word-level json: tokenizer")
    train_dir = out / "data" / "train"
    _say(f"synth_shapes.write_dataset({train_dir}, num={args.train_num}, seed=2, "
         f"base_size={base_size}, groups={list(groups)}, new_color={color!r}, "
         f"short_style={short_style!r}, placement={placement!r}, aspect={aspect!r})")
    write_dataset(train_dir, args.train_num, seed=2, base_size=base_size, groups=groups,
                  overwrite=True, new_color=color, short_style=short_style, placement=placement,
                  aspect=aspect)
    new_prompts, old_prompts = concept_prompts(args.eval_num, 2, base_size, groups, color,
                                               short_style, placement, aspect)
    for name, rows in ((color, new_prompts), ("old", old_prompts)):
        (out / f"eval_prompts_{name}.jsonl").write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    from lens_jax.data.records import read_examples

    captions = [ex.short_caption for ex in read_examples(train_dir)] + [r[prompt_key] for r in new_prompts]
    tokenizer = out / "word_tokenizer.json"
    new_words = extend_word_tokenizer(Path(base_tok[len("json:"):]), tokenizer, captions,
                                      int(base_config.text_encoder.vocab_size))
    with_color = sum(color in c.split() for c in captions[:args.train_num])
    _say(f"{args.train_num} records ({with_color} captions name '{color}'), e.g. "
         f"{captions[0]!r}; {len(new_prompts)} held-out prompts, e.g. {new_prompts[0][prompt_key]!r} "
         f"(and {old_prompts[0][prompt_key]!r})")
    timings["data"] = time.perf_counter() - t

    prompt_sets = {color: new_prompts, "old": old_prompts}
    reports: dict[str, dict[str, Any]] = {}

    def sample_and_score(sampler: Sampler, when: str) -> None:
        for name, rows in prompt_sets.items():
            folder = out / "samples" / f"{name}_{when}"
            sample_prompts(sampler, "trained", rows, prompt_key, folder)
            # the new colour in every palette: a cyan blob for "a red star" is cyan, not "blue"
            reports[f"{name}_{when}"] = score_folder(folder, out / f"scores_{name}_{when}.json",
                                                     [color])

    _stage("2/6 before: the base model on the held-out prompts, scored with lens-eval layout")
    t = time.perf_counter()
    sample_and_score(Sampler(base_run, args.sample_steps, args.guidance, tokenizer=f"json:{tokenizer}",
                             untrained=False), "before")
    timings["before"] = time.perf_counter() - t

    _stage(f"3/6 train a LoRA from the base run's weights ({config_path.name})")
    t = time.perf_counter()
    workdir = out / "run"
    config.data.path = str(train_dir)
    config.data.tokenizer = f"json:{tokenizer}"
    config.init_from = f"run:{base_run}"
    train_run(config, workdir, config_path, args.overrides)
    timings["train"] = time.perf_counter() - t

    _stage("4/6 after: base + LoRA on the same prompts and noise")
    t = time.perf_counter()
    sample_and_score(Sampler(workdir, args.sample_steps, args.guidance, untrained=False), "after")
    timings["after"] = time.perf_counter() - t

    _stage("5/6 export the LoRA for PyTorch (lens-train export --lora)")
    t = time.perf_counter()
    from lens_jax.train import export as export_cli

    lora_dir = out / "lora"
    argv = ["--workdir", str(workdir), "--out", str(lora_dir), "--lora", "--overwrite"]
    _command(["lens-train", "export"] + argv)
    _check(export_cli.main(argv), "lens-train export --lora")
    timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    _stage(f"6/6 before / after: '{color}' (never in the base run's data) and the old colours")
    table = lora_table(reports, color)
    _say(table)
    summary = {
        "base": str(base_run), "concept": color, "new_words": new_words,
        "config": str(config_path), "overrides": list(args.overrides), "num_steps": int(config.num_steps),
        "prompt_key": prompt_key, "short_captions": short_style,
        "sample_steps": args.sample_steps, "guidance": args.guidance,
        "scores": {k: {c: r["categories"][c]["score"] for c in CATEGORIES} | {"overall": r["overall"]}
                   for k, r in reports.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "table": table,
        "outputs": {"train_records": str(train_dir), "word_tokenizer": str(tokenizer),
                    "workdir": str(workdir), "lora": str(lora_dir),
                    **{f"samples_{k}": str(out / "samples" / k) for k in reports},
                    **{f"scores_{k}": str(out / f"scores_{k}.json") for k in reports}},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _say(f"\nLoRA file: {lora_dir / 'pytorch_lora_weights.safetensors'} (PEFT keys; load with "
         f"lens-sample --lora FILE or diffusers)")
    _say("  " + "  ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items()))
    _say(f"wrote {out / 'summary.json'}")
    return summary


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    from lens_jax.data.synth_shapes import (ASPECTS, HELD_OUT_COLORS, PLACEMENTS,
                                            SHORT_CAPTION_STYLES)

    p = argparse.ArgumentParser(prog="python -m lens_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")

    def common(q: argparse.ArgumentParser, config: Path, out: str, train_num: int = 4000,
               eval_num: int = 200, guidance: float = 4.0, guidance_why: str = "") -> None:
        q.add_argument("--out", default=out, help=f"output folder (default {out}); an existing "
                       "one is reused: same records are kept, a finished run is not retrained")
        q.add_argument("--config", default=str(config), help=f"training config file (default {config}); "
                       "any field is overridden as for lens-train: --config.FIELD=VALUE, e.g. "
                       "--config.num_steps=200 (repeatable)")
        q.add_argument("--train-num", type=int, default=train_num,
                       help=f"training records (default {train_num})")
        q.add_argument("--eval-num", type=int, default=eval_num,
                       help=f"held-out evaluation prompts (default {eval_num}): 1-4 objects in "
                       "equal shares; lora: one-object prompts of the new colour (and as many of "
                       "the old colours)")
        q.add_argument("--sample-steps", type=int, default=20, help="Euler steps per sample (default 20)")
        q.add_argument("--guidance", type=float, default=guidance,
                       help=f"classifier-free guidance (default {guidance:g}: {guidance_why})")

    def eval_seed(q: argparse.ArgumentParser) -> None:
        q.add_argument("--eval-seed", type=int, default=0,
                       help="seed of the held-out prompts (lens-eval prompts --seed; default 0, "
                       "the reported ones): tune on another seed (validation), never on 0")

    r = sub.add_parser("run", help="the whole demo (default)")
    common(r, DEFAULT_CONFIG, "demo_out", guidance_why="the best shape, count and position "
           "on validation prompts of another seed (shape and count both >= 0.72); docs/demo.md trial 20")
    eval_seed(r)
    r.add_argument("--heldout-num", type=int, default=200, help="held-out records (default 200)")
    r.add_argument("--heldout-batches", type=int, default=4, help="held-out loss batches (default 4)")
    r.add_argument("--grid", type=int, default=12, help="prompts in grid.png (default 12)")
    r.add_argument("--short-captions", choices=SHORT_CAPTION_STYLES, default="scene",
                   help="style of the short captions the model trains on and is prompted with "
                   "(lens-data synth-shapes --short-style): 'scene' (default) names each object's "
                   "ninth of the image and the background (\"a red circle upper left and a blue "
                   "square centre on a plain beige background\"); 'places' the objects' ninths "
                   "only; 'plain' the objects only")

    r.add_argument("--placement", choices=PLACEMENTS, default="grid",
                   help="where the records' and prompts' objects go (lens-data synth-shapes "
                   "--placement): 'grid' (default) each at the centre of its own ninth, one size, "
                   "so that a 'scene' caption fixes the image; 'free' anywhere, in three sizes "
                   "(needs far more training than 15 minutes give: docs/demo.md)")

    r.add_argument("--aspect", choices=ASPECTS, default="square",
                   help="image sizes of the records and prompts (lens-data synth-shapes --aspect): "
                   "'square' the square bucket of the config's groups only (default: one size, so "
                   "the model learns where each ninth is within minutes), 'all' their nine "
                   "aspect ratios")
    a = sub.add_parser("ablation", help="dense vs short captions")
    common(a, ABLATION_CONFIG, "ablation_out", guidance=12.0, guidance_why="best single-object "
           "colour of the free-layout demo on validation prompts, docs/demo.md")
    eval_seed(a)
    a.add_argument("--arms", default="dense,short,dense_toy_lm,short_toy_lm",
                   type=lambda v: [x for x in v.split(",") if x],
                   help="comma-separated arms of the ablation config (default all four: dense and "
                   "short captions with the random word table, then with the toy language model)")

    lo = sub.add_parser("lora", help="teach a finished run a new colour with LoRA")
    common(lo, LORA_CONFIG, "demo_lora_out", train_num=800, eval_num=32,
           guidance_why="make demo's, for the model it trains on")
    lo.add_argument("--base", default="demo_out",
                    help="output folder of a finished demo run (default demo_out: make demo's)")
    lo.add_argument("--concept", default="cyan", choices=sorted(HELD_OUT_COLORS),
                    help="the colour to teach (never drawn in the base run's data; default cyan)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "ablation", "lora", "-h", "--help"):
        argv = ["run"] + argv
    try:
        config_file, overrides, argv = config_files.split_config_args(argv)
    except ValueError as e:
        print(f"lens_jax.demo: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if config_file is not None:
        args.config = config_file
    args.overrides = overrides
    try:
        {"ablation": ablation, "lora": lora}.get(args.command, run)(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"lens_jax.demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
