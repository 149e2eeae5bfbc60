"""A toy frozen text encoder: a tiny GPT-OSS causal LM trained on a caption corpus.

Lens feeds its denoiser the hidden states of layers 5/11/17/23 of GPT-OSS-20B (spec 4.2/4.3):
every 6th of its 24 decoder layers, from the 6th. The demo's stand-in (``text_encoder.kind=
"embedding"``) is a frozen random table, which knows nothing of language. This module trains a
GPT-OSS of the same architecture (``lens_jax.models.text_encoder``: attention with sinks,
sliding/full layers alternating, top-k MoE with clamped SwiGLU; plain RoPE) on next-token
prediction over the captions themselves, and writes it as a transformers GPT-OSS folder
(``config.json`` + ``model.safetensors`` with dense float32 experts, ``model.norm.weight`` and
``lm_head.weight``) that ``lens_jax.checkpoints.text_encoder.load_text_encoder`` reads, so the
denoiser gets its selected layers exactly as Lens gets GPT-OSS's (``text_encoder.kind="gpt_oss"``,
``text_encoder.path=FOLDER``, ``text_encoder.dtype="float32"``).

- ``ToyLMSettings``: sizes and training settings (every default documented once, here).
- ``init_params`` / ``lm_logits`` / ``lm_loss``: the LM as pure functions: the decoder stack of
  ``models.text_encoder.encode`` run to its last layer, the final RMSNorm, an untied LM head.
- ``train_lm``: AdamW on padded, length-bucketed batches of a fixed token budget (tqdm bar).
- ``write_folder``: the GPT-OSS folder (keys of ``text_encoder_mappings`` + norm + head) and
  ``toy_lm.json``, the training summary.
- ``train_or_reuse``: the driver: reuses ``out`` when its summary has the same key (corpus
  fingerprint + settings), else trains and replaces it atomically (``output_guard.atomic_output_dir``).
- ``check_matches``: the denoiser config's ``selected_layer_index`` / ``enc_hidden_dim`` against a
  toy folder (ValueError naming the mismatch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.models.text_encoder import GptOssConfig, LAYER_FULL, LAYER_SLIDING, RopeParams

SUMMARY = "toy_lm.json"
# Parameters under AdamW's weight decay: the matrices (no norms, biases, sinks).
DECAYED = frozenset({"embed", "lm_head", "q_kernel", "k_kernel", "v_kernel", "o_kernel",
                     "router_kernel", "gate_up", "down"})


@dataclasses.dataclass(frozen=True)
class ToyLMSettings:
    """The toy LM's architecture and training (defaults: the demo's, docs/demo.md).

    8 layers of width 64 and the selected layers (1, 3, 5, 7): every 2nd layer from the 2nd, as
    Lens takes every 6th of GPT-OSS-20B's 24 from the 6th (5, 11, 17, 23), ending at the last.
    """

    hidden_size: int = 64
    num_layers: int = 8
    num_heads: int = 4                # query heads
    num_kv_heads: int = 2             # GQA: 2 query heads per KV head (GPT-OSS: 8 per KV head)
    head_dim: int = 16
    intermediate_size: int = 64       # per expert
    num_experts: int = 4
    experts_per_token: int = 2
    sliding_window: int = 16          # sliding_attention layers (even ones); odd ones are full
    selected_layers: tuple[int, ...] = (1, 3, 5, 7)
    vocab_multiple: int = 64          # vocab = tokenizer vocab rounded up (spare rows: new words)
    steps: int = 200                  # AdamW steps (~2 minutes on one shared CPU core)
    batch_tokens: int = 2048          # padded tokens per batch (rows = batch_tokens // length)
    lr: float = 3e-3                  # peak; linear warmup then cosine to lr / 10
    warmup_steps: int = 30
    weight_decay: float = 0.01
    heldout_fraction: float = 0.05    # distinct captions held out (never trained on)
    buckets: tuple[int, ...] = (16, 160)  # padded lengths (one compiled step each); a caption
    #                                   goes to the first that holds it, longer ones are cut to the
    #                                   last (the demo's short captions: 3-15 words, dense: 68-142)
    seed: int = 0

    def gpt_oss_config(self, vocab_size: int) -> GptOssConfig:
        n = self.num_layers
        return GptOssConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, num_hidden_layers=n,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, intermediate_size=self.intermediate_size,
            num_local_experts=self.num_experts, num_experts_per_tok=self.experts_per_token,
            sliding_window=self.sliding_window, max_position_embeddings=4 * max(self.buckets),
            layer_types=tuple(LAYER_SLIDING if i % 2 == 0 else LAYER_FULL for i in range(n)),
            rope=RopeParams(rope_type="default", theta=10000.0, factor=1.0), pad_token_id=0)


# ----------------------------------------------------------------------------- the corpus


def tokenizer_vocab_size(spec: str) -> int | None:
    """Entries of the caption tokenizer ``spec`` (``json:`` file or ``bytes``); None if unknown."""
    if spec == "bytes":
        return 256
    kind, sep, arg = spec.partition(":")
    if sep and kind == "json":
        from tokenizers import Tokenizer

        path = os.path.join(arg, "tokenizer.json") if os.path.isdir(arg) else arg
        return int(Tokenizer.from_file(path).get_vocab_size())
    return None


def tokenize_corpus(texts: Sequence[str], tokenizer_spec: str, max_length: int) -> list[np.ndarray]:
    """The ids of each non-empty caption (``lens_jax.data.tokenize.load_caption_tokenizer``), cut
    to ``max_length``; captions with fewer than 2 ids (nothing to predict) are dropped."""
    from lens_jax.data.tokenize import load_caption_tokenizer

    tok = load_caption_tokenizer(tokenizer_spec)
    out = [np.asarray(tok.tokenize(t), np.int32)[:max_length] for t in texts if t]
    return [ids for ids in out if len(ids) >= 2]


def corpus_fingerprint(captions: Sequence[np.ndarray]) -> str:
    """sha256 of the tokenized corpus (lengths and ids, in order): changes with the captions and
    with the tokenizer."""
    h = hashlib.sha256()
    for ids in captions:
        h.update(np.int32(len(ids)).tobytes())
        h.update(np.asarray(ids, "<i4").tobytes())
    return h.hexdigest()


def split_heldout(captions: Sequence[np.ndarray], fraction: float, seed: int
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, held-out): a seeded ``fraction`` of the *distinct* captions (at least one) is held
    out, so no held-out caption is also a training one."""
    distinct = sorted({ids.tobytes(): ids for ids in captions}.items())
    order = np.random.default_rng(seed).permutation(len(distinct))
    n_out = max(1, int(round(fraction * len(distinct)))) if len(distinct) > 1 else 0
    held = {distinct[i][0] for i in order[:n_out]}
    train = [ids for ids in captions if ids.tobytes() not in held]
    return train, [distinct[i][1] for i in order[:n_out]]


