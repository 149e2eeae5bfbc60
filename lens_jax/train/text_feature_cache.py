"""A frozen text encoder's features of each distinct caption, computed once per host and reused
(``config.text_encoder.cache_features``).

The encoder is frozen and a caption's features are a pure function of its token ids (causal
attention, right padding: a token sees only the tokens before it in its own caption), so a run
over a small caption corpus, such as the demo's toy GPT-OSS over its 4000 records, need not encode
the same caption again at every epoch. The cache runs on the host's side of the step: the batch
feed (``lens_jax.train.loop.BatchFeed``) calls it on each numpy batch, it encodes the captions it
has not seen (``rows x segments`` of them per call, the shape the step would encode, zero-masked
rows filling the rest) and writes the packed text stream ``text_features [B, Nt, S, E]`` (float32,
zero at padding) that ``lens_jax.train.encoders.encode_inputs`` reads instead of running the
encoder inside the step.

Memory: ``4 * S * E`` bytes per token of every distinct caption, held for the whole run (the
toy LM: 1 KiB a token; measured: 430 MiB for the ablation's 3988 dense captions, 48 MiB for the
demo's 3367 short ones). Meant for encoders
whose parameters fit on one device, and corpora whose features fit in host memory; GPT-OSS-20B
over 800M captions encodes inside the step (the default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lens_jax.models.text_encoder import is_right_padded

# ids [M, L] int32, mask [M, L] bool -> one [M, L, E] float32 array per selected layer
EncodeRows = Callable[[np.ndarray, np.ndarray], Sequence[np.ndarray]]


class CaptionFeatureCache:
    """``cache(batch) -> batch`` with ``text_features`` added (see the module docstring).

    Keys are a caption's valid token ids (``caption_ids[b, k, :caption_mask[b, k].sum()]``), values
    its ``[n, S, E]`` float32 features (n valid tokens, the preamble included). Not thread-safe:
    one caller at a time (the batch feed's thread during training).
    """

    def __init__(self, encode_rows: EncodeRows, preamble: int, layers: int, width: int):
        """``layers``, ``width``: S selected layers of E features each (``config.model``)."""
        self._encode_rows = encode_rows
        self._preamble = int(preamble)
        self._shape = (int(layers), int(width))
        self._features: dict[bytes, np.ndarray] = {}
        self.hits = 0        # caption slots found in the cache
        self.misses = 0      # distinct captions encoded
        self.nbytes = 0      # bytes of features held

    def __len__(self) -> int:
        return len(self._features)

    def summary(self) -> str:
        slots = self.hits + self.misses
        return (f"{len(self)} captions, {self.nbytes / 2 ** 20:.1f} MiB, "
                f"{self.hits / max(slots, 1):.1%} of {slots} caption slots served from the cache")

    def _fill(self, ids: np.ndarray, lengths: np.ndarray) -> list[bytes]:
        """Keys of ``ids [M, L]`` (``lengths [M]`` valid tokens each); encodes the missing ones."""
        m, length = ids.shape
        keys = [ids[i, :lengths[i]].tobytes() for i in range(m)]
        missing: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if lengths[i] == 0:
                continue
            if key in self._features or key in missing:
                self.hits += 1
            else:
                missing[key] = i
        if missing:  # at most M of them: one call of the step's own shape [M, L]
            self.misses += len(missing)
            rows = list(missing.values())
            call_ids = np.zeros((m, length), np.int32)
            call_mask = np.zeros((m, length), bool)
            call_ids[:len(rows)] = ids[rows]
            for j, i in enumerate(rows):
                call_mask[j, :lengths[i]] = True
            out = self._encode_rows(call_ids, call_mask)
            for j, i in enumerate(rows):
                f = np.stack([np.asarray(o[j, :lengths[i]], np.float32) for o in out], axis=1)
                if f.shape[1:] != self._shape:
                    raise ValueError(f"the text encoder gives {f.shape[1]} layers of width "
                                     f"{f.shape[2]}, expected {self._shape} (config.model."
                                     "selected_layer_index, enc_hidden_dim)")
                self._features[keys[i]] = f   # [n, S, E]
                self.nbytes += f.nbytes
        return keys

    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(batch["caption_ids"])                       # [B, K, L]
        mask = np.asarray(batch["caption_mask"]).astype(bool)        # [B, K, L], right-padded
        text_index = np.asarray(batch["text_index"])                 # [B, Nt, 2]: (slot, token)
        text_segment_ids = np.asarray(batch["text_segment_ids"])     # [B, Nt], 0 = padding
        b, k, length = ids.shape
        lengths = mask.sum(-1).reshape(-1)
        if not is_right_padded(mask):
            raise ValueError("caption_mask is not right-padded: the text feature cache assumes "
                             "each caption's tokens come first (positions 0..n-1)")
        keys = self._fill(ids.reshape(b * k, length), lengths)
        out = np.zeros(text_segment_ids.shape + self._shape, np.float32)   # [B, Nt, S, E]
        for r in range(b):
            tokens = np.nonzero(text_segment_ids[r] > 0)[0]
            if tokens.size == 0:
                continue
            slots = text_index[r, tokens, 0]
            positions = text_index[r, tokens, 1] + self._preamble
            for slot in np.unique(slots):
                here = slots == slot
                n = int(lengths[r * k + slot])
                if positions[here].max() >= n:
                    raise ValueError(
                        f"batch row {r}: text tokens of caption slot {slot} reach position "
                        f"{int(positions[here].max())} but the caption has {n} valid tokens "
                        f"(caption_mask); the packed batch is inconsistent")
                out[r, tokens[here]] = self._features[keys[r * k + slot]][positions[here]]
        return dict(batch, text_features=out)
