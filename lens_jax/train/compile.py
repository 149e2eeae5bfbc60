"""``lens-train compile --config CFG --topology NAME [--num-slices N] [--config.FIELD=VALUE ...]``.

Compiles the real training step for a TPU slice from this host, TPU or not (libtpu's compiler,
``jax.experimental.topologies``): the mesh of the config over the topology's devices, the state,
batch and frozen encoders as abstract arrays (``jax.ShapeDtypeStruct`` with ``NamedSharding``; no
checkpoint is read), GPT-OSS-20B inside the step when ``text_encoder.kind="gpt_oss"``, the FLUX.2
VAE encoder as its own program (one host's images of one bucket, on one chip). Prints per program
and chip the argument, output, temporary and total bytes, the chip's HBM and the headroom, XLA's
FLOPs (scan/while bodies multiplied by their trip counts) beside the analytic model FLOPs of
``lens_jax.train.metrics.StepFlops``, and the compile time.

Exit status: 0 when every program fits, ``EXIT_DOES_NOT_FIT`` (4) with what to try when one does
not, 2 for a bad topology/config. ``--save-executable PATH`` writes the compiled step
(``lens_jax.train.executable``); ``lens-train --config.compiled_step_path=PATH`` runs it on that
slice. ``--topology cpu`` compiles for this host's CPU devices (tests, and what a CPU run loads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lens_jax.sharding import use_rules
from lens_jax.train import mesh as mesh_lib
from lens_jax.train import topologies

GiB = float(1 << 30)
EXIT_DOES_NOT_FIT = 4
EXIT_BAD_INPUT = 2


# ----------------------------------------------------------------------------- XLA's figures

@dataclasses.dataclass
class ProgramReport:
    """Per-chip figures of one compiled program (bytes; FLOPs per chip and step)."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    xla_flops: float          # trip counts accounted (hlo_flops)
    xla_flops_raw: float      # cost_analysis() as XLA reports it (loop bodies once)
    analytic_flops: float     # model FLOPs per chip (0: none for this program)
    compile_s: float
    resident_bytes: int = 0   # bytes of another program live at the same time (state during VAE)
    mosaic_calls: int = 0     # Pallas TPU kernels (splash attention) in the compiled program

    @property
    def total_bytes(self) -> int:
        """Peak per chip: arguments + outputs not aliased to (donated) arguments + temporaries +
        code, plus what stays resident meanwhile."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes + self.resident_bytes)

    @property
    def headroom_bytes(self) -> int:
        return self.hbm_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0


_OUT_OF_HBM = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT])\).*available HBM \(([0-9.]+)([KMGT])\)")


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded ``ShapeDtypeStruct``s (the most loaded chip)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def compile_or_report(name: str, lowered, abstract_args, topo: topologies.Topology,
                      analytic_flops: float, start: float, resident_bytes: int = 0,
                      chips: int = 1):
    """``(compiled, report)``. ``compiled`` is None when the program cannot fit: its arguments
    (counted from their shardings) already exceed the chip's HBM (not compiled; temporaries 0), or
    XLA stops because the temporaries do (the report holds XLA's figure for them). No FLOPs then."""
    args = per_chip_bytes(abstract_args)
    if args + resident_bytes > topo.hbm_bytes:  # no need to compile: the inputs alone overflow
        return None, ProgramReport(name, args, 0, 0, 0, 0, topo.hbm_bytes, float("nan"),
                                   float("nan"), analytic_flops, time.perf_counter() - start,
                                   resident_bytes)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        m = _OUT_OF_HBM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not m:
            raise
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        temp = float(m.group(1)) * unit[m.group(2)]
        return None, ProgramReport(name, args, 0, 0, int(temp), 0, topo.hbm_bytes, float("nan"),
                                   float("nan"), analytic_flops, time.perf_counter() - start,
                                   resident_bytes)
    return compiled, program_report(name, compiled, topo.hbm_bytes, analytic_flops,
                                    time.perf_counter() - start, resident_bytes,
                                    lowered.compiler_ir("hlo").as_hlo_text(), chips)


def program_report(name: str, compiled, hbm_bytes: int, analytic_flops: float, compile_s: float,
                   resident_bytes: int = 0, hlo_before: str = "", chips: int = 1) -> ProgramReport:
    """Figures of a compiled program. XLA's FLOPs per chip are ``cost_analysis()`` plus the loop
    iterations it leaves out: ``hlo_dot_flops`` of the program before partitioning (``hlo_before``,
    where every loop bound is explicit), split evenly over its ``chips``."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    raw = float((cost or {}).get("flops", 0.0))
    text = compiled.as_text()
    once, scaled = hlo_dot_flops(hlo_before)
    return ProgramReport(
        name=name, argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), code_bytes=int(mem.generated_code_size_in_bytes),
        hbm_bytes=int(hbm_bytes), xla_flops=raw + (scaled - once) / chips, xla_flops_raw=raw,
        analytic_flops=float(analytic_flops), compile_s=float(compile_s),
        resident_bytes=int(resident_bytes), mosaic_calls=text.count('"tpu_custom_call"'))


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)(?:\s+\(.*\)\s+->\s+.*)?\s*\{\s*$")
_SHAPE = re.compile(r"[a-z][a-z0-9]*\[([0-9,]*)\]")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_INT_CONSTANT = re.compile(r"=\s*s32\[\]\S*\s+constant\((\d+)\)")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[a-z][a-z0-9]*\[([0-9,]*)\]")


def _instruction_flops(line: str, shapes: dict[str, list[int]]) -> float:
    """2 x multiply-adds of a ``dot`` or ``convolution`` HLO instruction (0 for anything else).
    Operand shapes come from the operand text when printed there, else from ``shapes`` (the
    computation's earlier definitions)."""
    m = re.search(r"=\s*\S+?\[([0-9,]*)\]\S*\s+(dot|convolution)\((.*?)\)", line)
    if not m:
        return 0.0
    out = math.prod(_dims(m.group(1)))
    if "[" in m.group(3):
        operands = [_dims(d) for d in _SHAPE.findall(m.group(3))]
    else:
        operands = [shapes.get(name) for name in re.findall(r"%?([\w.\-]+)", m.group(3))]
    if len(operands) < 2 or operands[0] is None or operands[1] is None:
        return 0.0
    lhs, rhs = operands[0], operands[1]
    if m.group(2) == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
        k = math.prod(lhs[i] for i in _dims(contracting.group(1))) if contracting else 1
        return 2.0 * out * k
    labels = re.search(r"dim_labels=\w+_(\w+)->", line)  # kernel labels, e.g. 01io
    if not labels or len(labels.group(1)) != len(rhs):
        return 0.0
    k = math.prod(d for d, c in zip(rhs, labels.group(1)) if c != "o")
    return 2.0 * out * k


def hlo_dot_flops(hlo_text: str) -> tuple[float, float]:
    """``(once, scaled)`` FLOPs of the dots and convolutions of an HLO module's text.

    ``once`` counts every computation once per call site, as ``cost_analysis()`` does; ``scaled``
    multiplies the body (and condition) of each ``while`` by its trip count: the
    ``known_trip_count`` XLA records, else the one integer constant of the loop's condition
    computation (``lax.scan``/``fori_loop`` count from 0 by 1 up to it; explicit in the HLO that
    JAX lowers, before XLA's passes move it). Use it on the HLO before partitioning
    (``lowered.compiler_ir("hlo")``): the dots of XLA's TPU output are convolutions in layouts
    this count does not follow. XLA's
    count with trip counts accounted is then ``cost_analysis()["flops"] + scaled - once``.
    """
    flops: dict[str, float] = {}
    calls: dict[str, list[tuple[str, int]]] = {}
    order: list[str] = []
    entry = None
    current = None
    shapes: dict[str, list[int]] = {}
    constants: dict[str, list[int]] = {}
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            order.append(current)
            flops[current], calls[current], constants[current], shapes = 0.0, [], [], {}
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None or line.strip() == "}":
            continue
        definition = _DEFINITION.match(line)
        if definition:
            shapes[definition.group(1)] = _dims(definition.group(2))
        flops[current] += _instruction_flops(line, shapes)
        constants[current] += [int(c) for c in _INT_CONSTANT.findall(line)]
        trip = _TRIP.search(line)
        for kind, callee in _CALLEE.findall(line):
            if kind in ("body", "condition"):
                condition = re.search(r"condition=%?([\w.\-]+)", line).group(1)
                calls[current].append((callee, int(trip.group(1)) if trip else condition))
            else:
                calls[current].append((callee, 1))
        branches = _BRANCHES.search(line)
        if branches:
            calls[current] += [(b.strip().lstrip("%"), 1) for b in branches.group(1).split(",")]
    if entry is None:
        return 0.0, 0.0

    def trip_count(n) -> int:  # a number, or the name of the loop's condition computation
        if isinstance(n, int):
            return n
        bound = constants.get(n, [])
        return bound[0] if len(bound) == 1 else 1
    once = dict.fromkeys(order, 0.0)
    scaled = dict.fromkeys(order, 0.0)
    once[entry] = scaled[entry] = 1.0
    for name in reversed(order):  # callees are printed before their callers
        for callee, n in calls[name]:
            if callee in once:
                once[callee] += once[name]
                scaled[callee] += scaled[name] * trip_count(n)
    return (sum(flops[c] * once[c] for c in order), sum(flops[c] * scaled[c] for c in order))


# ----------------------------------------------------------------------------- abstract inputs

def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype), sharding=sharding)