def length_bucket(n: int, buckets: Sequence[int]) -> int:
    """Padded length of a caption of ``n`` ids: the first of ``buckets`` (ascending) that holds
    it (callers cut captions to the last)."""
    return next((b for b in buckets if n <= b), buckets[-1])


def make_batches(captions: Sequence[np.ndarray], batch_tokens: int, buckets: Sequence[int],
                 rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch of right-padded ``(ids [R, L] int32, mask [R, L] bool)`` batches, each of one
    length bucket and ``R = batch_tokens // L`` rows (the last of a bucket is filled up with
    empty rows, so that every batch of a bucket has one shape)."""
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(captions):
        by_length.setdefault(length_bucket(len(ids), buckets), []).append(i)
    batches = []
    for length, members in sorted(by_length.items()):
        rows = max(1, batch_tokens // length)
        members = [members[i] for i in rng.permutation(len(members))]
        for start in range(0, len(members), rows):
            chunk = members[start:start + rows]
            ids = np.zeros((rows, length), np.int32)
            mask = np.zeros((rows, length), bool)
            for r, i in enumerate(chunk):
                ids[r, :len(captions[i])] = captions[i]
                mask[r, :len(captions[i])] = True
            batches.append((ids, mask))
    return [batches[i] for i in rng.permutation(len(batches))]


# ----------------------------------------------------------------------------- the LM


def init_params(config: GptOssConfig, seed: int) -> dict:
    """``{"embed", "layers": {...}, "norm", "lm_head"}`` float32: the decoder's parameters as
    ``models.text_encoder.random_params`` draws them (dense experts), a unit final norm, an
    untied head ``[V, D]`` (torch layout)."""
    from flax.traverse_util import unflatten_dict

    from lens_jax.models.text_encoder import random_params

    params = unflatten_dict(random_params(config, config.num_hidden_layers, False, np.float32, seed))
    rng = np.random.default_rng([seed, 1])
    params["norm"] = np.ones((config.hidden_size,), np.float32)
    params["lm_head"] = (0.05 * rng.standard_normal((config.vocab_size, config.hidden_size))
                         ).astype(np.float32)
    return jax.tree.map(jnp.asarray, params)


def lm_logits(params: Mapping, ids: jax.Array, mask: jax.Array, config: GptOssConfig) -> jax.Array:
    """``[B, L, V]`` next-token logits: ``encode`` to the last layer, final RMSNorm, LM head."""
    from lens_jax.models.text_encoder import encode, rms_norm

    decoder = {"embed": params["embed"], "layers": params["layers"]}
    (h,) = encode(decoder, ids, mask, config=config, selected=(config.num_hidden_layers - 1,),
                  moe_impl="dense")
    h = rms_norm(h, params["norm"], config.rms_norm_eps)
    return jnp.einsum("bld,vd->blv", h, params["lm_head"])


def lm_loss(params: Mapping, ids: jax.Array, mask: jax.Array, config: GptOssConfig
            ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Mean next-token cross-entropy over the positions whose next token is real, and
    ``(correct, counted)`` argmax predictions (for the accuracy)."""
    logits = lm_logits(params, ids, mask, config)[:, :-1].astype(jnp.float32)
    target, weight = ids[:, 1:], mask[:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    counted = jnp.sum(weight)
    correct = jnp.sum((jnp.argmax(logits, -1) == target) * weight)
    return jnp.sum(nll * weight) / jnp.maximum(counted, 1.0), (correct, counted)


def optimizer(settings: ToyLMSettings):
    """AdamW, linear warmup then cosine decay to lr/10; weight decay on matrices only."""
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.lr, settings.warmup_steps, max(settings.steps, settings.warmup_steps + 1),
        end_value=settings.lr / 10)
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: str(getattr(path[-1], "key", "")) in DECAYED, params)

    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=settings.weight_decay, mask=decay_mask))


