"""The runs behind docs/tpu.md: ``lens-train compile`` of each shipped config on each slice.

  python benchmarks/tpu_compile_table.py --out /tmp/tpu_table.jsonl [--only s1:v5p-128,...] [--remat-search]
  python benchmarks/tpu_compile_table.py --markdown /tmp/tpu_table.jsonl   # docs/tpu.md's tables

Each run is one subprocess (``python -m lens_jax.train.cli compile ... --report``); its command
and its figures are appended to ``--out`` as one JSON line as soon as it finishes, so a long
batch can be read while it runs. ``--remat-search`` tries the
remat policies from least to most recomputation around the config's own and keeps the first
that fits (none < save_dots < save_dots_no_batch < save_qkv_attn < full).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

CONFIGS = {  # short name -> config file, per-chip batch overrides (one packed row per chip)
    "s1": ("configs/lens_3p8b_stage1_512.py", {"grad_accum_steps": 1}),
    "s2": ("configs/lens_3p8b_stage2_mixed.py", {"grad_accum_steps": 1}),
    "ft": ("configs/lens_3p8b_finetune.py", {"grad_accum_steps": 1}),
}
from lens_jax.train.compile import REMAT_ORDER  # noqa: E402  (least to most recomputation)
CHIPS_PER_HOST = {"v5p": 4, "v4": 4, "v5e": 4, "v6e": 4}  # slices above 8 chips
# The mesh of each slice unless a row says otherwise: FSDP over 16 chips and data parallelism over
# the rest. GPT-OSS-20B's 32 experts shard over the FSDP axis only where its size divides 32 (fsdp
# >= 64 would replicate them), and a logical axis must be a product of whole physical axes
# (v5p/v4 4x4x4: 4 x 16; v5e/v6e 16x16: 16 x 16; v5p-64 2x4x4 with tensor 2: fsdp 16 x tensor 2).
MESH = {"v5p-128": {"mesh.data": 4}, "v4-128": {"mesh.data": 4},
        "v6e-256": {"mesh.data": 16}, "v5e-256": {"mesh.data": 16}}


def command(config: str, topology: str, slices: int, overrides: dict, report: str,
            step_only: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "lens_jax.train.cli", "compile", "--config", config,
           "--topology", topology, "--num-slices", str(slices), "--report", report]
    if step_only:
        cmd += ["--programs", "step"]
    return cmd + [f"--config.{k}={v}" for k, v in overrides.items()]


def run_one(name: str, topology: str, slices: int, extra: dict, remat: str | None, timeout: int,
            step_only: bool = False) -> dict:
    config, base = CONFIGS[name]
    overrides = dict(base)
    overrides["data.rows_per_host"] = CHIPS_PER_HOST[topology.split("-")[0]]  # 1 row per chip
    overrides["model.attention"] = "splash"
    overrides.update(MESH.get(topology, {}))
    if remat:
        overrides["model.remat"] = remat
    overrides.update(extra)
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = command(config, topology, slices, overrides, report, step_only)
        start = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            rc, err = None, f"timed out after {timeout} s"
        row = {"name": name, "topology": topology, "slices": slices, "remat": remat,
               "command": "lens-train compile " + shlex.join(cmd[4:]).replace(f" --report {report}", ""),
               "rc": rc, "wall_s": round(time.time() - start, 1),
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        if os.path.exists(report):
            row.update(json.load(open(report)))
        else:
            row["error"] = "\n".join(line for line in err.splitlines()
                                     if "lens-train compile" in line or "timed out" in line)[-2000:]
    return row


NAMES = {"s1": "stage 1", "s2": "stage 2 mixed", "ft": "fine-tune"}


def markdown(path: str) -> str:
    """docs/tpu.md's tables from the JSON lines: every compile, then per config and slice the
    remat policy with the least recomputation that fits (the last run of a row wins)."""
    last: dict[tuple, dict] = {}  # a row compiled twice (a restarted batch): its last run
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            last[(r["name"], r["topology"], r["slices"], r.get("remat"))] = r
    compiled = {k[:3] for k, r in last.items() if r.get("programs")}
    # A failed run (killed, a compiler error since fixed) of a row that compiled later is dropped.
    rows = [r for k, r in last.items() if r.get("programs") or k[:3] not in compiled]
    out = ["| config | slice | mesh | remat | args | out | temp | total / HBM | fits | XLA TFLOP "
           "| analytic TFLOP | GPT-OSS GiB | compile s | when |", "|" + "---|" * 14]
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["name"], r["topology"], r["slices"])
        remat = r.get("remat") or "?"
        step = next((p for p in r.get("programs", []) if p["program"] == "train_step"), None)
        slice_name = r["topology"] + (f" x {r['slices']}" if r["slices"] > 1 else "")
        if step is None:
            out.append(f"| {NAMES[r['name']]} | {slice_name} | | {remat} | | | | | failed: "
                       f"{(r.get('error') or '').splitlines()[-1][:160] if r.get('error') else r.get('rc')} "
                       f"| | | | | {r['when']} |")
            continue
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
        fits = step["fits"] == "yes"
        out.append(
            f"| {NAMES[r['name']]} | {slice_name} | {mesh} | {remat} | {step['args_GiB']:.2f} | "
            f"{step['out_GiB']:.2f} | {step['temp_GiB']:.2f} | {step['total_GiB']:.2f} / "
            f"{step['hbm_GiB']:.0f} | {'yes' if fits else '**no**'} | "
            f"{'-' if step['xla_TFLOP'] != step['xla_TFLOP'] else format(step['xla_TFLOP'], '.1f')} | "
            f"{step['analytic_TFLOP']:.1f} | {r.get('text_encoder_GiB_per_chip', 0):.2f} | "
            f"{step['compile_s']:.0f} | {r['when']} |")
        rank = lambda policy: REMAT_ORDER.index(policy) if policy in REMAT_ORDER else len(REMAT_ORDER)
        if fits and (key not in best or rank(remat) < rank(best[key]["remat"])):
            best[key] = dict(r, remat=remat)
        best.setdefault(key, dict(r, remat=None))
    out += ["", "| config | slice | least recomputation that fits | VAE program (one host) | command |",
            "|---|---|---|---|---|"]
    for (name, topology, slices), r in best.items():
        vae = [p for rr in rows if (rr["name"], rr["topology"], rr["slices"]) == (name, topology, slices)
               for p in rr.get("programs", []) if p["program"].startswith("vae_encode")]
        vae_text = (f"{vae[-1]['program']}: {vae[-1]['total_GiB']:.2f} GiB, fits {vae[-1]['fits']}"
                    if vae else "-")
        slice_name = topology + (f" x {slices}" if slices > 1 else "")
        out.append(f"| {NAMES[name]} | {slice_name} | {r['remat'] or '**none fits**'} | {vae_text} "
                   f"| `{r['command'].replace(' --programs step', '')}` |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--markdown", metavar="JSONL", help="print docs/tpu.md's tables from a finished run")
    p.add_argument("--only", default="s1:v5p-128,s1:v6e-256,s2:v5p-128,s1:v5e-256,s1:v4-128,"
                   "s2:v6e-256,ft:v5p-128,s2:v5e-256,s2:v4-128,ft:v6e-256,ft:v5e-256,ft:v4-128,"
                   "s1:v5p-64:1:mesh.tensor=2,s2:v5p-64:1:mesh.tensor=2,s1:v5e-256:2",
                   help="NAME:TOPOLOGY[:SLICES[:FIELD=VALUE;...]] comma-separated")
    p.add_argument("--remat-search", action="store_true")
    p.add_argument("--timeout", type=int, default=1800)
    args = p.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return
    if not args.out:
        p.error("--out is required (or --markdown JSONL)")
    for item in args.only.split(","):
        parts = item.split(":")
        name, topology = parts[0], parts[1]
        slices = int(parts[2]) if len(parts) > 2 and parts[2] else 1
        extra = dict(kv.split("=", 1) for kv in parts[3].split(";")) if len(parts) > 3 else {}
        remat, direction = None, 0
        while True:
            # The VAE program depends on neither remat nor the mesh: once per row is enough.
            row = run_one(name, topology, slices, extra, remat, args.timeout, step_only=remat is not None)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            fits = row.get("fits")
            print(row["command"], "->", "fits" if fits else "does not fit" if "programs" in row
                  else row.get("error", "failed"), flush=True)
            if not args.remat_search or "programs" not in row:
                break
            direction = direction or (-1 if fits else 1)
            if (direction == -1) != bool(fits):  # went one too far, or found the first that fits
                break
            i = REMAT_ORDER.index(row["remat"]) + direction
            if not 0 <= i < len(REMAT_ORDER):
                break
            remat = REMAT_ORDER[i]

if __name__ == "__main__":
    main()
