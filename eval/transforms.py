"""Corpus transforms: derive a new corpus (and task data) from an existing one.

The one registry of transforms, row-level (`fn`: rows in, rows out) and file-level (`derive`: writes its
own parts). `rag data derive --from CORPUS --transform NAME [--qa QA.jsonl] --out DIR` writes `DIR/corpus.jsonl`
(plus `DIR/qa.jsonl` for transforms that rewrite task data), `DIR/stats.json` and `DIR/run.json`.
A transform is added by writing one function and registering it in `TRANSFORMS`.

Transforms:
- `counterfactual`: each question whose answer occurs verbatim in its evidence document (and is a
  year, a number or a capitalised name) gets a new answer drawn from the other answers of the same
  type; every occurrence of the old answer in the evidence document is replaced by the new one, and
  the question's gold answer is replaced likewise (the old one is kept in meta). A reader that still
  says the old answer has it from its weights, not from the passage: that is the memorisation rate.
"""
from __future__ import annotations

import copy
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from eval.corpus_variants import VARIANT_TRANSFORMS, streams_rows

Rows = list[dict[str, Any]]

YEAR = re.compile(r"^(1[0-9]{3}|20[0-9]{2})$")
NUMBER = re.compile(r"^\d{1,3}(,\d{3})+(\.\d+)?$|^\d+(\.\d+)?$")
NAME_CONNECTORS = {"of", "the", "de", "la", "le", "du", "von", "van", "der", "and", "y", "da", "di", "al", "el"}


def answer_type(answer: str) -> str | None:
    """'year', 'number', 'name' (every word capitalised, connectors such as 'of' allowed) or None."""
    a = answer.strip()
    if not a:
        return None
    if YEAR.match(a):
        return "year"
    if NUMBER.match(a):
        return "number"
    words = a.split()
    if "," not in a and len(words) <= 5 and words[0][:1].isupper() and all(w[:1].isupper() or w.lower() in NAME_CONNECTORS
                                                           for w in words) and any(c.isalpha() for c in a):
        return "name"
    return None


def _pattern(span: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w])" + re.escape(span) + r"(?![\w])")


def occurs(span: str, text: str) -> bool:
    return bool(_pattern(span).search(text))


def apply_substitutions(text: str, substitutions: list[tuple[str, str]]) -> str:
    """Replace each old span (whole words, longest first) by its new span."""
    for old, new in sorted(substitutions, key=lambda s: -len(s[0])):
        text = _pattern(old).sub(new.replace("\\", "\\\\"), text)
    return text


def _doc_fields(row: dict[str, Any]) -> tuple[str, str, str]:
    """(id, title, text) of a corpus row in the toolkit's format (or BEIR's `_id`)."""
    doc_id = str(row.get("id", row.get("_id", "")))
    return doc_id, str(row.get("title", "")), str(row.get("text", ""))


def _first_answer(row: dict[str, Any]) -> str | None:
    for out in row.get("output") or []:
        if isinstance(out, dict) and out.get("answer") is not None and str(out["answer"]).strip():
            return str(out["answer"]).strip()
    return None


def _evidence_ids(row: dict[str, Any]) -> list[str]:
    ids = []
    for out in row.get("output") or []:
        for prov in (out.get("provenance") or []) if isinstance(out, dict) else []:
            if prov.get("wikipedia_id") is not None and str(prov["wikipedia_id"]) not in ids:
                ids.append(str(prov["wikipedia_id"]))
    return ids


