"""Caption tokenizers for the input pipeline.

The pipeline needs, per caption, the token ids the text encoder runs on (``tokenize``) and how
many leading ids are the fixed preamble that the denoiser never sees (``preamble_length``, 97 for
the GPT-OSS template of spec 2.1). The denoiser's text tokens of a caption are
``ids[preamble_length:]``.

Implementations:
- ``PromptTokenizerAdapter``: wraps ``lens_jax.text.PromptTokenizer`` (full harmony template with a
  fixed date; what training on GPT-OSS features needs).
- ``JsonCaptionTokenizer``: plain tokenization with a ``tokenizer.json`` (``tokenizers`` library,
  no template, preamble 0) — a stand-in for tests and demos.
- ``ByteCaptionTokenizer``: UTF-8 bytes as ids (no file needed; tests and benchmarks).

``load_caption_tokenizer(spec)`` builds one from a config string.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class CaptionTokenizer(Protocol):
    """What the pipeline needs from a tokenizer. Must be picklable (it runs in grain workers)."""

    @property
    def preamble_length(self) -> int:
        """Leading ids of every ``tokenize`` output that are the fixed template preamble."""
        ...

    def tokenize(self, caption: str) -> np.ndarray:
        """``[L]`` int32: the ids the text encoder runs on (preamble included)."""
        ...


class ByteCaptionTokenizer:
    """UTF-8 bytes as token ids (``byte + offset``); no template, no preamble."""

    preamble_length = 0

    def __init__(self, offset: int = 0):
        self.offset = int(offset)

    def tokenize(self, caption: str) -> np.ndarray:
        return np.frombuffer(caption.encode("utf-8"), np.uint8).astype(np.int32) + self.offset


class JsonCaptionTokenizer:
    """Plain tokenization with a HF ``tokenizer.json`` (no chat template, no special tokens,
    preamble 0). Loads lazily so that it pickles cheaply into grain workers."""

    preamble_length = 0

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        self._tok = None

    def __getstate__(self):
        return {"path": self.path, "_tok": None}

    def _tokenizer(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(self.path)
        return self._tok

    def tokenize(self, caption: str) -> np.ndarray:
        ids = self._tokenizer().encode(caption, add_special_tokens=False).ids
        return np.asarray(ids, np.int32)


class PromptTokenizerAdapter:
    """``lens_jax.text.PromptTokenizer`` (GPT-OSS harmony template, spec 2.1) as a
    ``CaptionTokenizer``. ``date`` (``YYYY-MM-DD``) is fixed so that every caption gets the same
    preamble; ``max_length`` is the cap on the whole templated sequence (512 in Lens)."""

    def __init__(self, prompt_tokenizer, date: str, max_length: int = 512):
        self.prompt_tokenizer = prompt_tokenizer
        self.date = date
        self.max_length = int(max_length)
        self._preamble = int(prompt_tokenizer.preamble_length(date))

    @property
    def preamble_length(self) -> int:
        return self._preamble

    def tokenize(self, caption: str) -> np.ndarray:
        ids, mask = self.prompt_tokenizer([caption], date=self.date, max_length=self.max_length)
        ids, mask = np.asarray(ids)[0], np.asarray(mask)[0].astype(bool)
        return ids[mask].astype(np.int32)


def load_caption_tokenizer(spec: str, date: str = "2026-01-01",
                           max_length: int = 512) -> CaptionTokenizer:
    """A tokenizer from a config string.

    ``bytes`` -> ``ByteCaptionTokenizer``; ``json:PATH`` (a ``tokenizer.json`` or a folder holding
    one) -> ``JsonCaptionTokenizer``; ``prompt:FOLDER`` -> ``PromptTokenizerAdapter`` over
    ``lens_jax.text.PromptTokenizer.from_pretrained(FOLDER)`` with ``date``.
    """
    if spec == "bytes":
        return ByteCaptionTokenizer()
    kind, sep, arg = spec.partition(":")
    if sep and kind == "json":
        return JsonCaptionTokenizer(arg)
    if sep and kind == "prompt":
        from lens_jax.text import PromptTokenizer  # written by the text-encoder work

        return PromptTokenizerAdapter(PromptTokenizer.from_pretrained(arg), date, max_length)
    if spec == "words":
        raise ValueError("data.tokenizer='words' (configs/demo.py) is resolved by lens_jax.demo, which "
                         "writes OUT/word_tokenizer.json; when running lens-train by hand, pass "
                         "--config.data.tokenizer=json:FILE (written by lens_jax.demo.write_word_tokenizer)")
    raise ValueError(f"unknown caption tokenizer {spec!r}: expected 'bytes', 'json:PATH' or "
                     "'prompt:FOLDER'")
