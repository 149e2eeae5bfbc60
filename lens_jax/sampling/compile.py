"""``lens-sample compile --topology NAME [--batch 8] [--size 1024x1024] [--steps 20] [--guidance 5]``.

Compiles the sampler's programs for a TPU host from any host (libtpu's compiler, abstract weights,
no checkpoint), with the weights placed as ``LensPipeline(placement=...)`` places them on that
host (``lens_jax.sampling.placement``: ``first_chip`` or ``sharded``; ``auto`` chooses from the
chip's HBM): prompt encoding (GPT-OSS-20B, MXFP4 experts), the whole CFG denoising loop
(``denoise.denoise_jit``: batch over every chip of the host) and the VAE decode of one image
(``LensPipeline.decode`` decodes one at a time, on the first chip). Each program's total on the
first (most loaded) chip includes what it holds of the other two networks' weights. Prints the
table of ``lens-train compile``; exit status 0 when everything fits, 4 (with the reason) when not.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from lens_jax.train import compile as train_compile
from lens_jax.train import topologies


def _abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


@dataclasses.dataclass
class SamplerCompile:
    placement: str                              # first_chip | sharded (lens_jax.sampling.placement)
    weight_bytes: int                           # the three networks' weights, unsharded
    programs: list[train_compile.ProgramReport]


def compile_sampler(topo: topologies.Topology, *, batch: int = 8, height: int = 1024,
                    width: int = 1024, steps: int = 20, guidance: float = 5.0,
                    model_config=None, text_length: int = 512, dtype: str = "bfloat16",
                    tiny: bool = False, placement: str = "auto", log=print) -> SamplerCompile:
    """Per-chip reports of the encode, denoise and decode programs on one host of ``topo``, with
    the weights placed as ``LensPipeline(placement=...)`` places them on that host.

    ``model_config``: the denoiser (default: the released Lens); ``tiny=True`` pairs it with the
    tiny random text encoder and VAE of the tests.
    """
    from lens_jax.models.config import transformer_config
    from lens_jax.models.text_encoder import abstract_params, encode
    from lens_jax.models.transformer import abstract_model
    from lens_jax.sampling import denoise as denoise_lib
    from lens_jax.sampling import guidance as guidance_lib
    from lens_jax.sampling import placement as placement_lib
    from lens_jax.text import drop_preamble

    devices = topologies.topology_devices(topo)[:topo.chips_per_host]  # one host's chips
    if batch % len(devices):
        raise ValueError(f"--batch {batch} is not a multiple of the {len(devices)} chips of a "
                         f"{topo.name} host")
    if height % 16 or width % 16:
        raise ValueError(f"--size {width}x{height}: sides must be multiples of 16")
    cfg = model_config or transformer_config(param_dtype=dtype, dtype=dtype)

    # The three networks, unplaced: GPT-OSS-20B as the trainer describes it (or the tiny one), the
    # denoiser, the VAE.
    fake = type("C", (), {})()
    fake.model, fake.text_encoder = cfg, type("T", (), {"path": "random" if tiny else ""})()
    enc = train_compile.text_encoder_spec(fake, "tpu")
    text_layers = max(enc.selected) + 1
    text_params = abstract_params(enc.config, text_layers, enc.mxfp4, jnp.dtype(enc.dtype))
    graphdef, state = nnx.split(abstract_model(cfg))
    vae = train_compile.vae_model(dtype, random_small=tiny)
    vae_graphdef, vae_state = nnx.split(vae)
    weight_bytes = sum(placement_lib.tree_bytes(t) for t in (text_params, state, vae_state))
    place = placement_lib.host_placement(placement, devices, weight_bytes, topo.hbm_bytes)
    mesh = place.mesh  # None on a one-chip host: the pipeline then runs without one
    first = NamedSharding(Mesh(np.asarray(devices[:1]), ("chip",)), PartitionSpec())
    host = mesh or Mesh(np.asarray(devices[:1]), (denoise_lib.BATCH_AXIS,))
    rows = NamedSharding(host, PartitionSpec(denoise_lib.BATCH_AXIS))
    replicated = NamedSharding(host, PartitionSpec())
    log(f"topology {topo.name}: one host, {len(devices)} chips; batch {batch}, {width}x{height}, "
        f"{steps} steps, guidance {guidance}, attention={cfg.attention}; weights "
        f"{weight_bytes / train_compile.GiB:.2f} GiB, placement {place.kind} (--placement {placement})")

    # Placed as the pipeline places them: GPT-OSS on the first chip, or its experts and embed dims
    # over the chips; the denoiser replicated, or FSDP over the chips; the VAE on the first chip.
    text_params = _placed(text_params, place.text_encoder_shardings(enc.config, text_layers,
                                                                    enc.mxfp4), first)
    state = _placed(state, place.denoiser_shardings(state), first)
    vae_state = _abstract(vae_state, first)
    prompt = replicated if place.sharded else first  # host ids go where the encoder's weights are
    ids = jax.ShapeDtypeStruct((batch, text_length), jnp.int32, sharding=prompt)
    mask = jax.ShapeDtypeStruct((batch, text_length), jnp.bool_, sharding=prompt)

    # Features after dropping the preamble (97 ids of the harmony template) and interleaving with
    # the empty negative prompt: [2B, L, D], rows over the host's chips.
    length = text_length - 97
    feats = [jax.ShapeDtypeStruct((batch, length, int(cfg.enc_hidden_dim)), jnp.dtype(dtype))
             for _ in cfg.selected_layer_index]
    cond = jax.eval_shape(lambda f, m: guidance_lib.cfg_conditioning(
        f, m, *guidance_lib.empty_negative(f, m)), feats, jax.ShapeDtypeStruct((batch, length), bool))
    cond_feats = [jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=rows) for f in cond[0]]
    cond_mask = jax.ShapeDtypeStruct(cond[1].shape, cond[1].dtype, sharding=rows)
    h, w = height // 16, width // 16
    noise = jax.ShapeDtypeStruct((batch, h * w, int(cfg.in_channels)), jnp.float32, sharding=rows)
    sigmas = jax.ShapeDtypeStruct((steps + 1,), jnp.float32, sharding=replicated)
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    latents = jax.ShapeDtypeStruct((1, 2 * h, 2 * w, vae.config.latent_channels), jnp.dtype(dtype),
                                   sharding=first)

    # What the first (most loaded) chip holds of each network.
    weights = {"encode": train_compile.per_chip_bytes(text_params),
               "denoise": train_compile.per_chip_bytes(state),
               "decode": train_compile.per_chip_bytes(vae_state)}

    def resident(name):  # the other networks' weights, also on the first chip
        return sum(v for k, v in weights.items() if k != name)

    def run(name, lowered, args, analytic, chips=1):
        start = time.perf_counter()
        return train_compile.compile_or_report(name, lowered, args, topo, analytic, start,
                                               resident(name.split("[")[0]), chips)[1]

    def encode_fn(p, i, m):
        out = encode(p, i, m, config=enc.config, selected=enc.selected, moe_impl=enc.moe_impl,
                     mesh=place.encoder_mesh, rules=place.rules)
        return drop_preamble(list(out), m, 97)

    reports = [run(f"encode[{batch}x{text_length}]", jax.jit(encode_fn).lower(text_params, ids, mask),
                   (text_params, ids, mask), 0.0, len(devices) if place.sharded else 1)]
    lowered = denoise_lib.denoise_jit.lower(
        graphdef, state, noise, cond_feats, cond_mask, sigmas, scale, latent_hw=(h, w),
        use_cfg=guidance != 1.0, bf16_timesteps=False, num_train_timesteps=1000, mesh=mesh,
        rules=place.rules)
    reports.append(run(f"denoise[{batch}x{h * w}tok,{steps}steps]", lowered,
                       (state, noise, cond_feats, cond_mask), _denoise_flops(cfg, batch, h * w, length,
                                                                            steps, guidance) / len(devices),
                       len(devices)))
    decode = jax.jit(lambda s, z: nnx.merge(vae_graphdef, s).decode(z))
    reports.append(run(f"decode[1x{height}x{width}]", decode.lower(vae_state, latents),
                       (vae_state, latents), 0.0))
    return SamplerCompile(place.kind, weight_bytes, reports)


def _placed(tree, shardings, first):
    """``tree``'s leaves as ``ShapeDtypeStruct``s with ``shardings`` (a chip's ``SingleDeviceSharding``
    becomes ``first``, the same chip as a one-device mesh)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                          sharding=first if isinstance(s, SingleDeviceSharding) else s),
        tree, shardings)