def abstract_batch(config: ml_collections.ConfigDict, rows: int, sharding) -> dict:
    """The step's batch (``rows`` packed rows, every host together) as abstract arrays: the keys
    of ``lens_jax.data.packing.build_batch`` (``latents`` instead of ``image_patches`` for ``image_encoder=vae``,
    ``text_features`` added for ``text_encoder.cache_features``)."""
    from lens_jax.data.packing import build_batch
    from lens_jax.data.pipeline import pixel_dtype

    d = config.data
    empty = build_batch([], image_tokens=int(d.image_tokens), text_tokens=int(d.text_tokens),
                        max_segments=int(d.max_segments), caption_length=int(d.caption_length),
                        pixel_dtype=pixel_dtype(d.pixel_dtype))
    batch = {k: _sds((rows,) + v.shape[1:], v.dtype, sharding) for k, v in empty.items()}
    if config.image_encoder.kind == "vae":
        del batch["image_patches"]
        batch["latents"] = _sds((rows, int(d.image_tokens), int(config.model.in_channels)),
                                jnp.float32, sharding)
    if config.text_encoder.get("cache_features", False):  # lens_jax.train.text_feature_cache
        m = config.model
        batch["text_features"] = _sds((rows, int(d.text_tokens), len(m.selected_layer_index),
                                       int(m.enc_hidden_dim)), jnp.float32, sharding)
    return batch


