# Peak resident memory of lens-convert on the full-size (4,104,225,152-parameter) checkpoint:
#   python benchmarks/convert_memory.py --workdir /tmp/lens_convert_bench   # ~50 GB of disk at peak
"""Generates a full-size random fp32 diffusers checkpoint (not committed), converts it disk to disk
(diffusers -> orbax -> diffusers) with ``lens-convert`` in child processes, and reports each child's
peak RSS (``ru_maxrss``), wall time and a bitwise check of a sample of tensors. Deletes everything
at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lens_jax.checkpoints.safetensors_io import SafetensorsFolder, ShardedWriter, write_json  # noqa: E402
from lens_jax.checkpoints.transformer import WEIGHTS_PREFIX, transformer_mappings  # noqa: E402
from lens_jax.models import config as config_lib  # noqa: E402


def generate(out: Path, seed: int, max_shard_bytes: int) -> None:
    cfg = config_lib.transformer_config()
    out.mkdir(parents=True)
    write_json(out / "config.json", config_lib.to_diffusers_config(cfg))
    writer = ShardedWriter(out, WEIGHTS_PREFIX, max_shard_bytes)
    rng = np.random.default_rng(seed)
    for m in tqdm(transformer_mappings(cfg), desc="generating", unit="tensor"):
        writer.add(m.key, rng.standard_normal(m.torch_shape, dtype=np.float32))
    writer.finish()


def run_child(args: list[str]) -> tuple[float, float]:
    """Runs ``lens-convert args`` in a child; returns (that child's peak RSS in GiB, seconds)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "lens_jax.convert.cli", *args])
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (ru_maxrss in KiB)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"lens-convert {' '.join(args)} failed with exit code {child.returncode}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True, help="scratch folder (~50 GB free needed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = parser.parse_args()

    work = Path(args.workdir)
    src, orbax_dir, back = work / "diffusers", work / "orbax", work / "back"
    if work.exists():
        raise SystemExit(f"{work} exists; pass a fresh --workdir")
    results = {}
    try:
        start = time.perf_counter()
        generate(src, args.seed, 2 << 30)
        print(f"generated {src} in {time.perf_counter() - start:.0f} s")
        # Each conversion runs in its own child so that ru_maxrss is that conversion's peak.
        results["diffusers -> orbax"] = run_child(["to-orbax", "--src", str(src), "--out", str(orbax_dir)])
        sample = [m.key for m in transformer_mappings(config_lib.transformer_config())][::97]
        with SafetensorsFolder(src) as f:
            expected = {k: f.read(k) for k in sample}
        shutil.rmtree(src)
        results["orbax -> diffusers"] = run_child(["to-diffusers", "--src", str(orbax_dir), "--out", str(back)])
        with SafetensorsFolder(back) as f:
            identical = all(f.read(k).tobytes() == v.tobytes() for k, v in expected.items())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| conversion (full model, fp32, 16.4 GB) | peak RSS (GiB) | wall (s) |")
    print("|---|---|---|")
    for name, (rss, seconds) in results.items():
        print(f"| {name} | {rss:.2f} | {seconds:.0f} |")
    print(f"\nsampled tensors bit-identical after the round trip: {identical} ({len(expected)} tensors)")
    print(json.dumps({k: {"peak_rss_gib": v[0], "seconds": v[1]} for k, v in results.items()}))


if __name__ == "__main__":
    main()
