"""Prompts of the decoder-only generative retriever: a causal LM writes a corpus title after a prompt.

A prompt template holds ``{question}`` once and ends with fixed text (default ``"Question: {question}\\nTitle:"``);
pre-training pairs put their source passage in place of the question. The title follows the prompt after
one space and ends with EOS: ``prompt + " " + title + eos``.

Titles are tokenised as they appear AFTER the prompt, not in isolation: the title trie holds, for each
title, encode(suffix + " " + title) minus encode(suffix), where ``suffix`` is the template's fixed end
(``index/trie`` ``encode_continuations``, kept in the trie's manifest as ``title_context``), and its start
token is the suffix's LAST token. Every prompt ends with that token, so the trie constraint reads the
generated ids from the prompt's last position on (``generated_ids[prompt_len - 1:]``) with no other change.
``check_continuations`` verifies the decomposition on real prompts (``tokenize(prompt + " " + title) ==
tokenize(prompt) + title_tokens``) and lists the titles where it does not hold.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from core.errors import InputError

SLOT = "{question}"
DEFAULT_PROMPT = "Question: {question}\nTitle:"
# Questions the title decomposition is checked with (besides the template's own suffix).
CHECK_QUESTIONS = ("Who painted the Mona Lisa?", "capital of France", "In which year did the war end")


def check_template(template: str) -> str:
    """The template, or a one-line InputError: it needs ``{question}`` once and fixed text after it."""
    if not isinstance(template, str) or SLOT not in template:
        raise InputError(f"the prompt template {template!r} has no {SLOT} slot (e.g. {DEFAULT_PROMPT!r})")
    if template.count(SLOT) > 1:
        raise InputError(f"the prompt template {template!r} holds {SLOT} more than once")
    suffix = template.split(SLOT, 1)[1]
    if not suffix.strip():
        raise InputError(f"the prompt template {template!r} must end with fixed text after {SLOT} "
                         "(the title trie starts at its last token), e.g. '\\nTitle:'")
    if suffix != suffix.rstrip():
        raise InputError(f"the prompt template {template!r} ends with whitespace; titles follow it after one space")
    return template


def template_suffix(template: str) -> str:
    """The fixed text after ``{question}``: the context the titles are tokenised after."""
    return check_template(template).split(SLOT, 1)[1]


def fill(template: str, question: str) -> str:
    return template.replace(SLOT, question)


def special_head(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (Gemma/Llama: BOS; BERT: [CLS]; GPT-2: none)."""
    probe = "a b"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return [int(t) for t in full[:i]]
    return []


class PromptEncoder:
    """Token ids of prompts and of titles after them, for one tokenizer and template.

    ``ids(question)`` = the tokenizer's leading special tokens (BOS) + encode(prompt) without special tokens
    (no trailing [SEP]/EOS: the title follows). A question too long for ``max_length`` is cut (its tokens,
    decoded again) so the prompt's fixed end always stays; every prompt ends with ``start_token_id``.
    """

    def __init__(self, tokenizer: Any, template: str = DEFAULT_PROMPT) -> None:
        from index.trie import encode_titles

        self.tokenizer = tokenizer
        self.template = check_template(template)
        self.suffix = template_suffix(template)
        self.context_ids = encode_titles(tokenizer, [self.suffix])[0]
        if not self.context_ids:
            raise InputError(f"the prompt template's end {self.suffix!r} tokenises to no tokens")
        self.start_token_id = int(self.context_ids[-1])
        self.head = special_head(tokenizer)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        from index.trie import encode_titles
        return encode_titles(self.tokenizer, list(texts))

    def title_ids(self, titles: Sequence[str]) -> list[list[int]]:
        """The trie's tokens of each title after the prompt (without the start token and EOS)."""
        from index.trie import encode_titles
        return encode_titles(self.tokenizer, list(titles), context=self.suffix)

    def batch(self, questions: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        rows = self._encode([fill(self.template, q) for q in questions])
        out = []
        for q, ids in zip(questions, rows):
            if max_length is not None and len(self.head) + len(ids) > max_length:
                ids = self._cut(q, len(self.head) + len(ids) - max_length, max_length)
            ids = self.head + list(ids)
            if not ids or ids[-1] != self.start_token_id:
                raise InputError(f"the prompt for {q[:60]!r} does not end with the template's last token "
                                 f"{self.start_token_id} (the tokenizer merged it with the question)")
            out.append(ids)
        return out

    def ids(self, question: str, max_length: int | None = None) -> list[int]:
        return self.batch([question], max_length)[0]

    def _cut(self, question: str, over: int, max_length: int) -> list[int]:
        """The prompt with the question's tokens cut until it fits (decoded and encoded again)."""
        q = self._encode([question])[0]
        keep = len(q)
        while keep > 0:
            keep = max(0, keep - max(1, over))
            text = self.tokenizer.decode(q[:keep], skip_special_tokens=True) if keep else ""
            ids = self._encode([fill(self.template, text)])[0]
            over = len(self.head) + len(ids) - max_length
            if over <= 0:
                return ids
        raise InputError(f"max length {max_length} leaves no room for the prompt template {self.template!r}")


def check_continuations(tokenizer: Any, template: str, titles: Sequence[str], sample: int = 2000,
                        seed: int = 0) -> dict[str, Any]:
    """On a seeded sample of titles and a few real prompts: does tokenize(prompt + " " + title) equal
    tokenize(prompt) + the title's trie tokens? Returns ``{"checked", "prompts", "mismatched": [title ids]}``
    (ids into ``titles``; the titles are kept in the trie either way, never dropped)."""
    from index.trie import encode_titles

    enc = PromptEncoder(tokenizer, template)
    n = len(titles)
    ids = list(range(n)) if n <= sample else sorted(random.Random(seed).sample(range(n), sample))
    picked = [titles[i] for i in ids]
    title_tokens = enc.title_ids(picked)
    bad: set[int] = set()
    for question in CHECK_QUESTIONS:
        prompt = fill(template, question)
        p = encode_titles(tokenizer, [prompt])[0]
        joint = encode_titles(tokenizer, [prompt + " " + t for t in picked])
        for i, toks, full in zip(ids, title_tokens, joint):
            if list(full) != p + list(toks):
                bad.add(i)
    return {"checked": len(ids), "prompts": len(CHECK_QUESTIONS), "mismatched": sorted(bad)}
