"""Attention with segment ids, dispatched by config: XLA (any backend; in query blocks on the CPU),
cuDNN flash (GPU), splash (TPU).

Queries attend to keys of their own segment only; segment 0 is padding, which no query attends to
(padding queries get finite garbage that callers mask). All paths take ``q, k, v [B, N, H, D]`` and
``segment_ids [B, N]`` and return ``[B, N, H, D]``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lens_jax import sharding

log = logging.getLogger(__name__)

_MASKED = -1e30  # finite, so a fully masked (padding) row gives a uniform softmax instead of NaN


def segment_mask(segment_ids: jax.Array, key_segment_ids: jax.Array | None = None) -> jax.Array:
    """Query ids ``[B, Nq]`` and key ids ``[B, Nk]`` (default: the same) -> ``[B, 1, Nq, Nk]`` bool:
    same segment and a non-padding key."""
    keys = segment_ids if key_segment_ids is None else key_segment_ids
    same = segment_ids[:, :, None] == keys[:, None, :]
    return (same & (keys[:, None, :] != 0))[:, None]


@jax.custom_vjp
def xla_attention(q, k, v, segment_ids):
    """Plain einsum attention; logits and softmax in float32.

    The backward pass is written out (``_xla_attention_bwd``) instead of differentiated: autodiff
    of the softmax keeps several float32 ``[B, H, N, N]`` intermediates per layer alive until the
    backward pass (stacked over the layer scan, ~70% of a CPU training step at 1152 tokens);
    here only ``q, k, v``, the output and the per-row max and sum ``[B, H, N]`` are kept, and the
    probabilities are recomputed from them (one extra ``q k^T``), as flash attention does.
    """
    return _xla_attention_fwd(q, k, v, segment_ids)[0]


def _dot(a, b, spec):
    """``einsum(spec, a, b)`` accumulated in float32 and rounded once to ``b``'s dtype: what a
    bf16 einsum computes, in the form XLA:CPU runs on bf16 operands (``models/cpu_matmul.py``)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(b.dtype)


