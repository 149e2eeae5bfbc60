"""Lens prompt template, PromptTokenizer and encode_prompts (spec 2.1).

The real o200k_harmony ``tokenizer.json`` cannot be fetched here, so the tests build a stand-in
that tokenizes the Lens template exactly as o200k does:

* pre-tokenization is o200k's own split regex (the pattern of tiktoken's ``o200k_base``), so the
  template is cut into the same pre-tokens as by the real tokenizer (BPE never merges across
  pre-tokens, so real tokens are these pieces or finer);
* the model is a WordPiece vocabulary holding every pre-token of the template as one token, except
  ``Reasoning``, which o200k splits into ``Reason`` + ``ing``; the ids of the system-message tokens
  are the real o200k ids, as printed in public gpt-oss token dumps (llama.cpp / mlx-lm logs of the
  harmony system message); the harmony special tokens sit at their stock ids 199998..200012 and
  the vocabulary is padded so every id below them exists.

What this proves: with o200k's pre-tokenization and the per-piece tokenization seen in real
gpt-oss token dumps, our rendered template reproduces the real token ids of the harmony system
message and developer header, and ``preamble_length`` (computed from the rendered template, not a
constant) is 97 for a ``YYYY-MM-DD`` date, the constant the reference hard-codes (upstream's 97
implies that every other pre-token of the developer instructions is one o200k token, which the
stand-in assumes). It cannot prove the real BPE merges of words absent from those dumps.
"""

from __future__ import annotations

import logging
import re

import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax import text
from lens_jax.models.text_encoder import GptOssConfig, TextEncoder
from lens_jax.text import PromptTokenizer, drop_preamble, encode_negative_prompts, encode_prompts

O200K_SPLIT = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
])
SPECIAL_IDS = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
               "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007,
               "<|message|>": 200008, "<|call|>": 200012}
# Real o200k ids of pieces of the harmony system message (public gpt-oss token dumps).
KNOWN_IDS = {
    "system": 17360, "You": 3575, " are": 553, " Chat": 17554, "GPT": 162016, ",": 11, " a": 261,
    " large": 4410, " language": 6439, " model": 2359, " trained": 22203, " by": 656, " Open": 7788,
    "AI": 17527, ".\n": 558, "Knowledge": 87447, " cutoff": 100594, ":": 25, " ": 220, "202": 1323,
    "4": 19, "5": 20, "-": 12, "06": 3218, "12": 899, "\n": 198, "Current": 6576, " date": 3521,
    "\n\n": 279, "Reason": 30377, "##ing": 289, " medium": 4465, "#": 2, " Valid": 13888,
    " channels": 18403, " analysis": 8450, " commentary": 49159, " final": 1721, ".": 13,
    " Channel": 21030, " must": 2804, " be": 413, " included": 7360, " for": 395, " every": 1753,
    " message": 3176, "user": 1428, "developer": 77944, " Instructions": 68406, ".\n\n": 364,
    "assistant": 173781,
}
DATE = "2025-06-12"
# The system message + developer header for DATE, token by token, as the real tokenizer gives it.
REAL_PREFIX_IDS = [
    200006, 17360, 200008, 3575, 553, 17554, 162016, 11, 261, 4410, 6439, 2359, 22203, 656, 7788,
    17527, 558, 87447, 100594, 25, 220, 1323, 19, 12, 3218, 198, 6576, 3521, 25, 220, 1323, 20, 12,
    3218, 12, 899, 279, 30377, 289, 25, 4465, 279, 2, 13888, 18403, 25, 8450, 11, 49159, 11, 1721, 13,
    21030, 2804, 413, 7360, 395, 1753, 3176, 13, 200007, 200006, 77944, 200008, 2, 68406, 279]
SPEC_TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\nKnowledge "
    "cutoff: 2024-06\\nCurrent date: {DATE}\\n\\nReasoning: medium\\n\\n# Valid channels: analysis, "
    "commentary, final. Channel must be included for every message.<|end|><|start|>developer<|message|>"
    "# Instructions\\n\\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background.\\n\\n<|end|><|start|>user<|message|>{PROMPT}"
    "<|end|><|start|>assistant<|channel|>analysis<|message|>Need to generate one image according to the "
    "description.<|end|><|start|>assistant<|channel|>final<|message|>")  # spec 2.1, `\n` as written there
PROMPTS = ["A red cube on a wooden table", "Two cats"]


def _pieces(pre_tokenizer, strings):
    pieces = []
    for s in strings:
        for part in re.split(r"(<\|[a-z]+\|>)", s):
            if part and not re.fullmatch(r"<\|[a-z]+\|>", part):
                pieces += [p for p, _ in pre_tokenizer.pre_tokenize_str(part)]
    return pieces


def build_tokenizer(with_specials: bool = True):
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    pre = pre_tokenizers.Split(Regex(O200K_SPLIT), behavior="isolated")
    corpus = [text.render_prompt(p, DATE) for p in PROMPTS + ["word " * 600]]
    vocab = dict(KNOWN_IDS)
    next_id = 150000
    for piece in _pieces(pre, corpus) + ["[UNK]"]:
        if piece not in vocab and piece != "Reasoning":
            vocab[piece], next_id = next_id, next_id + 1
    used = set(vocab.values())
    vocab.update({f"<|filler_{i}|>": i for i in range(199998) if i not in used})
    special = {t: i for t, i in SPECIAL_IDS.items()}
    special.update({f"<|reserved_{i}|>": i for i in range(199998, 200013) if i not in SPECIAL_IDS.values()})
    if with_specials:
        vocab.update(special)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.pre_tokenizer = pre
    if with_specials:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, _ in sorted(special.items(), key=lambda kv: kv[1])])
    return tok


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lens")
    (root / "tokenizer").mkdir()
    build_tokenizer().save(str(root / "tokenizer" / "tokenizer.json"))
    return root


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return PromptTokenizer.from_pretrained(tokenizer_dir)


