"""Cloze questions from corpus sentences (`rag data cloze --corpus CORPUS --out QA.jsonl`).

From each document's sentences one span is masked: a 4-digit year, a number, or a capitalised
multi-word name that does not start the sentence and is not the document's title. The question is
`TITLE: sentence with ____`, the answer the span, the provenance the document (KILT format; meta
holds the span type, the sentence and the document's domain). Deterministic for a seed.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

BLANK = "____"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
YEAR_SPAN = re.compile(r"(?<![\w,.])(1[0-9]{3}|20[0-9]{2})(?![\w,]|\.\d)")
NUMBER_SPAN = re.compile(r"(?<![\w,.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?![\w,]|\.\d)")
_CAP = r"[A-Z][\w'\-]*[a-zA-Z]"
NAME_SPAN = re.compile(rf"(?<![\w])({_CAP}(?:\s+(?:(?:of|the|de|von|van|and|da|di|la|le|du)\s+)?{_CAP})+)(?![\w])")
MIN_WORDS = 6


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def candidate_spans(sentence: str, title: str = "") -> list[tuple[int, int, str, str]]:
    """(start, end, span, type) candidates; names not at the sentence start and not the title."""
    found: list[tuple[int, int, str, str]] = []
    for m in YEAR_SPAN.finditer(sentence):
        found.append((m.start(1), m.end(1), m.group(1), "year"))
    for m in NUMBER_SPAN.finditer(sentence):
        if not YEAR_SPAN.fullmatch(m.group(1)) and not any(s <= m.start(1) < e for s, e, _, _ in found):
            found.append((m.start(1), m.end(1), m.group(1), "number"))
    for m in NAME_SPAN.finditer(sentence):
        if m.start(1) == 0 or m.group(1).casefold() == title.casefold():
            continue
        found.append((m.start(1), m.end(1), m.group(1), "name"))
    return sorted(found)


def cloze_questions(documents: Iterable[dict[str, Any]], seed: int = 0, per_doc: int = 1,
                    max_questions: int = 0, types: tuple[str, ...] = ("year", "number", "name"),
                    domains: set[str] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """KILT rows and stats. `per_doc` sentences per document at most (each gets one blank)."""
    rows: list[dict[str, Any]] = []
    stats: Counter[str] = Counter()
    for doc in documents:
        doc_id, title, text = str(doc.get("id", doc.get("_id"))), str(doc.get("title", "")), str(doc.get("text", ""))
        domain = doc.get("domain")
        stats["documents"] += 1
        if domains is not None and domain not in domains:
            stats["other_domain"] += 1
            continue
        rng = random.Random(f"{seed}:{doc_id}")
        options = []
        for si, sent in enumerate(sentences(text)):
            if len(sent.split()) < MIN_WORDS:
                continue
            spans = [c for c in candidate_spans(sent, title) if c[3] in types]
            if spans:
                options.append((si, sent, spans))
        if not options:
            stats["no_candidate"] += 1
            continue
        for si, sent, spans in rng.sample(options, min(per_doc, len(options))):
            start, end, span, kind = rng.choice(spans)
            masked = sent[:start] + BLANK + sent[end:]
            rows.append({"id": f"cloze-{doc_id}-{si}", "input": f"{title}: {masked}",
                         "output": [{"answer": span, "provenance": [{"wikipedia_id": doc_id, "title": title}]}],
                         "meta": {"source": "cloze", "type": kind, "sentence": sent, "domain": domain}})
            stats[f"type_{kind}"] += 1
        if max_questions and len(rows) >= max_questions:
            rows = rows[:max_questions]
            break
    stats["questions"] = len(rows)
    return rows, dict(stats)


def salient_spans(text: str, title: str = "", max_spans: int = 0) -> list[tuple[int, int, str, str]]:
    """Non-overlapping (start, end, span, type) of the salient spans of a whole passage, in text order: the
    cloze candidates (years, numbers, capitalised multi-word names other than the title) of every sentence.
    `max_spans` > 0 keeps that many, spread evenly over the passage (deterministic). What the masked-span
    CIT proxy of decoder-only readers masks (readers/causal.py)."""
    found: list[tuple[int, int, str, str]] = []
    for start, end, span, kind in candidate_spans(text, title):
        if found and start < found[-1][1]:
            continue  # overlaps the previous span: keep the earlier one
        found.append((start, end, span, kind))
    if max_spans > 0 and len(found) > max_spans:
        step = len(found) / max_spans
        found = [found[int(i * step)] for i in range(max_spans)]
    return found