def _logits(q, k, segment_ids):
    """Scaled, segment-masked logits ``[B, H, Nq, Nk]`` in float32."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    # An additive [B, 1, N, N] bias rather than a select against a [B, H, N, N] constant: XLA hoists
    # loop-invariant broadcasts out of the layer scan and would materialise the latter (H x larger).
    return logits + jnp.where(segment_mask(segment_ids), 0.0, _MASKED)  # masked: exactly _MASKED


def _xla_attention_fwd(q, k, v, segment_ids):
    logits = _logits(q, k, segment_ids)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - row_max)
    row_sum = jnp.sum(unnormalized, axis=-1, keepdims=True)
    weights = (unnormalized / row_sum).astype(v.dtype)  # = jax.nn.softmax(logits)
    out = _dot(weights, v, "bhqk,bkhd->bqhd")
    return out, (q, k, v, segment_ids, out, row_max, row_sum)  # row_*: [B, H, N, 1]


def _xla_attention_bwd(residuals, d_out):
    """Softmax backward ``dS = P * (dP - rowsum(dO * O))`` with ``P`` recomputed, in float32."""
    q, k, v, segment_ids, out, row_max, row_sum = residuals
    probs = jnp.exp(_logits(q, k, segment_ids) - row_max) / row_sum  # [B, H, Nq, Nk] float32
    d_v = _dot(probs.astype(v.dtype), d_out, "bhqk,bqhd->bkhd")
    d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out, out, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - delta[..., None]) * (q.shape[-1] ** -0.5)
    d_logits = d_logits * segment_mask(segment_ids)  # masked logits are constants
    d_q = _dot(d_logits.astype(q.dtype), k, "bhqk,bkhd->bqhd")
    d_k = _dot(d_logits.astype(k.dtype), q, "bhqk,bqhd->bkhd")
    return d_q, d_k, d_v, None


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


_F32 = dict(preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_attention(q, k, v, segment_ids, query_chunk: int = 128):
    """``xla_attention``'s arithmetic, ``query_chunk`` queries at a time (a ``lax.scan``); the CPU's
    default (``attention="auto"``).

    ``xla_attention`` streams float32 ``[B, H, N, N]`` logits through memory some ten times per
    layer (mask, max, exp, sum, divide; in the backward pass recompute, dP, dS); here a block's
    ``[B, H, chunk, N]`` stays in cache. Each block sees every key, so its softmax is exact (no
    online rescaling). Heads come first (``[B, H, N, D]``) so that every dot is a plain batched
    matmul, and the key and value gradients accumulate transposed (``dk^T = q^T dS``,
    ``dv^T = dO^T P``, ``[B, H, D, N]``, from ``q^T`` and ``dO^T`` transposed once): XLA:CPU's fast
    dots contract over the left operand's minor axis (``models/cpu_matmul.py``). Results equal
    ``xla_attention``'s up to float32 summation order (tests/models/test_attention.py); speed on
    CPU: docs/benchmarks.md, issue 14.
    """
    return _chunked_fwd(q, k, v, segment_ids, query_chunk)[0]


def _blocks(x: jax.Array, chunk: int, axis: int) -> jax.Array:
    """``axis`` padded with zeros to a multiple of ``chunk`` and split: ``[..., N, ...] ->
    [N / chunk, ..., chunk, ...]`` (the scan's leading axis). Zero segment ids are padding."""
    n = x.shape[axis]
    x = jnp.pad(x, [(0, -(-n // chunk) * chunk - n if a == axis else 0) for a in range(x.ndim)])
    x = x.reshape(x.shape[:axis] + (x.shape[axis] // chunk, chunk) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unblock(x: jax.Array, axis: int, n: int) -> jax.Array:
    """Inverse of ``_blocks``: the first ``n`` rows."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, n, axis=axis)


def _block_logits(q_block, k_heads, q_segments, segment_ids):
    """``[B, H, c, D]`` queries against all ``[B, H, N, D]`` keys: scaled, masked float32 logits
    ``[B, H, c, N]`` and the mask ``[B, 1, c, N]`` (same segment, key not padding)."""
    valid = segment_mask(q_segments, segment_ids)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q_block, k_heads, **_F32) * (q_block.shape[-1] ** -0.5)
    return logits + jnp.where(valid, 0.0, _MASKED), valid


def _heads_first(x):
    return x.transpose(0, 2, 1, 3)  # [B, N, H, D] <-> [B, H, N, D]


def _chunk(n: int, query_chunk: int) -> int:
    return max(1, min(int(query_chunk), n))


def _chunked_fwd(q, k, v, segment_ids, query_chunk):
    n, chunk = q.shape[1], _chunk(q.shape[1], query_chunk)
    k_heads, v_heads = _heads_first(k), _heads_first(v)

    def block(_, xs):
        q_block, q_segments = xs
        logits, _ = _block_logits(q_block, k_heads, q_segments, segment_ids)
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        unnormalized = jnp.exp(logits - row_max)
        row_sum = jnp.sum(unnormalized, axis=-1, keepdims=True)
        weights = (unnormalized / row_sum).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v_heads, **_F32).astype(v.dtype)
        return None, (out, row_max, row_sum)

    xs = (_blocks(_heads_first(q), chunk, 2), _blocks(segment_ids, chunk, 1))
    _, (out, row_max, row_sum) = jax.lax.scan(block, None, xs)  # row_*: [blocks, B, H, c, 1]
    out_heads = _unblock(out, 2, n)  # [B, H, N, D]
    # q, k, v are kept as given, not heads first: keeping the transposed ones let XLA:CPU (jaxlib
    # 0.10.2) lay out a one-block backward's bf16 dot for its generic DotThunk, which has no
    # bf16 x bf16 -> f32 ("Unsupported element type"); the transposes are redone in the backward
    return _heads_first(out_heads), (q, k, v, segment_ids, out_heads, row_max, row_sum)


def _chunked_bwd(query_chunk, residuals, d_out):
    """Per query block: P recomputed, ``dS = P * (dP - rowsum(dO * O))``; dq per block, dk and dv
    summed over blocks in float32 (rounded once at the end, as ``xla_attention`` rounds them)."""
    q, k, v, segment_ids, out_heads, row_max, row_sum = residuals
    n, chunk = q.shape[1], _chunk(q.shape[1], query_chunk)
    scale = q.shape[-1] ** -0.5
    q_heads, k_heads, v_heads, d_out_heads = (_heads_first(t) for t in (q, k, v, d_out))
    delta = jnp.sum(d_out_heads.astype(jnp.float32) * out_heads.astype(jnp.float32), axis=-1,
                    keepdims=True)  # [B, H, N, 1]

    def block(carry, xs):
        d_k_t, d_v_t = carry  # [B, H, D, N] float32
        q_block, q_block_t, q_segments, d_out_block, d_out_block_t, m, l, delta_block = xs
        logits, valid = _block_logits(q_block, k_heads, q_segments, segment_ids)
        probs = jnp.exp(logits - m) / l  # [B, H, c, N] float32
        d_v_t = d_v_t + jnp.einsum("bhdq,bhqk->bhdk", d_out_block_t, probs.astype(v.dtype), **_F32)
        d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out_block, v_heads, **_F32)
        # masked logits are constants: no gradient (padding query rows are fully masked)
        d_logits = (jnp.where(valid, probs * (d_probs - delta_block), 0.0) * scale).astype(q.dtype)
        d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k_heads, **_F32).astype(q.dtype)
        d_k_t = d_k_t + jnp.einsum("bhdq,bhqk->bhdk", q_block_t, d_logits, **_F32)
        return (d_k_t, d_v_t), d_q

    transposed = lambda t: t.transpose(0, 1, 3, 2)  # [B, H, N, D] -> [B, H, D, N]
    xs = (_blocks(q_heads, chunk, 2), _blocks(transposed(q_heads), chunk, 3),
          _blocks(segment_ids, chunk, 1), _blocks(d_out_heads, chunk, 2),
          _blocks(transposed(d_out_heads), chunk, 3), row_max, row_sum, _blocks(delta, chunk, 2))
    b, h, _, d = k_heads.shape
    zeros = jnp.zeros((b, h, d, n), jnp.float32)
    (d_k_t, d_v_t), d_q = jax.lax.scan(block, (zeros, zeros), xs)
    keys_first = lambda t, dtype: t.transpose(0, 3, 1, 2).astype(dtype)  # [B, H, D, N] -> [B, N, H, D]
    return (_heads_first(_unblock(d_q, 2, n)), keys_first(d_k_t, k.dtype), keys_first(d_v_t, v.dtype),
            None)


chunked_attention.defvjp(_chunked_fwd, _chunked_bwd)


def pad_tokens(multiple: int, q, k, v, segment_ids):
    """q, k, v ``[B, N, H, D]`` and segment ids ``[B, N]`` padded along N to a multiple of
    ``multiple``; padding tokens are segment 0 (padding). The kernels' shared preamble."""
    n = q.shape[1]
    extra = -(-n // multiple) * multiple - n
    q, k, v = (jnp.pad(t, [(0, 0), (0, extra), (0, 0), (0, 0)]) for t in (q, k, v))
    return q, k, v, jnp.pad(segment_ids, [(0, 0), (0, extra)])


CUDNN_SEQ_MULTIPLE = 128  # cuDNN's flash backward rejected 4511 tokens (H200, jax 0.11.2); 4608 ran


def cudnn_attention(q, k, v, segment_ids, implementation: str = "cudnn"):
    """cuDNN flash attention (``jax.nn.dot_product_attention``, GPU, bf16/fp16) for rows holding
    ONE segment plus padding anywhere (``packed=False``), without a mask array.

    Valid tokens are moved to the front (stable order; attention does not depend on token order),
    attended with ``query/key_value_seq_lengths`` = their count, and moved back; padding queries
    get finite values (zeros). The sequence is padded (segment 0) to a multiple of
    ``CUDNN_SEQ_MULTIPLE``. Wrong for packed rows (several segments): ``pallas_gpu_attention``.
    ``implementation="xla"`` runs the same reordering through XLA (the CPU test).
    """
    n = q.shape[1]
    q, k, v, segment_ids = pad_tokens(CUDNN_SEQ_MULTIPLE, q, k, v, segment_ids)
    valid = segment_ids != 0
    order = jnp.argsort(~valid, axis=1, stable=True)  # [B, N]: valid tokens first
    inverse = jnp.argsort(order, axis=1)
    lengths = jnp.maximum(jnp.sum(valid, axis=1, dtype=jnp.int32), 1)  # an all-padding row: finite

    def take(t, index):
        return jnp.take_along_axis(t, index[:, :, None, None], axis=1)

    out = jax.nn.dot_product_attention(take(q, order), take(k, order), take(v, order),
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return take(out, inverse)[:, :n]


def pallas_gpu_attention(q, k, v, segment_ids, block_size: int = 128, interpret: bool = False):
    """Packed rows on GPU: Pallas (Triton) flash attention with segment ids
    (``jax.experimental.pallas.ops.gpu.attention.mha``, its Triton backward), no ``[N, N]`` mask.

    The kernel masks by segment equality only, so padding queries (segment 0) attend to padding
    keys: finite values that callers mask; valid queries never see padding keys, as in
    ``xla_attention``. The sequence is padded (segment 0) to a multiple of ``block_size``.
    ``interpret=True`` runs the kernel in Pallas interpret mode (any backend; the CPU test).
    """
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    def kernel(q, k, v, segment_ids):
        b, n, h, d = q.shape
        q, k, v, seg = pad_tokens(block_size, q, k, v, segment_ids)
        blocks = dataclasses.replace(pallas_attention.BlockSizes.get_default(), block_q=block_size,
                                     block_k=block_size)
        out = pallas_attention.mha(q, k, v, seg, sm_scale=d ** -0.5, block_sizes=blocks,
                                   interpret=interpret)
        return out[:, :n]

    active = sharding.active()
    if active is None or active[0].size == 1:
        return kernel(q, k, v, segment_ids)
    # XLA cannot partition a Pallas kernel: under a mesh it runs per shard, rows over the batch
    # axes and heads over ``tensor`` (the layout the transformer constrains q/k/v to).
    mesh, rules = active
    spec = sharding.fit_spec(sharding.logical_to_spec(("batch", "length", "heads", "head_dim"),
                                                      rules, mesh), q.shape, mesh)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(*spec[:2])),
                         out_specs=spec, check_vma=False)(q, k, v, segment_ids)


def gpu_attention(q, k, v, segment_ids, packed: bool = True):
    """The GPU path: ``cudnn_attention`` where each row is one segment plus padding (``packed=False``:
    data ``mode="bucket"``, the sampler) in bf16/fp16, the only dtypes cuDNN's flash attention takes;
    ``pallas_gpu_attention`` for packed rows and for float32 compute."""
    if packed or q.dtype not in (jnp.bfloat16, jnp.float16):
        return pallas_gpu_attention(q, k, v, segment_ids)
    return cudnn_attention(q, k, v, segment_ids)


def splash_attention(q, k, v, segment_ids, block_size: int = 512, *, interpret: bool = False):
    """Pallas splash attention (TPU) with segment ids; pads the sequence to the block size.

    Mosaic kernels are not partitioned by XLA, so under an active ``use_rules`` mesh the kernel runs
    in ``shard_map``: rows over the mesh axes of the ``batch`` rule, heads over those of ``heads``
    (dimensions an axis does not divide stay whole), the sequence whole on every device.
    ``interpret=True`` runs the kernel in the Pallas interpreter (any backend; tests).
    """
    active = sharding.active()
    local = functools.partial(_splash_local, block_size=block_size, interpret=interpret)
    if active is None:
        return local(q, k, v, segment_ids)
    mesh, rules = active
    names = sharding.logical_to_spec(("batch", None, "heads", None), rules, mesh)
    qkv = sharding.fit_spec(names, q.shape, mesh)  # [B, N, H, D]
    seg = PartitionSpec(qkv[0], None)              # [B, N]
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                         check_vma=False)(q, k, v, segment_ids)


def _splash_local(q, k, v, segment_ids, *, block_size: int, interpret: bool):
    """The kernel on one device's rows and heads: ``[B, N, H, D]`` -> ``[B, N, H, D]``."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel, splash_attention_mask as mask_lib)

    b, n, h, d = q.shape
    block = min(block_size, max(128, -(-n // 128) * 128))
    q, k, v, seg = pad_tokens(block, q, k, v, segment_ids)  # padding keys are segment 0
    padded = q.shape[1]
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, N', D]
    mha = kernel.make_splash_mha(
        mask=mask_lib.MultiHeadMask([mask_lib.FullMask((padded, padded))] * h),
        head_shards=1, q_seq_shards=1, interpret=interpret,
        block_sizes=kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                      block_q_dkv=block, block_kv_dkv=block,
                                      block_kv_dkv_compute=block, block_q_dq=block,
                                      block_kv_dq=block))
    q = q * (d ** -0.5)
    out = jax.vmap(lambda qi, ki, vi, si: mha(qi, ki, vi, segment_ids=kernel.SegmentIds(q=si, kv=si)))(
        q, k, v, seg)
    return out.transpose(0, 2, 1, 3)[:, :n]


@functools.lru_cache(maxsize=None)
def resolve(choice: str, backend: str | None = None) -> str:
    """Which implementation runs for config ``attention=choice`` on ``backend``; warns on fallback."""
    backend = backend or jax.default_backend()
    wanted = {"auto": {"tpu": "splash", "gpu": "cudnn", "cpu": "chunked"}.get(backend, "xla")
              }.get(choice, choice)
    needs = {"splash": "tpu", "cudnn": "gpu"}
    if wanted in needs and backend != needs[wanted]:
        log.warning("attention=%r needs a %s backend but this is %r; falling back to XLA attention",
                    wanted, needs[wanted].upper(), backend)
        return "xla"
    return wanted


def target_backend() -> str:
    """The platform the traced code is for: the active mesh's devices (an AOT compile for a TPU
    topology from a CPU host is for ``tpu``), else ``jax.default_backend()``."""
    active = sharding.active()
    if active is not None:
        return active[0].devices.flat[0].platform
    return jax.default_backend()



def attention(q, k, v, segment_ids, implementation: str = "auto", splash_block_size: int = 512,
              packed: bool = True, query_chunk: int = 128):
    """Segment-masked attention by the implementation ``resolve`` picks for ``target_backend()``.
    ``packed=False`` promises one segment per row (plus padding), which lets the GPU use cuDNN."""
    impl = resolve(implementation, target_backend())
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, splash_block_size)
    if impl == "cudnn":
        return gpu_attention(q, k, v, segment_ids, packed)
    if impl == "chunked":
        return chunked_attention(q, k, v, segment_ids, query_chunk)
    return xla_attention(q, k, v, segment_ids)