def _denoise_flops(cfg, batch: int, image_tokens: int, text_tokens: int, steps: int,
                   guidance: float) -> float:
    """Analytic model FLOPs of the loop: ``StepFlops.forward_flops`` per image, rows doubled by CFG."""
    from lens_jax.train.metrics import StepFlops

    rows = batch * (2 if guidance != 1.0 else 1)
    pairs = rows * (image_tokens + text_tokens) ** 2
    return steps * StepFlops(cfg).forward_flops(rows * image_tokens, rows * text_tokens, rows, pairs)


def load_model_config(path: str | None):
    """The denoiser config of a configs/*.py file, or the released Lens in bfloat16."""
    from lens_jax.models.config import transformer_config

    if not path:
        return transformer_config(param_dtype="bfloat16", dtype="bfloat16")
    import importlib.util

    spec = importlib.util.spec_from_file_location("_model_config", path)
    if spec is None:
        raise ValueError(f"--model-config {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "get_model_config"):
        return module.get_model_config()
    return module.get_config().model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lens-sample compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", required=True, help="v5e-8, v6e-8, v5p-8, ... (lens_jax.train.topologies)")
    p.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    p.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT (default 1024x1024)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale; 1 = no CFG (default 5)")
    p.add_argument("--model-config", default=None,
                   help="a configs/*.py file whose denoiser to compile (its get_model_config(), else "
                        "get_config().model; default: the released Lens in bfloat16)")
    p.add_argument("--tiny-encoders", action="store_true",
                   help="the tiny random GPT-OSS and VAE of the tests instead of the real ones")
    p.add_argument("--attention", default=None, choices=("auto", "xla", "splash"),
                   help="override the denoiser's attention implementation")
    p.add_argument("--placement", default="auto", choices=("auto", "first_chip", "sharded"),
                   help="where the weights live, as LensPipeline(placement=...): first_chip (GPT-OSS "
                        "and the VAE on the first chip, the denoiser replicated), sharded (GPT-OSS's "
                        "experts and both networks' weights split over the host's chips), auto "
                        "(sharded when the weights take more than 3/4 of a chip's HBM; default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    topologies.compile_only_backend()
    try:
        from lens_jax.sampling.resolution import parse_size

        height, width = parse_size(args.size)
        topo = topologies.topology(args.topology)
        model = load_model_config(args.model_config)
        if args.attention:
            model.attention = args.attention
        result = compile_sampler(topo, batch=args.batch, height=height, width=width,
                                 steps=args.steps, guidance=args.guidance, model_config=model,
                                 tiny=args.tiny_encoders, placement=args.placement,
                                 text_length=64 + 97 if args.tiny_encoders else 512)
    except (ValueError, RuntimeError) as e:
        print(f"lens-sample compile: {e}", file=sys.stderr)
        return train_compile.EXIT_BAD_INPUT
    print(train_compile.format_table(result.programs), flush=True)
    short = [r for r in result.programs if not r.fits]
    if short:
        gib = train_compile.GiB
        for r in short:
            print(f"lens-sample compile: {r.name} needs {r.total_bytes / gib:.2f} GiB on the first "
                  f"chip, a {topo.generation} chip has {r.hbm_bytes / gib:.2f} GiB "
                  f"({-r.headroom_bytes / gib:.2f} GiB short): {_why(r, result.placement)}",
                  file=sys.stderr)
        return train_compile.EXIT_DOES_NOT_FIT
    return 0


def _why(report: train_compile.ProgramReport, placement: str) -> str:
    if report.temp_bytes == 0 and placement == "first_chip":
        return ("its inputs and the other networks' weights alone overflow (not compiled): "
                "first_chip keeps GPT-OSS-20B and the VAE on the first chip beside the denoiser; "
                "--placement sharded splits them over the host's chips")
    if report.temp_bytes == 0:
        return ("its inputs and the weights' shards alone overflow (not compiled): this host "
                "needs more chips or chips with more HBM")
    return "try a smaller --batch, or (decode) tiled VAE decoding"


if __name__ == "__main__":
    sys.exit(main())
