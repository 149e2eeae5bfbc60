"""The demo with each image token's input widened by its neighbours' inputs (docs/demo.md trial 15).

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 JAX_PLATFORMS=cpu .venv/bin/python \
        benchmarks/demo_neighbour_input.py [--radius 1 | --cross] [--mix-output] run --out DIR [demo flags ...]

A probe for issue 18, not a feature: it patches ``LensTransformer`` in this process so that
``img_in`` reads each image token's input concatenated with the inputs of the other tokens of its
``(2 radius + 1)^2`` square in the same image (found from the packed row's RoPE positions and segment
ids; zero outside the image), the new ``img_in`` rows zero at initialisation (step 0 is the plain
model). ``--mix-output`` also adds a zero-initialised projection of the neighbours' final hidden
states to ``proj_out``'s. Everything after these flags goes to ``python -m lens_jax.demo``
(``run --out DIR --config.FIELD=VALUE ...``); the export stage is skipped (diffusers' layout has
no such weights).
"""
import argparse
import inspect
import os
import sys
import textwrap

_p = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage=__doc__.splitlines()[2].strip())
_p.add_argument("--radius", type=int, default=1, help="neighbourhood half-width: 1 = the 3x3 square (default)")
_p.add_argument("--cross", action="store_true",
                help="only the 4 edge neighbours (left, right, up, down) instead of the square")
_p.add_argument("--mix-output", action="store_true",
                help="proj_out also reads the neighbours' final hidden states")
_ARGS, _DEMO_ARGV = _p.parse_known_args()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from lens_jax import demo  # noqa: E402
from lens_jax.models import transformer as T  # noqa: E402

RADIUS = _ARGS.radius
OFFSETS = [(dr, dc) for dr in range(-RADIUS, RADIUS + 1) for dc in range(-RADIUS, RADIUS + 1) if (dr, dc) != (0, 0)]
if _ARGS.cross:
    OFFSETS = [(0, -1), (0, 1), (-1, 0), (1, 0)]
NB = len(OFFSETS)
OUT = _ARGS.mix_output

def neighbours(x, pos, seg):
    r, c = pos[..., 1], pos[..., 2]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    outs = []
    for dr, dc in OFFSETS:
        m = same & (r[:, None, :] == r[:, :, None] + dr) & (c[:, None, :] == c[:, :, None] + dc)
        outs.append(jnp.einsum("bij,bjc->bic", m.astype(x.dtype), x))
    return jnp.concatenate(outs, -1)
T.neighbours = neighbours

orig_init = T.LensTransformer.__init__
def init(self, config, *, rngs):
    orig_init(self, config, rngs=rngs)
    k = self.img_in.kernel[...]
    self.img_in.kernel = nnx.Param(jnp.concatenate([k, jnp.zeros((NB * k.shape[0], k.shape[1]), k.dtype)], 0),
                                   out_sharding=("in_channels", "embed"), eager_sharding=False)
    if OUT:
        ko = self.proj_out.kernel[...]
        self.nbr_out = nnx.Param(jnp.zeros((NB * ko.shape[0], ko.shape[1]), ko.dtype),
                                 out_sharding=("embed", "out_channels"), eager_sharding=False)
T.LensTransformer.__init__ = init
T.LensTransformer._check_packed = lambda self, *a: None

core = T.LensTransformer.forward_packed
if OUT:  # forward_packed's source with one line added after the output projection
    target = "out = dense(x, _values(self.proj_out), dtype)"
    lines = textwrap.dedent(inspect.getsource(core)).splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if line.strip() == target]
    if len(at) != 1:
        sys.exit(f"--mix-output: lens_jax/models/transformer.py's forward_packed no longer has the line "
                 f"{target!r} once; update this probe")
    indent = lines[at[0]][:len(lines[at[0]]) - len(lines[at[0]].lstrip())]
    lines.insert(at[0] + 1, indent + "out = out + jnp.einsum('bnk,ko->bno', neighbours(x, img_positions, "
                 "img_segments).astype(dtype), self.nbr_out[...].astype(dtype))\n")
    ns = dict(vars(T))
    exec("".join(lines), ns)
    core = ns["forward_packed"]


def fp(self, img_tokens, img_positions, img_segment_ids, *a, **kw):
    aug = jnp.concatenate([img_tokens, neighbours(img_tokens, img_positions, img_segment_ids)], -1)
    return core(self, aug, img_positions, img_segment_ids, *a, **kw)
T.LensTransformer.forward_packed = fp
demo.export_and_check = lambda *a, **k: {"skipped": "probe"}
sys.exit(demo.main(_DEMO_ARGV))
