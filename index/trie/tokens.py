"""Tokenising titles: the token ids of title strings (the tokenizer wrapper, or its Rust backend when it
agrees), the tokenizer's fingerprint recorded in the manifest, and the list-of-lists -> flat-array
helpers the builders share."""
from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.errors import InputError

# Strings whose encodings fingerprint a tokenizer (vocab, normalisation: case, accents, punctuation, digits).
_FINGERPRINT_SAMPLES = (
    "Paris Hilton",
    "Zürich",
    "C++ (programming language)",
    "2001: A Space Odyssey",
    "Ærøskøbing — Ōsaka, naïve café",
    " |",
    "The QUICK brown fox's 3.14 jumps!",
)


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """What the manifest records about a tokenizer."""
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "class": type(tokenizer).__name__,
        "vocab_size": int(len(tokenizer)),
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha1 of the vocab size and the encodings of a few fixed strings (no special tokens)."""
    enc = encode_titles(tokenizer, list(_FINGERPRINT_SAMPLES))
    payload = json.dumps({"vocab_size": int(len(tokenizer)), "samples": enc}, sort_keys=True)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def encode_titles(tokenizer: Any, texts: Sequence[str], context: str | None = None) -> list[list[int]]:
    """Token ids of each text, without special tokens; with ``context``, the ids of the text as it continues
    that context after one space (``encode_continuations``: decoder-only models generate titles after a prompt)."""
    if not texts:
        return []
    if context is not None:
        return encode_continuations(tokenizer, context, texts)[0]
    out = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    return [list(x) for x in out]


CONTINUATION_SPACE = " "  # between the context (a prompt's fixed end) and the title it continues


def encode_continuations(tokenizer: Any, context: str, texts: Sequence[str],
                         encode: Any = None) -> tuple[list[list[int]], list[int]]:
    """(ids, mismatched): the ids of ``" " + text`` as they follow ``context``, i.e.
    encode(context + " " + text) minus encode(context), no special tokens.

    ``mismatched`` lists the indices of texts for which encode(context) is not a prefix of the joint encoding
    (the tokenizer merged tokens across the boundary); those texts get encode(" " + text) instead, a valid
    but not canonical path. ``encode`` (texts -> ids lists) defaults to the tokenizer without special tokens.
    """
    enc = encode or (lambda xs: encode_titles(tokenizer, xs))
    ctx = list(enc([context])[0]) if context else []
    joint = enc([context + CONTINUATION_SPACE + t for t in texts])
    out: list[list[int]] = []
    mismatched: list[int] = []
    for i, ids in enumerate(joint):
        ids = list(ids)
        if ids[:len(ctx)] == ctx:
            out.append(ids[len(ctx):])
        else:
            mismatched.append(i)
            out.append([])
    if mismatched:
        alone = enc([CONTINUATION_SPACE + texts[i] for i in mismatched])
        for i, ids in zip(mismatched, alone):
            out[i] = list(ids)
    return out, mismatched


def _fast_encoder(tokenizer: Any, probe: Sequence[str]):
    """The Rust backend's batch encoder when it gives the same ids as the Python wrapper, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:  # a private copy without the padding/truncation the wrapper may have left configured
        from tokenizers import Tokenizer
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
    except Exception:  # noqa: BLE001
        return None
    fn = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if fn is None:
        return None

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in fn(list(texts), add_special_tokens=False)]

    try:
        sample = list(probe[:64]) + list(_FINGERPRINT_SAMPLES)
        if encode(sample) != encode_titles(tokenizer, sample):
            return None
    except Exception:  # noqa: BLE001 - any backend quirk: fall back to the wrapper
        return None
    return encode


def _lists_to_arrays(chunk: list[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, chunk), dtype=np.int64, count=len(chunk))
    flat = np.fromiter(itertools.chain.from_iterable(chunk), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _check_tokens(flat: np.ndarray) -> None:
    if flat.size and (flat.min() < 0 or flat.max() >= 2**31 - 1):
        raise InputError(f"token ids must be in [0, 2**31-1), got range [{flat.min()}, {flat.max()}]")