@streams_rows
def counterfactual_substitute(corpus_rows: Iterable[dict[str, Any]], qa_rows: Rows,
                              seed: int = 0) -> tuple[Rows | Iterator[dict[str, Any]], Rows, dict[str, Any]]:
    """Substitute the answers of `qa_rows` in their evidence documents by other answers of the same type.

    Returns (new corpus rows: all documents, changed ones rewritten; new QA rows: only the questions
    whose answer was substituted, gold answer = the new one, meta.counterfactual = {old_answer,
    new_answer, type, docs}; stats, with `substitutions`: one entry per (document, old, new)).
    Deterministic for a seed: the replacement of a question depends only on (seed, question id).

    Memory flat in the corpus: `corpus_rows` is read twice, keeping only the questions' evidence documents; a
    list in gives a list of new rows, any other re-iterable (`eval.corpus_variants.JsonlRows`, which streams a
    file) gives the new rows as a one-shot iterator, rewritten as they are read a third time.
    """
    needed = {doc_id for row in qa_rows for doc_id in _evidence_ids(row)}
    docs = {}
    for row in corpus_rows:
        doc_id, title, text = _doc_fields(row)
        if doc_id in needed:
            docs[doc_id] = (title, text)
    counts: Counter[str] = Counter()
    pools: dict[str, list[str]] = {}
    for row in qa_rows:
        ans = _first_answer(row)
        kind = answer_type(ans) if ans else None
        if kind and ans not in pools.setdefault(kind, []):
            pools[kind].append(ans)
    doc_subs: dict[str, dict[str, str]] = {}   # doc id -> old -> new
    sub_qas: dict[tuple[str, str], list[str]] = {}
    new_qa: Rows = []
    by_type: Counter[str] = Counter()
    for row in qa_rows:
        counts["questions"] += 1
        qid = str(row.get("id"))
        ans = _first_answer(row)
        if not ans:
            counts["no_answer"] += 1
            continue
        kind = answer_type(ans)
        if kind is None:
            counts["untyped_answer"] += 1
            continue
        evidence = [d for d in _evidence_ids(row) if d in docs and occurs(ans, docs[d][1])]
        if not evidence:
            counts["answer_not_in_evidence"] += 1
            continue
        if any(ans.casefold() == docs[d][0].casefold() for d in evidence):
            counts["answer_is_title"] += 1
            continue
        taken = [doc_subs.get(d, {}).get(ans) for d in evidence]
        new = next((t for t in taken if t), None)
        if new is None:
            rng = random.Random(f"{seed}:{qid}")
            candidates = [c for c in pools.get(kind, []) if c.casefold() != ans.casefold()
                          and not any(occurs(c, docs[d][1]) for d in evidence)
                          and not any(c in docs[d][1] or ans in c for d in evidence)]
            if not candidates and kind in ("year", "number"):
                candidates = [_shift_number(ans, rng)]
            if not candidates:
                counts["no_replacement"] += 1
                continue
            new = rng.choice(sorted(candidates))
        clash = False
        for d in evidence:
            existing = doc_subs.get(d, {})
            if any(o != ans and (o in ans or ans in o) for o in existing):
                clash = True
        if clash:
            counts["overlapping_answers"] += 1
            continue
        for d in evidence:
            doc_subs.setdefault(d, {})[ans] = new
            sub_qas.setdefault((d, ans), []).append(qid)
        out = copy.deepcopy(row)
        for o in out.get("output") or []:
            if isinstance(o, dict) and o.get("answer") is not None:
                o["answer"] = new
        meta = out.setdefault("meta", {}) if isinstance(out.get("meta", {}), dict) else {}
        meta["counterfactual"] = {"old_answer": ans, "new_answer": new, "type": kind, "docs": evidence}
        out["meta"] = meta
        new_qa.append(out)
        by_type[kind] += 1
    substitutions = []
    for row in corpus_rows:
        doc_id, _, text = _doc_fields(row)
        for old, new in doc_subs.get(doc_id, {}).items():
            substitutions.append({"doc_id": doc_id, "old": old, "new": new,
                                  "occurrences": len(_pattern(old).findall(text)), "qa_ids": sub_qas[(doc_id, old)]})
    stats = {"transform": "counterfactual", "seed": seed, **dict(counts), "substituted_questions": len(new_qa),
             "by_type": dict(by_type), "changed_documents": len(doc_subs), "substitutions": substitutions}
    new_corpus = (_substituted(row, doc_subs) for row in corpus_rows)
    return (list(new_corpus) if isinstance(corpus_rows, list) else new_corpus), new_qa, stats


def _substituted(row: dict[str, Any], doc_subs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The row itself, or a copy with its text rewritten when its document has substitutions."""
    doc_id, _, text = _doc_fields(row)
    subs = doc_subs.get(doc_id)
    if not subs:
        return row
    changed = dict(row)
    changed["text"] = apply_substitutions(text, list(subs.items()))
    return changed


def _shift_number(ans: str, rng: random.Random) -> str:
    """A different number of the same shape (a year stays a 4-digit year)."""
    value = float(ans.replace(",", ""))
    if YEAR.match(ans):
        return str(int(value) + rng.choice([-1, 1]) * rng.randint(3, 40))
    new = value * rng.choice([0.5, 0.7, 1.3, 2.0]) if value else rng.randint(2, 9)
    return f"{int(round(new)):,}" if "," in ans else str(int(round(new)) if "." not in ans else round(new, 2))


def substitution_map(stats: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """doc id -> [(old, new)] from counterfactual stats (to rewrite retrieved passages of those docs)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for s in stats.get("substitutions", []):
        out.setdefault(s["doc_id"], []).append((s["old"], s["new"]))
    return out


@dataclass(frozen=True)
class Transform:
    """Row-level (`fn`: rows in, rows out) or file-level (`derive`: writes its own parts, e.g. held-in/held-out)."""
    fn: Callable[..., tuple[Rows, Rows | None, dict[str, Any]]] | None
    help: str
    needs_qa: bool = False
    derive: Callable[..., dict[str, Any]] | None = None


TRANSFORMS: dict[str, Transform] = {
    "counterfactual": Transform(counterfactual_substitute,
                                "substitute QA answers in their evidence documents by other answers of the same type",
                                needs_qa=True),
}


# The file-level transforms (topic-holdout, new-domain, perturb, subsample) live in eval/corpus_variants.py.
TRANSFORMS.update({name: Transform(None, (fn.__doc__ or name).strip().splitlines()[0], derive=fn)
                   for name, fn in VARIANT_TRANSFORMS.items() if name not in TRANSFORMS})
