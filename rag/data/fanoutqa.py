"""fanoutqa: FanOutQA's single-hop sub-questions, grounded in a prepared corpus, as KILT task data.

Source: `fanoutqa/data/fanout-final-dev.json` in the PyPI package `fanoutqa` (310 multi-hop
questions). Each has a nested `decomposition`; every sub-question with `evidence` (a Wikipedia
page) is a single-hop question. Those whose evidence page is a document of the corpus (title
matched exactly, else after normalising: underscores -> spaces, Unicode NFC, case-folded) become
KILT examples:

    {"id": sub-question id, "input": question,
     "output": [{"answer": str, "provenance": [{"wikipedia_id": corpus doc id, "title": corpus title}]}],
     "meta": {"top_level_id", "pageid", "fanoutqa_answer": raw answer, ...}}

Answers become strings the way FanOutQA's own scorer reads them: lists joined with ", ", dicts as
"k: v, ...", booleans as "yes"/"no", numbers with str(). Sub-questions with an empty answer are
dropped (counted).

The train/dev split is by top-level question, never by sub-question: a top-level id hashes
(sha1 with the seed) to a bucket in [0, 1) and goes to dev below `dev_fraction`. A few
sub-questions (e.g. "What is the capital of China?") appear, with the same id, under several
top-level questions: those top-level questions are split as one group, so the same sub-question
never lands in both files, and it is written once (meta lists the other top-level ids).
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import InputError, RagError
from core.io import iter_jsonl, write_jsonl
from rag.data.preparers import CORPUS_FILE, package_source, progress, write_stats

DISTRIBUTION = "fanoutqa"
DATA_FILE = "fanoutqa/data/fanout-final-dev.json"


def normalize_title(title: str) -> str:
    return " ".join(unicodedata.normalize("NFC", title.replace("_", " ")).split()).casefold()


def answer_to_string(answer: Any) -> str:
    """FanOutQA answer (str, number, bool, list, dict) -> one string."""
    if isinstance(answer, bool):
        return "yes" if answer else "no"
    if answer is None:
        return ""
    if isinstance(answer, list):
        return ", ".join(answer_to_string(a) for a in answer)
    if isinstance(answer, dict):
        return ", ".join(f"{k}: {answer_to_string(v)}" for k, v in answer.items())
    return str(answer).strip()


def iter_single_hop(question: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Depth-first, in file order: every sub-question (at any depth) that has evidence."""
    for sub in question.get("decomposition") or []:
        if sub.get("evidence"):
            yield sub
        yield from iter_single_hop(sub)


def split_bucket(key: str, seed: int) -> float:
    """A deterministic number in [0, 1) for a top-level question (or group of them)."""
    digest = hashlib.sha1(f"fanoutqa:{seed}:{key}".encode()).hexdigest()
    return int(digest[:15], 16) / 16 ** 15


class TitleIndex:
    """Corpus title -> (doc id, title): exact first, then normalised (ambiguous keys are refused)."""

    def __init__(self, corpus_path: Path) -> None:
        self.exact: dict[str, tuple[str, str]] = {}
        normalized: dict[str, set[tuple[str, str]]] = {}
        self.docs = 0
        for line, row in iter_jsonl(corpus_path):
            doc_id, title = row.get("id"), row.get("title")
            if not isinstance(doc_id, str) or not isinstance(title, str):
                raise InputError("expected string id and title", corpus_path, line)
            self.docs += 1
            self.exact.setdefault(title, (doc_id, title))
            normalized.setdefault(normalize_title(title), set()).add((doc_id, title))
        self.normalized = {k: next(iter(v)) for k, v in normalized.items() if len(v) == 1}
        self.ambiguous = {k for k, v in normalized.items() if len(v) > 1}

    def match(self, title: str) -> tuple[tuple[str, str] | None, str]:
        if title in self.exact:
            return self.exact[title], "exact"
        key = normalize_title(title)
        if key in self.normalized:
            return self.normalized[key], "normalized"
        return None, "ambiguous" if key in self.ambiguous else "none"


def _groups(questions: list[dict[str, Any]]) -> dict[str, str]:
    """Top-level id -> group key (smallest id of the top-level questions sharing a sub-question id)."""
    parent = {q["id"]: q["id"] for q in questions}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner: dict[str, str] = {}
    for q in questions:
        for sub in iter_single_hop(q):
            first = owner.setdefault(sub["id"], q["id"])
            a, b = find(first), find(q["id"])
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {qid: find(qid) for qid in parent}