@dataclasses.dataclass(frozen=True)
class AbstractTextEncoder:
    """What the step reads of a loaded ``TextEncoder`` (config, selected layers, MoE kernel)."""

    config: Any
    selected: tuple[int, ...]
    moe_impl: str
    mxfp4: bool
    dtype: str


def text_encoder_spec(config: ml_collections.ConfigDict, backend: str) -> AbstractTextEncoder:
    """GPT-OSS-20B as the Lens checkpoint loads it (bf16, MXFP4 experts), the tiny random
    encoder of ``text_encoder.path="random"`` (the trainer's test encoder), or a toy GPT-OSS folder
    (``lens_jax.train.toy_text_encoder``: its own ``config.json``, dense experts, ``text_encoder.dtype``)."""
    from lens_jax.checkpoints.text_encoder import read_config
    from lens_jax.models.text_encoder import GptOssConfig, resolve_moe_impl
    from lens_jax.train import toy_text_encoder

    m = config.model
    selected = tuple(int(i) for i in m.selected_layer_index)
    moe = resolve_moe_impl("auto", backend)
    if config.text_encoder.path == "random":
        n = max(selected) + 1
        cfg = GptOssConfig(vocab_size=512, hidden_size=int(m.enc_hidden_dim), num_hidden_layers=n,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           intermediate_size=int(m.enc_hidden_dim), num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=8)
        return AbstractTextEncoder(cfg, selected, moe, False, "float32")
    path = str(config.text_encoder.path)
    if path and toy_text_encoder.read_summary(path) is not None:
        toy_text_encoder.check_matches(path, selected, int(m.enc_hidden_dim))
        return AbstractTextEncoder(read_config(Path(path)), selected, moe, False,
                                   str(getattr(config.text_encoder, "dtype", "bfloat16")))
    cfg = GptOssConfig()  # gpt-oss-20b (spec 4.1)
    if cfg.hidden_size != int(m.enc_hidden_dim):
        raise ValueError(f"config.model.enc_hidden_dim={m.enc_hidden_dim} but GPT-OSS-20B has "
                         f"hidden size {cfg.hidden_size}")
    return AbstractTextEncoder(cfg, selected, moe, True, "bfloat16")


