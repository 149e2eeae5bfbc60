"""Lens prompt template, GPT-OSS tokenization and prompt encoding (spec 2.1).

Every prompt is rendered into the fixed GPT-OSS harmony conversation Lens uses (system text,
user prompt, canned analysis turn, open final turn), tokenized with the checkpoint's
``tokenizer.json`` (``tokenizers`` library), truncated to 512 tokens, right-padded with
``<|endoftext|>`` and run through the text encoder; the fixed preamble (everything up to and
including ``<|start|>user<|message|>``) is then dropped from the features and the mask.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAX_LENGTH = 512
PAD_TOKEN = "<|endoftext|>"
# Harmony special tokens the template needs (stock ids in o200k_harmony: 200006, 200008, 200007,
# 200005; pad <|endoftext|> = 199999).
TEMPLATE_SPECIAL_TOKENS = ("<|start|>", "<|message|>", "<|end|>", "<|channel|>", PAD_TOKEN)
SYSTEM_INSTRUCTIONS = ("Describe the image by detailing the color, shape, size, texture, quantity, "
                       "text, spatial relationships of the objects and background.")
THINKING = "Need to generate one image according to the description."
_PREAMBLE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: {date}\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    "<|end|><|start|>developer<|message|># Instructions\n\n{instructions}\n\n<|end|>"
    "<|start|>user<|message|>")
_SUFFIX = ("<|end|><|start|>assistant<|channel|>analysis<|message|>{thinking}<|end|>"
           "<|start|>assistant<|channel|>final<|message|>")


def today() -> str:
    """Today's local date as ``YYYY-MM-DD`` (what the reference template renders by default)."""
    return datetime.date.today().isoformat()


def _date_string(date: str | datetime.date | None) -> str:
    if date is None:
        return today()
    if isinstance(date, datetime.date):
        return date.isoformat()
    return str(date)


def render_preamble(date: str | datetime.date | None = None) -> str:
    """The fixed part of the template, up to and including ``<|start|>user<|message|>``."""
    return _PREAMBLE.format(date=_date_string(date), instructions=SYSTEM_INSTRUCTIONS)


def render_prompt(prompt: str, date: str | datetime.date | None = None) -> str:
    """The Lens conversation for ``prompt`` as the GPT-OSS chat template renders it, cut before
    ``<|return|>`` (spec 2.1 step 2). ``date``: ``YYYY-MM-DD`` (default: today)."""
    return render_preamble(date) + prompt + _SUFFIX.format(thinking=THINKING)


def is_empty_prompt(prompt: str) -> bool:
    return not prompt or not prompt.strip()