def test_render_matches_spec_verbatim():
    expected = SPEC_TEMPLATE.replace("\\n", "\n").replace("{DATE}", DATE).replace("{PROMPT}", "a cat")
    assert text.render_prompt("a cat", DATE) == expected
    assert text.render_preamble(DATE) == expected[:expected.index("a cat")]
    assert text.render_prompt("x").count(text.today()) == 1  # default date: today


def test_stand_in_tokenizer_has_stock_special_ids(tok):
    for token, token_id in SPECIAL_IDS.items():
        assert tok.tokenizer.token_to_id(token) == token_id
    assert tok.pad_id == 199999


def test_preamble_is_97_and_real_ids(tok):
    assert tok.preamble_length(DATE) == 97
    assert tok.preamble_length("2026-01-31") == 97
    ids, _ = tok([PROMPTS[0]], date=DATE)
    assert ids[0, :len(REAL_PREFIX_IDS)].tolist() == REAL_PREFIX_IDS
    assert ids[0, 94:97].tolist() == [200006, 1428, 200008]  # <|start|>user<|message|>
    # Computed from the rendered text, not a constant: another date format changes the count.
    assert tok.preamble_length("Thursday, June 12, 2025") == 99


def test_call_pads_right_with_endoftext(tok):
    ids, mask = tok(PROMPTS, date=DATE)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    lengths = mask.sum(axis=1)
    assert lengths[0] > lengths[1] and lengths[0] == ids.shape[1]
    assert (ids[1, lengths[1]:] == 199999).all() and mask[1, :lengths[1]].all()
    assert not mask[1, lengths[1]:].any()
    single, _ = tok(PROMPTS[1], date=DATE)
    np.testing.assert_array_equal(single[0], ids[1, :lengths[1]])
    # The scaffold after the prompt: ...<|start|>assistant<|channel|>final<|message|>
    assert ids[1, lengths[1] - 5:lengths[1]].tolist() == [200006, 173781, 200005,
                                                          tok.tokenizer.token_to_id("final"), 200008]


def test_overflow_is_truncated_with_warning(tok, caplog):
    long_prompt = "word " * 600
    full = len(tok.tokenizer.encode(text.render_prompt(long_prompt, DATE)).ids)
    with caplog.at_level(logging.WARNING, logger="lens_jax.text"):
        ids, mask = tok([long_prompt, "Two cats"], date=DATE)
    assert ids.shape == (2, 512) and mask[0].all()
    assert f"{full - 512} tokens cut" in caplog.text and "prompt 0" in caplog.text
    assert "prompt 1" not in caplog.text


def test_tokenizer_without_special_tokens_is_refused(tmp_path):
    build_tokenizer(with_specials=False).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"lacks the GPT-OSS harmony special tokens.*<\|start\|>"):
        PromptTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        PromptTokenizer.from_pretrained(tmp_path / "nowhere")


def tiny_encoder():
    config = GptOssConfig(vocab_size=200064, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=32, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=16)
    return TextEncoder.random(config, layers=(0, 1), mxfp4=True)


def test_encode_prompts_drops_preamble(tok):
    encoder = tiny_encoder()
    features, mask = encode_prompts(encoder, tok, PROMPTS, date=DATE)
    ids, full_mask = tok(PROMPTS, date=DATE)
    full = encoder(ids, full_mask)
    assert len(features) == 2 and mask.dtype == jnp.bool_
    assert features[0].shape == (2, ids.shape[1] - 97, 32) and mask.shape == (2, ids.shape[1] - 97)
    np.testing.assert_array_equal(np.asarray(mask), full_mask[:, 97:])
    np.testing.assert_array_equal(np.asarray(features[1]), np.asarray(full[1])[:, 97:])
    # The kept part starts with the prompt tokens.
    assert ids[0, 97] == tok.tokenizer.token_to_id("A")
    # Sequences no longer than the preamble give zero-length features.
    short, short_mask = encode_prompts(encoder, tok, PROMPTS, date=DATE, max_length=60)
    assert short[0].shape == (2, 0, 32) and short_mask.shape == (2, 0)


def test_empty_negative_prompt_skips_encoder(tok):
    class NoCall:
        def __call__(self, *args):
            raise AssertionError("the encoder must not run for empty negative prompts")

    features = [jnp.ones((2, 5, 32)), jnp.ones((2, 5, 32))]
    mask = jnp.ones((2, 5), bool)
    neg, neg_mask = encode_negative_prompts(NoCall(), tok, ["", "  "], like=(features, mask))
    assert [f.shape for f in neg] == [(2, 5, 32)] * 2 and not np.asarray(neg[0]).any()
    assert neg_mask.shape == (2, 5) and not np.asarray(neg_mask).any()
    neg, neg_mask = encode_negative_prompts(tiny_encoder(), tok, "blurry", like=(features, mask),
                                            date=DATE)
    assert neg[0].shape[0] == 2 and np.asarray(neg_mask).any()


def test_drop_preamble_on_single_array():
    f, m = drop_preamble(np.zeros((1, 100, 3)), np.ones((1, 100), bool), 97)
    assert f.shape == (1, 3, 3) and m.shape == (1, 3)