def abstract_frozen(config: ml_collections.ConfigDict, mesh: Mesh, rules,
                    enc: AbstractTextEncoder | None) -> dict:
    """The ``frozen`` argument of ``Trainer.train_step`` (keys of ``encoders.build_frozen``),
    GPT-OSS's parameters sharded as the trainer places them (``encoders.frozen_shardings``)."""
    from lens_jax.models.text_encoder import abstract_params
    from lens_jax.train import stand_ins

    rep = NamedSharding(mesh, PartitionSpec())
    ie, te, m = config.image_encoder, config.text_encoder, config.model
    frozen = {}
    if ie.kind == "dct":
        frozen["dct"] = _sds(np.shape(stand_ins.dct_basis(int(m.in_channels))), jnp.float32, rep)
    if te.kind == "embedding":
        frozen["text_tables"] = _sds((len(m.selected_layer_index), int(te.vocab_size),
                                      int(m.enc_hidden_dim)), jnp.float32, rep)
    elif te.kind == "gpt_oss":
        frozen["text_params"] = abstract_params(enc.config, max(enc.selected) + 1, enc.mxfp4,
                                                jnp.dtype(enc.dtype), mesh, rules)
    return frozen


@contextlib.contextmanager
def _abstract_text_encoder(enc: AbstractTextEncoder | None):
    """The step looks its text encoder up by config (``encoders.text_encoder``), which would load
    a checkpoint; while compiling it gets the abstract description instead."""
    if enc is None:
        yield
        return
    from lens_jax.train import encoders

    with mock.patch.object(encoders, "text_encoder", lambda config: enc):
        yield


# ----------------------------------------------------------------------------- the programs

def analytic_step_flops(config: ml_collections.ConfigDict, rows: int) -> float:
    """``StepFlops.train_flops`` of a step whose rows are full: ``max_segments`` equal segments."""
    from lens_jax.train.metrics import StepFlops

    d = config.data
    k = int(d.max_segments)
    img, txt = rows * int(d.image_tokens), rows * int(d.text_tokens)
    pairs = rows * k * ((int(d.image_tokens) + int(d.text_tokens)) / k) ** 2
    return StepFlops(config.model).train_flops(img, txt, rows * k, pairs)


@dataclasses.dataclass
class CompileResult:
    topology: topologies.Topology
    num_slices: int
    mesh_shape: dict
    rows: int
    programs: list[ProgramReport]
    executable: Any = None
    text_encoder_bytes: int = 0  # GPT-OSS parameters per chip inside the step
    config: Any = None           # the config compiled (mesh.slice set to the slices)
    mesh: Any = None

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)