class PromptTokenizer:
    """GPT-OSS (o200k_harmony) tokenizer with the Lens template: prompts -> ids + mask."""

    def __init__(self, tokenizer, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.source = source
        tokenizer.no_padding()
        tokenizer.no_truncation()
        missing = []
        for token in TEMPLATE_SPECIAL_TOKENS:
            token_id = tokenizer.token_to_id(token)
            if token_id is None or tokenizer.encode(token, add_special_tokens=False).ids != [token_id]:
                missing.append(token)
        if missing:
            raise ValueError(f"{source}: the tokenizer lacks the GPT-OSS harmony special tokens "
                             f"{missing} (is this the o200k_harmony tokenizer.json of GPT-OSS?)")
        self.pad_id = tokenizer.token_to_id(PAD_TOKEN)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "PromptTokenizer":
        """From a folder holding ``tokenizer.json``, or a checkpoint root with ``tokenizer/``."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        candidates = [folder / "tokenizer.json", folder / "tokenizer" / "tokenizer.json"]
        if folder.is_file() and folder.name.endswith(".json"):
            candidates.insert(0, folder)
        for path in candidates:
            if path.is_file():
                try:
                    tokenizer = Tokenizer.from_file(str(path))
                except Exception as e:  # the tokenizers library raises a plain Exception
                    raise ValueError(f"{path}: not a readable tokenizers file ({e})") from e
                return cls(tokenizer, source=str(path))
        raise FileNotFoundError(f"{folder}: no tokenizer.json (looked for "
                                f"{', '.join(str(p) for p in candidates)})")

    def render(self, prompt: str, date: str | datetime.date | None = None) -> str:
        return render_prompt(prompt, date)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def preamble_length(self, date: str | datetime.date | None = None) -> int:
        """Tokens of the fixed preamble (97 for the stock tokenizer and a ``YYYY-MM-DD`` date)."""
        return len(self._encode([render_preamble(date)])[0])

    def __call__(self, prompts: str | Sequence[str], date: str | datetime.date | None = None,
                 max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
        """Renders, tokenizes, truncates (end cut, warning logged) and right-pads with ``<|endoftext|>``.

        Returns ``input_ids [B, L]`` int32 and ``attention_mask [B, L]`` bool, L = longest (<= max_length).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        date = _date_string(date)
        encoded = self._encode([render_prompt(p, date) for p in prompts])
        for i, ids in enumerate(encoded):
            if len(ids) > max_length:
                log.warning("prompt %d: %d tokens cut (%d templated tokens > max_length %d); the end of "
                            "the sequence, including the assistant scaffold, is lost",
                            i, len(ids) - max_length, len(ids), max_length)
        encoded = [ids[:max_length] for ids in encoded]
        length = max(len(ids) for ids in encoded)
        input_ids = np.full((len(encoded), length), self.pad_id, np.int32)
        mask = np.zeros((len(encoded), length), bool)
        for i, ids in enumerate(encoded):
            input_ids[i, :len(ids)] = ids
            mask[i, :len(ids)] = True
        return input_ids, mask


def drop_preamble(features, mask, preamble_length: int):
    """Drops the first ``preamble_length`` positions from features (list of ``[B, L, D]`` or one
    array) and the mask ``[B, L]``; zero-length results if ``L <= preamble_length``."""
    if isinstance(features, (list, tuple)):
        return [f[:, preamble_length:] for f in features], mask[:, preamble_length:]
    return features[:, preamble_length:], mask[:, preamble_length:]


def encode_prompts(encoder, tokenizer: PromptTokenizer, prompts: str | Sequence[str],
                   date: str | datetime.date | None = None, max_length: int = MAX_LENGTH):
    """Prompts -> (features: list of ``[B, L', hidden]`` per selected layer, mask ``[B, L']`` bool).

    The preamble is dropped (L' = L - preamble length), ready for the denoiser.
    """
    import jax.numpy as jnp  # here, not at the top: the tokenizer runs in grain workers (no jax)

    date = _date_string(date)
    input_ids, mask = tokenizer(prompts, date=date, max_length=max_length)
    features = encoder(jnp.asarray(input_ids), jnp.asarray(mask))
    return drop_preamble(list(features), jnp.asarray(mask), tokenizer.preamble_length(date))


def encode_negative_prompts(encoder, tokenizer: PromptTokenizer, negative_prompts: str | Sequence[str],
                            like: tuple[Sequence, object], date: str | datetime.date | None = None,
                            max_length: int = MAX_LENGTH):
    """Negative prompts for CFG (spec 2.1 step 6). ``like`` is the positive ``(features, mask)``.

    If every negative string is empty/whitespace: zeros shaped like the positive features and an
    all-false mask, without running the encoder. Otherwise they are encoded like prompts (one
    string is used for the whole batch).
    """
    features, mask = like
    batch = mask.shape[0]
    if isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * batch
    if len(negative_prompts) != batch:
        raise ValueError(f"{len(negative_prompts)} negative prompts for a batch of {batch}")
    if all(is_empty_prompt(p) for p in negative_prompts):
        import jax.numpy as jnp  # as in encode_prompts

        return [jnp.zeros_like(f) for f in features], jnp.zeros(mask.shape, bool)
    return encode_prompts(encoder, tokenizer, negative_prompts, date=date, max_length=max_length)
