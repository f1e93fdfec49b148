"""CLIP's own BPE tokenizer, built offline from OpenAI's vocabulary file (pipeline/vocab/).

``clip_tokenizer()`` is a transformers ``CLIPTokenizer`` whose vocabulary and merges are
derived from ``bpe_simple_vocab_16e6.txt.gz`` exactly as OpenAI's ``simple_tokenizer.py``
defines them: the 256 byte symbols, the same 256 with the end-of-word mark ``</w>``, one entry
per merge (the file's lines 1..48894), then ``<|startoftext|>`` and ``<|endoftext|>``.

``clean_text()`` is OpenAI's text cleaning (ftfy, HTML unescaping, whitespace collapsing),
which transformers' tokenizer leaves out: prompts pass through it before any CLIP tokenizer,
so curly quotes, ligatures or ``&amp;`` give the ids OpenAI's tokenizer gives.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
from pathlib import Path

from cache.core.errors import CaerError

VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT, END_OF_TEXT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# OpenAI's tokenizer reads the merges on lines 1 .. 49152 - 256 - 2 of the file (line 0 is a
# version header); with 512 byte symbols and 2 special tokens the vocabulary has 49408 entries.
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + N_MERGES + 2


class VocabFileError(CaerError):
    """The vendored BPE file is missing or altered."""


def byte_symbols() -> list[str]:
    """The printable character standing for each byte, in the order the vocabulary lists them.

    Bytes that are printable Latin-1 (other than space and soft hyphen) stand for themselves
    and come first; the other 68 bytes map to U+0100 upwards, in byte order.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(kept)]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(others))]


def _vocab_bytes() -> bytes:
    path = VOCAB_DIR / VOCAB_FILE
    fix = ("restore pipeline/vocab/ from the repository or reinstall caer-kit (pip install -e .); "
           "see pipeline/vocab/README.md for its origin")
    sums = VOCAB_DIR / "SHA256SUMS"
    if not path.is_file() or not sums.is_file():
        raise VocabFileError(f"{path if not path.is_file() else sums} is missing: {fix}")
    expected = {name.lstrip("*"): digest for digest, name in
                (line.split() for line in sums.read_text().splitlines() if line.strip())}
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected.get(VOCAB_FILE):
        raise VocabFileError(f"CLIP vocabulary file {path} does not match its SHA256SUMS "
                             f"(corrupt or replaced): {fix}")
    return data


@functools.lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """``(token -> id, merges in rank order)``, derived as OpenAI's tokenizer derives them."""
    try:
        lines = gzip.decompress(_vocab_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise VocabFileError(f"{VOCAB_DIR / VOCAB_FILE}: unreadable ({err})") from None
    merges = tuple(tuple(line.split()) for line in lines[1:N_MERGES + 1])
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise VocabFileError(f"{VOCAB_DIR / VOCAB_FILE}: expected {N_MERGES} merges of two symbols")
    symbols = byte_symbols()
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(m) for m in merges),
              START_OF_TEXT, END_OF_TEXT]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise VocabFileError(f"{VOCAB_DIR / VOCAB_FILE}: {len(vocab)} distinct tokens, expected "
                             f"{VOCAB_SIZE}")
    return vocab, merges


def clip_tokenizer(context_length: int = 77):
    """A transformers CLIPTokenizer with OpenAI's CLIP vocabulary; no download."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=context_length)


def clean_text(text: str) -> str:
    """OpenAI's cleaning before BPE: ftfy's fixes, HTML entities unescaped twice, whitespace
    runs collapsed to one space, ends stripped, then Python's lower-casing (the tokenizer's own
    lower-casing misses Unicode's context rules: a word-final capital sigma becomes a final
    small sigma in OpenAI's tokenizer). U+0345 becomes a space: OpenAI's case-insensitive split
    matches it nowhere (it case-folds to a letter but is none), so it drops it and splits the
    word there."""
    import ftfy
    import regex  # not re: its \s is Unicode's White_Space, as in OpenAI's cleaning

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower().replace("\u0345", " ")
