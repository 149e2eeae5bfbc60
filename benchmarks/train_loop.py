"""The loop's cost over the step: ``lens-train``'s loop against the compiled step alone, same shapes.

    .venv/bin/python benchmarks/train_loop.py --data DIR [--config tiny|demo|...] [--steps 60] [--set data.resample=bicubic]

``DIR``: synthetic-shapes records (``lens-data synth-shapes --base-size 64`` for tiny; ``--base-size
128 --groups 512 --aspect square --placement grid --short-style scene`` for demo and demo_toy_lm,
e.g. ``make demo``'s ``demo_out/data/train``; ``--base-size 96 --groups 512`` for the ablation
configs). The toy-LM configs also need ``--set text_encoder.path=FOLDER``: a toy LM trained with
the same word tokenizer, e.g. ``OUT/text_encoder`` of ``python -m lens_jax.demo --config
configs/demo_toy_lm.py --out OUT``. In one process:
1. the loop: ``lens_jax.train.loop.train`` for ``--steps`` steps (data pipeline, batch feed,
   non-finite checks, metrics every ``logging.every`` steps, no checkpoint until the end);
   its time per step is the mean ``step_time_s`` of metrics.jsonl after the first log row
   (which holds the compilation);
2. the step alone: the same jitted step (already compiled) on ``--steps`` batches of the same
   pipeline placed on the devices beforehand, dispatched back to back, one wait at the end.
Prints both and the ratio loop / step (goal: at most 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--config", default="tiny",
                   help="a config of configs/ by name, with its argument if it takes one: tiny, "
                   "demo, demo_toy_lm, ablation_captions:dense_toy_lm (default tiny)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set data.resample=bicubic (repeatable)")
    args = p.parse_args()

    from lens_jax.data.pipeline import make_pipeline
    from lens_jax.train import config_files, loop
    from lens_jax.train.trainer import Trainer

    name, colon, arg = args.config.partition(":")
    config_path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    try:  # lens-train's own --config.FIELD=VALUE parsing (types, a typo named with its nearest fields)
        config = config_files.load(str(config_path) + colon + arg, [f"--config.{item}" for item in args.set])
    except ValueError as e:
        p.error(str(e))
    config.data.path = args.data
    tmp = tempfile.mkdtemp()
    if config.data.tokenizer == "words":  # the demo's word tokenizer (lens_jax.demo writes it)
        from lens_jax.demo import write_word_tokenizer

        config.data.tokenizer = f"json:{write_word_tokenizer(Path(tmp) / 'word_tokenizer.json')}"
    config.num_steps = args.steps
    config.logging.progress = False
    config.logging.tensorboard = False
    config.checkpoint.every = 10 ** 9     # one save, at the end
    config.samples.every = 0
    with tempfile.TemporaryDirectory() as workdir:
        loop.train(config, workdir)
        rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows[1:]]
    loop_s = sum(times) / len(times)

    trainer = Trainer(config)
    state = trainer.init_state()
    it = make_pipeline(loop._data_config(config, trainer.mesh), mesh=None)
    batches = [trainer.put_batch(trainer.prepare_batch(next(it))) for _ in range(args.steps)]
    it.close()
    state, m = trainer.step(state, batches[0])  # compile
    jax.block_until_ready(m)
    start = time.perf_counter()
    for b in batches:
        state, m = trainer.step(state, b)
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - start) / len(batches)
    print(f"{args.config}{''.join(' ' + a for a in args.set)}: loop {loop_s * 1e3:.1f} ms/step, step alone {step_s * 1e3:.1f} ms/step, "
          f"loop / step {loop_s / step_s:.3f} ({jax.devices()[0].device_kind}, "
          f"{len(trainer.mesh.devices.flat)} device(s), logging.every={config.logging.every})")


if __name__ == "__main__":
    main()