def compile_train(config: ml_collections.ConfigDict, topo: topologies.Topology,
                  num_slices: int = 1, log=print, vae_program: bool = True) -> CompileResult:
    """Compiles the training step (and, with ``vae_program``, the VAE encoder program) for
    ``num_slices`` x ``topo``."""
    from lens_jax.lora.trainer import make_trainer

    devices = topologies.topology_devices(topo, num_slices)
    config = ml_collections.ConfigDict(config.to_dict())
    if int(config.mesh.slice) == 1 and num_slices > 1:
        config.mesh.slice = num_slices
    compiled_config = ml_collections.ConfigDict(config.to_dict())
    if topo.generation == topologies.CPU and int(config.mesh.num_devices) > 0:
        devices = devices[:int(config.mesh.num_devices)]  # as a CPU run of this config takes them
    config.mesh.num_devices = 0
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    hosts = topo.hosts * num_slices
    rows = int(config.data.rows_per_host) * hosts
    chips = len(devices)
    log(f"topology {topo.name}: {topo.topology} x {num_slices} slice(s), {chips} chips, "
        f"{hosts} hosts, mesh {dict(mesh.shape)}, {rows} rows per step "
        f"({rows / chips:g} per chip), attention={config.model.attention}, "
        f"remat={config.model.remat}")
    enc = (text_encoder_spec(config, "tpu") if config.text_encoder.kind == "gpt_oss" else None)
    trainer = make_trainer(config, mesh, with_encoders=False)  # LoRA when config.lora.rank > 0
    state = trainer.abstract_state()
    batch = abstract_batch(config, rows, trainer.batch_sharding)
    frozen = abstract_frozen(config, mesh, trainer.rules, enc)
    text_bytes = per_chip_bytes(frozen.get("text_params", {}))
    if enc is not None:
        log(f"text encoder: GPT-OSS ({enc.config.num_hidden_layers} layers, MoE {enc.moe_impl}), "
            f"{text_bytes / GiB:.2f} GiB of parameters per chip")

    def step(state, batch, frozen):
        with use_rules(mesh, trainer.rules):
            return trainer.train_step(state, batch, frozen)

    jitted = jax.jit(step, out_shardings=(trainer.state_shardings, trainer.replicated),
                     donate_argnums=(0,))
    start = time.perf_counter()
    analytic = analytic_step_flops(config, rows) / chips
    with _abstract_text_encoder(enc):
        lowered = jitted.lower(state, batch, frozen)
    if os.environ.get("LENS_COMPILE_DUMP_HLO"):  # diagnosis: the HLO before and after XLA
        with open(os.environ["LENS_COMPILE_DUMP_HLO"] + ".before.txt", "w") as f:
            f.write(lowered.compiler_ir("hlo").as_hlo_text())
    compiled, report = compile_or_report("train_step", lowered, (state, batch, frozen), topo,
                                         analytic, start, chips=chips)
    programs = [report]
    if compiled is not None and os.environ.get("LENS_COMPILE_DUMP_HLO"):
        with open(os.environ["LENS_COMPILE_DUMP_HLO"] + ".after.txt", "w") as f:
            f.write(compiled.as_text())
    if config.image_encoder.kind == "vae" and vae_program:
        state_bytes = programs[0].argument_bytes
        programs.append(compile_vae_encode(config, host_devices(topo, devices), topo,
                                           resident_bytes=state_bytes))
    return CompileResult(topo, num_slices, dict(mesh.shape), rows, programs, compiled, text_bytes,
                         compiled_config, mesh)


def host_devices(topo: topologies.Topology, devices: Sequence) -> list:
    """The chips of one host, for a program each host runs on its own (the VAE encoder). On a
    multi-host slice: the devices of a one-host slice of the same generation, since v5e's compiler
    refuses a device assignment that is a part of a slice ("On platforms with limited ICI routing
    device assignment should include all slice devices"); per-chip memory is the same."""
    if topo.hosts == 1:
        return [d for d in devices if d.process_index == devices[0].process_index]
    dims = 3 if topo.topology.count("x") == 2 else 2
    one_host = topologies.topology(f"{topo.topology.split(':')[0]}:"
                                   + "x".join(str(b) for b in topo.host_bounds[:dims]))
    return topologies.topology_devices(one_host)


def vae_model(dtype: str = "bfloat16", random_small: bool = False):
    """Abstract FLUX.2 VAE (``nnx.eval_shape``; the tiny random one of ``path="random"``)."""
    from flax import nnx

    from lens_jax.models.vae import AutoencoderKLFlux2, VAEConfig

    cfg = (VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
           if random_small else VAEConfig())
    return nnx.eval_shape(lambda: AutoencoderKLFlux2(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                                     param_dtype=dtype))


