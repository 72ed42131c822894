"""An offline CLIP-compatible BPE tokenizer.

The real CLIP vocabulary cannot be downloaded here. This module writes a ``vocab.json`` / ``merges.txt``
pair in CLIP's format: the 512 byte-level base symbols, merges of lowercase letter pairs, and the two
special tokens at their real ids (49406, 49407). Every id is below the real vocabulary size, so the
embedding tables keep their real shape and prompts of the same length give sequences of the same length
(CLIP pads every prompt to 77 tokens anyway, so latency does not depend on the merges).
"""

from __future__ import annotations

import functools
import json
import os
import string
import tempfile
from pathlib import Path

from diffperf.fileio import atomic_write_text
from diffperf.presets import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> tuple[str, ...]:
    # The byte -> printable-unicode table of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return tuple(chr(c) for c in cs)


def vocabulary() -> tuple[dict[str, int], list[str]]:
    """Return ``(vocab, merges)`` of the generated tokenizer."""
    base = list(_bytes_to_unicode())
    tokens = base + [b + "</w>" for b in base]
    merges: list[str] = []
    letters = string.ascii_lowercase
    for a in letters:
        for b in letters:
            merges.append(f"{a} {b}</w>")
            tokens.append(f"{a}{b}</w>")
    for a in letters:
        for b in letters:
            merges.append(f"{a} {b}")
            tokens.append(f"{a}{b}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) < CLIP_BOS_ID
    vocab["<|startoftext|>"] = CLIP_BOS_ID
    vocab["<|endoftext|>"] = CLIP_EOS_ID
    return vocab, merges


def write_tokenizer_files(directory: str | os.PathLike[str]) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``directory`` (atomically) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocabulary()
    for name, text in (
        ("vocab.json", json.dumps(vocab, ensure_ascii=False)),
        ("merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n"),
    ):
        atomic_write_text(directory / name, text)
    return directory


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """Build a ``transformers.CLIPTokenizer`` (slow, pure Python) from the generated files.

    SD 1.5 and SDXL's first tokenizer pad with ``<|endoftext|>``; SDXL's second pads with ``!``.
    The files are written to a temporary folder that is removed once the tokenizer has read them.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="diffperf-tokenizer-") as tmp:
        d = write_tokenizer_files(tmp)
        return CLIPTokenizer(
            vocab_file=str(d / "vocab.json"),
            merges_file=str(d / "merges.txt"),
            pad_token=pad_token,
            model_max_length=77,
        )


@functools.lru_cache(maxsize=None)
def _shared_tokenizer():
    return clip_tokenizer()


def tokenize(prompts: list[str], max_length: int = 77) -> list[list[int]]:
    """Tokenize prompts to padded id lists without any framework (used by the TF stack in each call).

    The tokenizer is built once per process, as KerasCV builds its own once per model: a timed call pays
    for tokenizing its prompt, not for reading the vocabulary again.
    """
    tok = _shared_tokenizer()
    out = tok(prompts, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    assert all(0 <= i < CLIP_VOCAB_SIZE for ids in out for i in ids)
    return out