def evaluate(params: Mapping, captions: Sequence[np.ndarray], config: GptOssConfig,
             settings: ToyLMSettings) -> dict[str, float]:
    """Mean next-token loss and argmax accuracy over ``captions`` (every real next token)."""
    if not captions:
        return {"loss": float("nan"), "accuracy": float("nan"), "tokens": 0}
    fn = jax.jit(lambda p, i, m: lm_loss(p, i, m, config))
    total = correct = count = 0.0
    batches = make_batches(captions, settings.batch_tokens, settings.buckets, np.random.default_rng(0))
    for ids, mask in batches:
        loss, (c, n) = fn(params, ids, mask)
        total += float(loss) * float(n)
        correct += float(c)
        count += float(n)
    return {"loss": total / count, "accuracy": correct / count, "tokens": int(count)}


def train_lm(captions: Sequence[np.ndarray], config: GptOssConfig, settings: ToyLMSettings,
             progress: bool = True) -> tuple[dict, list[float]]:
    """AdamW next-token training for ``settings.steps`` steps over epochs of ``make_batches``;
    returns the parameters (host numpy) and the loss of every step."""
    import optax
    from tqdm.auto import tqdm

    params = init_params(config, settings.seed)
    opt = optimizer(settings)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, ids, mask):
        (loss, _), grads = jax.value_and_grad(lm_loss, has_aux=True)(params, ids, mask, config)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng([settings.seed, 2])
    losses: list[float] = []
    batches: list = []
    with tqdm(total=settings.steps, desc="toy text encoder", unit="step", disable=not progress,
              dynamic_ncols=True) as bar:
        for _ in range(settings.steps):
            if not batches:
                batches = make_batches(captions, settings.batch_tokens, settings.buckets, rng)
            ids, mask = batches.pop()
            params, opt_state, loss = step(params, opt_state, ids, mask)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update(1)
    return jax.device_get(params), losses