def compile_vae_encode(config: ml_collections.ConfigDict, host_devices, topo: topologies.Topology,
                       resident_bytes: int = 0) -> ProgramReport:
    """The trainer's VAE encoder (``lens_jax.train.vae_encoding.VAEEncoder``): one host's images of
    the largest bucket of the config in one call, padded to its group size and sharded over the
    host's chips (the training state stays resident on each)."""
    from flax import nnx

    from lens_jax.data.buckets import make_buckets
    from lens_jax.train.vae_encoding import group_size

    d = config.data
    buckets = make_buckets(tuple(d.base_sizes), float(d.bucket_scale))
    if tuple(d.aspect_ratios):
        buckets = [b for b in buckets if b.ratio_index in {int(i) for i in d.aspect_ratios}]
    largest = max(buckets, key=lambda b: b.num_tokens)
    per_row = max(1, int(d.image_tokens) // largest.num_tokens)
    images = group_size(int(d.rows_per_host) * min(per_row, int(d.max_segments)), len(host_devices))
    model = vae_model(random_small=config.image_encoder.path == "random")
    graphdef, state = nnx.split(model)
    mesh = Mesh(np.asarray(host_devices), ("images",))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.tree.map(lambda x: _sds(x.shape, x.dtype, replicated), state)
    pixels = _sds((images, largest.height, largest.width, 3), jnp.float32,
                  NamedSharding(mesh, PartitionSpec("images")))
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_moments(x))
    start = time.perf_counter()
    return compile_or_report(f"vae_encode[{images}x{largest.height}x{largest.width}]",
                             fn.lower(state, pixels), (state, pixels), topo, 0.0, start,
                             resident_bytes)[1]


# ----------------------------------------------------------------------------- the report

# Remat policies of lens_jax.models.transformer, from least to most recomputation.
REMAT_ORDER = ("none", "save_dots", "save_dots_no_batch", "save_qkv_attn", "full")

COLUMNS = ("program", "args_GiB", "out_GiB", "temp_GiB", "total_GiB", "hbm_GiB", "headroom_GiB",
           "fits", "xla_TFLOP", "analytic_TFLOP", "compile_s")


def report_rows(programs: Sequence[ProgramReport]) -> list[dict]:
    return [{"program": p.name, "args_GiB": p.argument_bytes / GiB, "out_GiB": p.output_bytes / GiB,
             "temp_GiB": p.temp_bytes / GiB, "total_GiB": p.total_bytes / GiB,
             "hbm_GiB": p.hbm_bytes / GiB, "headroom_GiB": p.headroom_bytes / GiB,
             "fits": "yes" if p.fits else "NO", "xla_TFLOP": p.xla_flops / 1e12,
             "analytic_TFLOP": p.analytic_flops / 1e12, "compile_s": p.compile_s,
             "xla_TFLOP_loop_bodies_once": p.xla_flops_raw / 1e12, "mosaic_calls": p.mosaic_calls}
            for p in programs]


