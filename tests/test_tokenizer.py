"""CLIP's own BPE tokenizer (pipeline/tokenizer.py) against OpenAI's.

The oracle is OpenAI's ``clip/simple_tokenizer.py`` as the ``clip-anytorch`` wheel ships it
(installed with ``--no-deps`` by the README's test command). It is loaded from its file, never
through ``clip/__init__``, which would import torchvision.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import shutil

import numpy as np
import pytest

import pipeline.tokenizer as tokenizer_module
from heads.model import tokenize_prompts
from pipeline.clip import build_random_clip
from cache.core.labels import BUILTIN, RAER5
from pipeline.tokenizer import VOCAB_DIR, VOCAB_FILE, VocabFileError, clean_text, clip_tokenizer
from tests.conftest import REFERENCE_DIR, _package_dir


@pytest.fixture(scope="module")
def oracle_module():
    path = _package_dir("clip") / "simple_tokenizer.py"
    if not path.is_file():
        pytest.fail(f"{path} is missing: pip install --no-deps clip-anytorch==2.6.0 (the oracle)")
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def oracle(oracle_module):
    return oracle_module.SimpleTokenizer()


@pytest.fixture(scope="module")
def ours():
    return clip_tokenizer()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(clean_text(text), add_special_tokens=False)["input_ids"]


def test_vendored_file_is_openai_s_and_gives_its_vocabulary(oracle_module, oracle, ours):
    theirs = _package_dir("clip") / VOCAB_FILE
    assert (VOCAB_DIR / VOCAB_FILE).read_bytes() == theirs.read_bytes()
    vocab, merges = tokenizer_module.vocab_and_merges()
    assert vocab == oracle.encoder  # every token at the same id, 49408 of them
    assert {m: i for i, m in enumerate(merges)} == oracle.bpe_ranks
    assert ours.get_vocab() == oracle.encoder
    assert (ours.bos_token_id, ours.eos_token_id) == (49406, 49407)


HAND_PICKED = [
    "Hello, World!!", "wow!!! really?!", "(a) [b] {c} <d> \"e\" 'f'", "e-mail: a.b@c.de #tag $5 100%",
    "3.14159, 1,000,000 and 2nd, 3rd, 42nd", "0123456789", "it's I'm we're they've I'll he'd can't",
    "don’t stop ‘em” “quoted” — dash – dash …", "ﬁne ﬂow café naïve Ångström Øre",
    "１２３ ＡＢＣ ｆｕｌｌｗｉｄｔｈ", "&amp; &lt;b&gt; &amp;amp; &quot;x&quot; &#39;y&#39;",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷", "中文字符 日本語のテキスト 한국어 텍스트",
    "ΣΟΦΙΑ ΟΔΟΣ σοφια", "İstanbul ISTANBUL", "Привет, мир! Ёлка", "مرحبا بالعالم", "שלום עולם",
    "  lots   of\t\tspace\n\nand lines  ", "tab\tnew\nline\r\nwindows", "", "   ", "!!!???...;;;",
    "<|startoftext|> hi <|endoftext|>", "UPPER lower MiXeD", "a" * 100, "supercalifragilistic" * 5,
    "Mojibake: Ã©tÃ© and â€™", "control\x07chars\x1bhere", "ı ŉ ǰ ß ẞ Σσς",
    "Relaxed mouth,open eyes,neutral eyebrows " * 8,
]


@pytest.mark.parametrize("text", [
    *(d for labels in BUILTIN.values() for streams in ("both", "face")
      for d in labels.descriptors(streams)),
    *HAND_PICKED,
])
def test_ids_equal_openai_s_tokenizer(oracle, ours, text):
    assert encode(ours, text) == oracle.encode(text)


def test_ids_equal_openai_s_on_random_unicode(oracle, ours):
    # Letters, marks, digits, punctuation, emoji, CJK, fullwidth forms, control and space
    # characters, mixed with ASCII word material. U+0130 (capital I with dot) is left out: its
    # lower case is "i" + U+0307, and a combining mark after it is put back in canonical order
    # by the tokenizer's NFC step, which OpenAI's does not run after lower-casing (the one
    # known difference, in README's tokenizer section).
    blocks = [range(32, 127), range(0xA0, 0x130), range(0x131, 0x250), range(0x370, 0x400),
              range(0x400, 0x500), range(0x4E00, 0x4E80), range(0x1F600, 0x1F650),
              range(0x2000, 0x2070), range(0, 32), range(0x300, 0x370), range(0xFF00, 0xFF60)]
    rng = random.Random(1234)
    mismatches = []
    for _ in range(1500):
        text = "".join(chr(rng.choice(rng.choice(blocks))) if rng.random() < 0.5
                       else rng.choice(" abcdefghij'.,!0") for _ in range(rng.randint(1, 40)))
        if encode(ours, text) != oracle.encode(text):
            mismatches.append(text)
    assert mismatches == []


def test_random_clips_tokenize_the_original_s_prompts_exactly():
    reference = REFERENCE_DIR / "inputs_and_logits.npz"
    if not reference.is_file():
        pytest.skip(f"reference folder {REFERENCE_DIR} is absent (CI keeps it beside the clone)")
    tokenizer = build_random_clip("tiny").tokenizer
    ids = tokenize_prompts(tokenizer, RAER5.descriptors("both"), n_ctx=8, context_length=77)
    np.testing.assert_array_equal(ids.numpy(), np.load(reference)["tokenized_prompts"])


def test_a_changed_vocabulary_file_is_refused(tmp_path, monkeypatch):
    altered = tmp_path / "vocab"
    shutil.copytree(VOCAB_DIR, altered)
    data = bytearray((altered / VOCAB_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (altered / VOCAB_FILE).write_bytes(bytes(data))
    monkeypatch.setattr(tokenizer_module, "VOCAB_DIR", altered)
    tokenizer_module.vocab_and_merges.cache_clear()
    try:
        with pytest.raises(VocabFileError, match="does not match its SHA256SUMS"):
            clip_tokenizer()
        (altered / VOCAB_FILE).unlink()
        with pytest.raises(VocabFileError, match="is missing"):
            clip_tokenizer()
    finally:
        tokenizer_module.vocab_and_merges.cache_clear()
    assert hashlib.sha256((VOCAB_DIR / VOCAB_FILE).read_bytes()).hexdigest() in (
        VOCAB_DIR / "SHA256SUMS").read_text()