# ----------------------------------------------------------------------------- the folder


def config_json(config: GptOssConfig) -> dict:
    """A transformers ``GptOssForCausalLM`` ``config.json`` (dense float32 experts, plain RoPE)."""
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
        "attention_dropout": 0.0, "pad_token_id": config.pad_token_id, "head_dim": config.head_dim,
        "hidden_act": "silu", "hidden_size": config.hidden_size, "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size, "layer_types": list(config.layer_types),
        "max_position_embeddings": config.max_position_embeddings,
        "num_attention_heads": config.num_attention_heads,
        "num_experts_per_tok": config.num_experts_per_tok,
        "experts_per_token": config.num_experts_per_tok,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "num_local_experts": config.num_local_experts, "output_router_logits": False,
        "rms_norm_eps": config.rms_norm_eps, "sliding_window": config.sliding_window,
        "swiglu_limit": config.swiglu_limit, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "vocab_size": config.vocab_size,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope.theta},
    }


def write_folder(folder: Path, params: Mapping, config: GptOssConfig, summary: Mapping) -> None:
    """``config.json``, ``model.safetensors`` (the keys ``load_text_encoder`` reads, dense experts,
    plus ``model.norm.weight`` and ``lm_head.weight``) and the summary ``toy_lm.json``."""
    from lens_jax.checkpoints.safetensors_io import ShardedWriter, write_json
    from lens_jax.checkpoints.text_encoder import text_encoder_mappings

    write_json(folder / "config.json", config_json(config))
    writer = ShardedWriter(folder, "model")
    for m in text_encoder_mappings(config, config.num_hidden_layers, packed=False, prefix="model."):
        value = params[m.path[0]] if len(m.path) == 1 else params[m.path[0]][m.path[1]]
        value = np.asarray(value if m.index is None else value[m.index], np.float32)
        writer.add(m.key, m.to_torch(value))
    writer.add("model.norm.weight", np.asarray(params["norm"], np.float32))
    writer.add("lm_head.weight", np.asarray(params["lm_head"], np.float32))
    writer.finish()
    write_json(folder / SUMMARY, dict(summary))