def format_table(programs: Sequence[ProgramReport]) -> str:
    """Per chip: one row per program (bytes in GiB; TFLOP per chip and step). ``parse_table``
    reads it back."""
    rows = report_rows(programs)
    cells = [list(COLUMNS)] + [[r[c] if isinstance(r[c], str) else f"{r[c]:.4g}" for c in COLUMNS]
                               for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def parse_table(text: str) -> list[dict]:
    """The rows of ``format_table`` found in ``text`` (numbers as floats)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["program"])
    header = lines[start].split()
    out = []
    for line in lines[start + 1:]:
        values = line.split()
        if len(values) != len(header):
            break
        out.append({h: v if h in ("program", "fits") else float(v) for h, v in zip(header, values)})
    return out


def advice(config: ml_collections.ConfigDict, result: CompileResult) -> str:
    """Why it does not fit, by how much, and what to try."""
    lines = []
    for p in result.programs:
        if not p.fits:
            lines.append(f"{p.name} needs {p.total_bytes / GiB:.2f} GiB per chip but a "
                         f"{result.topology.generation} chip has {p.hbm_bytes / GiB:.2f} GiB: "
                         f"{-p.headroom_bytes / GiB:.2f} GiB short")
    m, mesh = config.model, result.mesh_shape
    per_chip = result.rows / max(1, math.prod(mesh.values()))
    lines.append("try, from least to most recomputation / throughput lost:")
    if m.remat in REMAT_ORDER[:-1]:
        more = REMAT_ORDER[REMAT_ORDER.index(m.remat) + 1:]
        lines.append(f"  more rematerialisation: --config.model.remat={more[0]} (now {m.remat!r}; "
                     f"order {' < '.join(REMAT_ORDER)})")
    if mesh.get("data", 1) > 1 or mesh.get("tensor", 1) > 1:
        lines.append(f"  more FSDP: --config.mesh.data=1 --config.mesh.fsdp=-1 (now {mesh})")
    lines.append(f"  fewer rows per chip: --config.data.rows_per_host=N (now "
                 f"{config.data.rows_per_host} per host = {per_chip:g} per chip), or "
                 f"--config.grad_accum_steps=2 to keep the global batch")
    if config.text_encoder.kind == "gpt_oss":
        lines.append(f"  encode captions offline (GPT-OSS-20B inside the step: "
                     f"{result.text_encoder_bytes / GiB:.2f} GiB of parameters per chip, plus its "
                     f"activations)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command

def main(argv: list[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv[2:] if argv is None else argv)
    # absl spells multi-word flags with underscores; accept the documented dashes too.
    argv = [re.sub(r"^--(num|save)-", r"--\1_", a) for a in argv]
    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(  # overrides read from argv, not sys.argv
        "config", None, "Training config file; override fields with --config.FIELD=VALUE.",
        flag_values=fv, lock_config=True, sys_argv=["lens-train compile"] + argv)
    flags.DEFINE_string("topology", None, "v5p-N, v6e-N, v5e-N (= v5litepod-N), v4-N, a libtpu "
                        "string such as v5p:2x2x1, or cpu (this host's CPU devices)", flag_values=fv)
    flags.DEFINE_integer("num_slices", 1, "slices joined over the data-centre network", flag_values=fv)
    flags.DEFINE_string("save_executable", None, "write the compiled step here", flag_values=fv)
    flags.DEFINE_string("report", None, "also write the figures as JSON here", flag_values=fv)
    flags.DEFINE_enum("programs", "all", ["all", "step"], "all: the training step and, for "
                      "image_encoder.kind=vae, the VAE encoder program; step: the step alone (the "
                      "VAE program does not depend on remat or the mesh: a remat search needs it "
                      "once)", flag_values=fv)
    try:
        rest = fv(["lens-train compile"] + argv)
    except flags.Error as e:
        print(f"lens-train compile: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if len(rest) > 1 or fv.config is None or fv.topology is None:
        print("usage: lens-train compile --config CFG --topology NAME [--num-slices N] "
              "[--save-executable PATH] [--report JSON] [--programs all|step] [--config.FIELD=VALUE ...]"
              + (f"; unexpected {rest[1:]}" if len(rest) > 1 else ""), file=sys.stderr)
        return EXIT_BAD_INPUT
    config = config_flag.value
    topologies.compile_only_backend()
    try:
        topo = topologies.topology(fv.topology)
        result = compile_train(config, topo, int(fv.num_slices), vae_program=fv.programs == "all")
    except (ValueError, RuntimeError) as e:
        print(f"lens-train compile: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_table(result.programs), flush=True)
    if fv.report:
        tmp = f"{fv.report}.tmp"
        with open(tmp, "w") as f:
            json.dump({"topology": topo.name, "libtpu_topology": topo.topology,
                       "num_slices": result.num_slices, "mesh": result.mesh_shape,
                       "rows": result.rows, "fits": result.fits, "remat": config.model.remat,
                       "attention": config.model.attention,
                       "text_encoder": config.text_encoder.kind,
                       "text_encoder_GiB_per_chip": result.text_encoder_bytes / GiB,
                       "programs": report_rows(result.programs)}, f, indent=2)
        os.replace(tmp, fv.report)
    if fv.save_executable and result.executable is None:
        print("lens-train compile: nothing to save: the step did not compile", file=sys.stderr)
    elif fv.save_executable:
        from lens_jax.train import executable

        executable.save(result.executable, fv.save_executable,
                        executable.describe(result.config, result.mesh, topo.hosts * result.num_slices))
        print(f"saved the compiled step to {fv.save_executable} (run it with "
              f"--config.compiled_step_path={fv.save_executable})")
    if not result.fits:
        print(f"lens-train compile: does not fit on {topo.name}\n{advice(config, result)}",
              file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