def load_questions(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON ({exc.msg})", path, exc.lineno) from None
    if not isinstance(data, list) or not all(isinstance(q, dict) and "id" in q for q in data):
        raise InputError("expected a list of questions with ids", path)
    return data


def prepare_fanoutqa(out_dir: Path, corpus_dir: str | Path | None = None, dev_fraction: float = 0.3,
                     seed: int = 0, source: str | Path | None = None) -> dict[str, Any]:
    """Write out_dir/{train,dev}.jsonl (KILT) and out_dir/stats.json for the corpus in corpus_dir."""
    out_dir = Path(out_dir)
    if corpus_dir is None:
        raise RagError("fanoutqa needs corpus_dir: a folder (or file) with the corpus.jsonl the "
                       "questions are grounded in, e.g. one prepared with the vital10k preparer")
    corpus_path = Path(corpus_dir)
    if corpus_path.is_dir():
        corpus_path = corpus_path / CORPUS_FILE
    if not corpus_path.is_file():
        raise RagError(f"no corpus at {corpus_path}; prepare a corpus first (e.g. vital10k)")
    if corpus_path.parent.resolve() == out_dir.resolve():
        raise RagError("out_dir must differ from the corpus folder (both write stats.json)")
    if not 0.0 <= float(dev_fraction) <= 1.0:
        raise RagError(f"dev_fraction must be in [0, 1], got {dev_fraction}")
    if source is None:
        path, source_info = package_source(DISTRIBUTION, DATA_FILE)
    else:
        path, source_info = Path(source), {"file": str(source)}

    questions = load_questions(path)
    titles = TitleIndex(corpus_path)
    group_of = _groups(questions)
    is_dev = {qid: split_bucket(key, seed) < dev_fraction for qid, key in group_of.items()}

    counts = {"single_hop_with_evidence": 0, "duplicate_subquestions": 0, "duplicate_matched": 0,
              "empty_answer": 0,
              "matched_exact": 0, "matched_normalized": 0, "unmatched": 0, "unmatched_ambiguous": 0}
    examples: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "dev": []}
    evidence_of: dict[str, dict[str, Any]] = {}  # top-level id -> {"docs": matched pages, "missing": n}
    for q in progress(questions, desc="fanoutqa"):
        for sub in iter_single_hop(q):
            counts["single_hop_with_evidence"] += 1
            pages = evidence_of.setdefault(q["id"], {"docs": {}, "missing": 0})
            matched, _ = titles.match(str(sub["evidence"].get("title", "")))
            if matched is None:
                pages["missing"] += 1
            else:
                pages["docs"][matched[0]] = matched[1]
            if sub["id"] in seen:
                counts["duplicate_subquestions"] += 1
                if sub["id"] in examples:
                    counts["duplicate_matched"] += 1
                    examples[sub["id"]]["meta"]["also_top_level_ids"].append(q["id"])
                continue
            seen.add(sub["id"])
            evidence = sub["evidence"]
            answer = answer_to_string(sub.get("answer"))
            if not answer:
                counts["empty_answer"] += 1
                continue
            doc, how = titles.match(str(evidence.get("title", "")))
            if doc is None:
                counts["unmatched"] += 1
                counts["unmatched_ambiguous"] += how == "ambiguous"
                continue
            counts[f"matched_{how}"] += 1
            example = {
                "id": sub["id"],
                "input": sub["question"],
                "output": [{"answer": answer, "provenance": [{"wikipedia_id": doc[0], "title": doc[1]}]}],
                "meta": {"top_level_id": q["id"], "pageid": evidence.get("pageid"),
                         "fanoutqa_answer": sub.get("answer"), "evidence_title": evidence.get("title"),
                         "title_match": how, "also_top_level_ids": []},
            }
            examples[sub["id"]] = example
            splits["dev" if is_dev[q["id"]] else "train"].append(example)

    for name, rows in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
    # The shifted question set: dev top-level (multi-hop) questions with evidence pages in the corpus, each with
    # every such page as gold (pages outside the corpus cannot be retrieved and are left out, counted in meta).
    # Never trained on (the dev split), and a different question style from the single-hop training questions.
    multihop = [{"id": q["id"], "input": q["question"],
                 "output": [{"answer": answer_to_string(q.get("answer")) or "",
                             "provenance": [{"wikipedia_id": d, "title": t}
                                            for d, t in evidence_of[q["id"]]["docs"].items()]}],
                 "meta": {"multi_hop": True, "evidence_pages": len(evidence_of[q["id"]]["docs"]),
                          "evidence_not_in_corpus": evidence_of[q["id"]]["missing"]}}
                for q in questions if is_dev[q["id"]] and q["id"] in evidence_of and evidence_of[q["id"]]["docs"]]
    write_jsonl(out_dir / "dev_multihop.jsonl", multihop)
    top = {name: sorted({r["meta"]["top_level_id"] for r in rows}) for name, rows in splits.items()}
    stats = {
        "dataset": "fanoutqa",
        "source": source_info,
        "corpus": str(corpus_path),
        "corpus_docs": titles.docs,
        "dev_fraction": dev_fraction,
        "seed": seed,
        "top_level_questions": len(questions),
        "top_level_dev": sum(is_dev.values()),
        "split_groups": len(set(group_of.values())),
        **counts,
        "matched": counts["matched_exact"] + counts["matched_normalized"],
        "matched_with_duplicates": counts["matched_exact"] + counts["matched_normalized"]
        + counts["duplicate_matched"],
        "train": len(splits["train"]),
        "dev": len(splits["dev"]),
        "train_top_level_with_examples": len(top["train"]),
        "dev_top_level_with_examples": len(top["dev"]),
        "dev_multihop": len(multihop),
        "distinct_pages": len({r["output"][0]["provenance"][0]["wikipedia_id"]
                               for rows in splits.values() for r in rows}),
    }
    return write_stats(out_dir, stats)