def read_summary(folder: str | os.PathLike) -> dict | None:
    """The ``toy_lm.json`` of a folder (None when absent or unreadable)."""
    try:
        return json.loads((Path(folder) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def cache_key(fingerprint: str, settings: ToyLMSettings, vocab_size: int) -> str:
    payload = json.dumps({"corpus": fingerprint, "vocab_size": vocab_size,
                          "settings": dataclasses.asdict(settings)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def train_or_reuse(texts: Sequence[str], tokenizer_spec: str, out: str | os.PathLike,
                   settings: ToyLMSettings = ToyLMSettings(), progress: bool = True,
                   log=print) -> Path:
    """The GPT-OSS folder ``out`` of a toy LM trained on ``texts`` (tokenized by
    ``tokenizer_spec``, a ``data.tokenizer`` string such as ``json:FILE``).

    Reused as is when ``out/toy_lm.json`` holds the same key (corpus fingerprint, vocabulary,
    settings); otherwise trained and written under a temporary name, then renamed over ``out``
    (an interrupted run leaves ``out`` as it was).
    """
    from lens_jax.output_guard import atomic_output_dir

    out = Path(out).absolute()
    captions = tokenize_corpus(texts, tokenizer_spec, max(settings.buckets))
    if not captions:
        raise ValueError("toy text encoder: no caption with 2 or more tokens to train on")
    base_vocab = tokenizer_vocab_size(tokenizer_spec) or 0
    base_vocab = max(base_vocab, max(int(ids.max()) for ids in captions) + 1)
    vocab = -(-base_vocab // settings.vocab_multiple) * settings.vocab_multiple
    fingerprint = corpus_fingerprint(captions)
    key = cache_key(fingerprint, settings, vocab)
    before = read_summary(out)
    if before is not None and before.get("key") == key and (out / "config.json").is_file():
        log(f"reusing the toy text encoder {out} (same corpus {fingerprint[:12]} and settings)")
        return out
    config = settings.gpt_oss_config(vocab)
    train, heldout = split_heldout(captions, settings.heldout_fraction, settings.seed)
    log(f"training the toy text encoder: GPT-OSS {settings.num_layers} layers x {settings.hidden_size}, "
        f"{settings.num_experts} experts top-{settings.experts_per_token}, vocab {vocab}; "
        f"{len(train)} captions ({len(heldout)} distinct held out), {settings.steps} steps -> {out}")
    start = time.perf_counter()
    params, losses = train_lm(train, config, settings, progress)
    seconds = time.perf_counter() - start
    summary = {
        "key": key, "corpus_fingerprint": fingerprint, "tokenizer": tokenizer_spec,
        "num_captions": len(captions), "num_train_captions": len(train),
        "num_heldout_captions": len(heldout), "vocab_size": vocab, "tokenizer_vocab_size": base_vocab,
        "steps": settings.steps, "seconds": round(seconds, 1),
        "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])),
        "train": evaluate(params, train[:2000], config, settings),
        "heldout": evaluate(params, heldout, config, settings),
        "selected_layers": list(settings.selected_layers), "hidden_size": settings.hidden_size,
        "settings": dataclasses.asdict(settings),
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "date": time.strftime("%Y-%m-%d"),
    }
    with atomic_output_dir(out, overwrite=True) as tmp:
        write_folder(tmp, params, config, summary)
    log(f"toy text encoder: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} in "
        f"{seconds:.0f} s; held-out next-token accuracy {summary['heldout']['accuracy']:.3f} "
        f"(loss {summary['heldout']['loss']:.3f})")
    return out


def check_matches(folder: str | os.PathLike, selected_layer_index: Sequence[int],
                  enc_hidden_dim: int) -> None:
    """ValueError unless the denoiser reads what the toy folder provides: ``selected_layer_index``
    equal to its selected layers and ``enc_hidden_dim`` to its hidden size."""
    summary = read_summary(folder)
    if summary is None:
        raise ValueError(f"{folder}: no {SUMMARY}; not a toy text encoder folder")
    want, got = tuple(summary["selected_layers"]), tuple(int(i) for i in selected_layer_index)
    problems = []
    if got != want:
        problems.append(f"config.model.selected_layer_index={got} but the toy text encoder's "
                        f"selected layers are {want}")
    if int(enc_hidden_dim) != int(summary["hidden_size"]):
        problems.append(f"config.model.enc_hidden_dim={enc_hidden_dim} but the toy text encoder's "
                        f"hidden size is {summary['hidden_size']}")
    if problems:
        raise ValueError(f"{folder}: " + "; ".join(problems))
