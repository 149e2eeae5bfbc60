"""The loop's cost over the step: ``lens-train``'s loop against the compiled step alone, same shapes.

    .venv/bin/python benchmarks/train_loop.py --data DIR [--config tiny|demo|...] [--steps 60] [--set data.resample=bicubic] [--device-cpus 1]

``DIR``: synthetic-shapes records (``lens-data synth-shapes --base-size 64`` for tiny; ``--base-size
128 --groups 512 --aspect square --placement grid --short-style scene`` for demo and demo_toy_lm,
e.g. ``make demo``'s ``demo_out/data/train``; ``--base-size 96 --groups 512`` for the ablation
configs). The toy-LM configs also need ``--set text_encoder.path=FOLDER``: a toy LM trained with
the same word tokenizer, e.g. ``OUT/text_encoder`` of ``python -m lens_jax.demo --config
configs/demo_toy_lm.py --out OUT``. In one process:
1. the loop: ``lens_jax.train.loop.train`` for ``--steps`` steps (data pipeline, batch feed,
   non-finite checks, metrics every ``logging.every`` steps, no checkpoint until the end);
   its time per step is the mean ``step_time_s`` of metrics.jsonl after the first log row
   (which holds the compilation), and ``data/device_waited_steps`` over those rows says how many
   of its steps were dispatched after the previous one had finished (the devices waited);
2. the step alone: the same jitted step (already compiled) on ``--steps`` batches of the same
   pipeline placed on the devices beforehand, dispatched back to back, one wait at the end.
Prints both and the ratio loop / step (goal: at most 1.05).

On XLA:CPU the "device" is the host's own cores, so the input pipeline (decoding, resizing,
packing: ~15-30 ms of CPU a tiny batch) slows the step it feeds, which an accelerator's step does
not feel. ``--device-cpus N`` (Linux, a machine with more than N cores) separates them as on an
accelerator host: XLA's threads (created at backend start-up) run on the first N cores, this
process's Python threads (the main thread, the batch feed, grain's read threads) and XLA's compiler
threads on the others; both phases run so.
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
    p.add_argument("--device-cpus", type=int, default=0, metavar="N",
                   help="run XLA's threads on the first N cores of this process's CPU set and the "
                   "Python threads on the rest, as a device with its own cores (Linux; default 0: "
                   "all threads share every core)")
    args = p.parse_args()
    if args.device_cpus:
        _split_cores(p, args.device_cpus)

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
    waited = rows[-1]["data/device_waited_steps"] - rows[0]["data/device_waited_steps"]
    timed_steps = rows[-1]["step"] - rows[0]["step"]

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
    split = f" --device-cpus {args.device_cpus}" if args.device_cpus else ""
    print(f"{args.config}{''.join(' ' + a for a in args.set)}{split}: loop {loop_s * 1e3:.1f} ms/step, step alone {step_s * 1e3:.1f} ms/step, "
          f"loop / step {loop_s / step_s:.3f} ({jax.devices()[0].device_kind}, "
          f"{len(trainer.mesh.devices.flat)} device(s), logging.every={config.logging.every}); "
          f"in the loop the devices waited for the host before {int(waited)} of {int(timed_steps)} steps")


def _split_cores(p: argparse.ArgumentParser, n: int) -> None:
    """XLA's runtime threads on the first ``n`` cores, the Python threads on the others.

    Linux's affinity is per thread and inherited by the threads a thread starts: this thread takes
    the device cores while JAX starts its CPU client and runs a first program (which starts XLA's
    thread pools), then moves to the host cores, where every thread it starts later follows."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not 0 < n < len(cpus):
        p.error(f"--device-cpus {n}: needs Linux and more than {n} cores (this process may use "
                f"{len(cpus) or 'an unknown number of'})")
    device, host = set(cpus[:n]), set(cpus[n:])
    os.sched_setaffinity(0, device)
    x = jax.numpy.ones((256, 256))
    jax.jit(lambda a: (a @ a).sum())(x).block_until_ready()
    os.sched_setaffinity(0, host)
    print(f"XLA's threads on cores {sorted(device)}, Python's on {sorted(host)}", flush=True)


if __name__ == "__main__":
    main()
