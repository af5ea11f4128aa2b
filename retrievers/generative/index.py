"""`rag index build --kind trie`: the corpus's title trie over a model's tokenizer, plus the id mapping.

The folder is index/trie/ (the saved trie) (arrays, ``titles.jsonl``, ``manifest.json`` with kind "trie",
the tokenizer fingerprint and the decoder start / eos ids) plus:

* ``docs.jsonl``: one row per trie title, in title-id order: ``{"wikipedia_id", "text"}`` (text only
  with ``store_text``, the default; readers need it), so retrieval writes provenance with the corpus id;
* ``duplicates.json``: titles held by several documents. Trie titles are unique: the first document
  with a title keeps it (the others cannot be told apart by a generated title); all are reported here,
  in the manifest (``generative.duplicate_titles``) and in the build output;
* manifest key ``generative``: the model the trie was built for (the default model of `rag retrieve`
  and `rag answer`), its kind (``model_kind``: seq2seq | causal) and, for a causal LM, the prompt template
  the titles follow (``prompt``; the trie's ``title_context`` is its fixed end) and what ends them
  (``title_end``: eos, or newline for zero-shot use of a pretrained LM), the decoding default
  ``length_penalty`` of `rag retrieve` (1: length-normalised beam scores; 0: summed log-probs), corpus path and checksum,
  counts, build seconds, and the prompt check: titles whose tokens after a real prompt differ from the
  trie's (``prompt_check.mismatched``) or that merge with the prompt's end (``context_mismatches``), by id
  and title; they stay in the trie (never dropped) and are warned about.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import opt
from core.errors import InputError, RagError
from core.io import read_json, write_json

logger = logging.getLogger(__name__)

DOCS_FILE = "docs.jsonl"
DUPLICATES_FILE = "duplicates.json"


@dataclass
class TrieBuildConfig:
    model: str | None = opt(None, "model id/path or generative run folder (its tokenizer and start/eos ids); "
                                  "default gemma-3-270m")
    store_text: bool = opt(True, "keep document texts in docs.jsonl (for readers)")
    prompt: str | None = opt(None, "decoder-only models: prompt template with {question}; titles are tokenised as "
                                   "they follow it (default: the run's, else 'Question: {question}\\nTitle:'); "
                                   "seq2seq models ignore it")
    title_end: str | None = opt(None, "decoder-only models: what ends a title: eos (the tokenizer's EOS) or newline "
                                      "(what a pretrained LM writes after a title, so zero-shot use works); "
                                      "default: the run's, else newline where the tokenizer has one, else eos",
                                choices=("eos", "newline"))
    length_penalty: float | None = opt(None, "decoding default of rag retrieve: beam scores are summed log-probs / "
                                             "generated tokens ** this (0 = summed log-probs); default: 0 for "
                                             "newline-ended titles, else 1", min=0, finite=True)


def default_length_penalty(spec: Any) -> float:
    """Summed log-probs for newline-ended titles (chosen on 20 dev questions, docs/experiments/generative-gemma:
    length-normalised scores favour long titles there), length-normalised otherwise."""
    return 0.0 if getattr(spec, "title_end", None) == "newline" and spec.prompt else 1.0


def unique_titles(documents) -> tuple[list[str], list[Any], dict[str, list[str]]]:
    """(titles, first document of each, duplicates {title: [ids...]}) in corpus order."""
    first: dict[str, Any] = {}
    dups: dict[str, list[str]] = {}
    for doc in documents:
        if doc.title in first:
            dups.setdefault(doc.title, [first[doc.title].id]).append(doc.id)
        else:
            first[doc.title] = doc
    return list(first), list(first.values()), dups


def corpus_trie(corpus, tokenizer, spec, eos_token_id: int | None = None):
    """(TitleTrie over the corpus's unique titles, doc ids aligned with title ids, duplicates).

    ``spec``: a model.TitleSpec (causal LMs: titles tokenised after the prompt's fixed end, the trie starting
    at its last token), or the seq2seq decoder start id with ``eos_token_id``."""
    from index.trie import TitleTrie
    from retrievers.generative.model import SEQ2SEQ, TitleSpec

    if not isinstance(spec, TitleSpec):
        spec = TitleSpec(SEQ2SEQ, int(spec), int(eos_token_id))  # type: ignore[arg-type]
    titles, docs, dups = unique_titles(corpus.documents)
    untitled = [i for t, d in zip(titles, docs) if not t.strip() for i in dups.get(t, [d.id])]
    if untitled:
        raise InputError(f"{len(untitled)} document(s) have an empty title (ids {', '.join(untitled[:5])}"
                         f"{', ...' if len(untitled) > 5 else ''}): a generative retriever writes titles, so every "
                         "document needs one; use a bm25 or dense index for this corpus", getattr(corpus, "path", None))
    trie = TitleTrie.from_titles(titles, tokenizer, spec.start_token_id, spec.eos_token_id,
                                 corpus_checksum=getattr(corpus, "checksum", None), context=spec.context)
    if spec.prompt:
        trie.meta["prompt"] = spec.prompt
    return trie, [d.id for d in docs], dups


def prompt_report(trie, tokenizer, spec, doc_ids: list[str]) -> dict[str, Any] | None:
    """Causal tries: the prompt check (prompt.check_continuations) and the context mismatches, by id and title."""
    from retrievers.generative.prompt import check_continuations

    if spec.prompt is None:
        return None
    titles = [trie.title(i) for i in range(len(doc_ids))]
    check = check_continuations(tokenizer, spec.prompt, titles)
    bad, merged = check["mismatched"], list(trie.report.context_mismatches)
    if bad or merged:
        logger.warning("%d of %d checked titles tokenise differently after a real prompt, %d merge with the prompt's "
                       "end (kept in the trie): %s", len(bad), check["checked"], len(merged),
                       ", ".join(f"{doc_ids[i]} {titles[i]!r}" for i in (bad + merged)[:5]))
    show = lambda ids: [{"id": doc_ids[i], "title": titles[i]} for i in ids[:50]]  # noqa: E731
    return {"checked": check["checked"], "prompts": check["prompts"], "mismatched": len(bad),
            "mismatched_sample": show(bad), "context_mismatches": len(merged), "context_mismatches_sample": show(merged)}


def build_trie_index(corpus_path: str | Path, out: str | Path, config: TrieBuildConfig | None = None,
                     overwrite: bool = False) -> dict[str, Any]:
    """Build the trie index folder (atomically: staged beside ``out``, renamed into place)."""
    from core.corpus import Corpus
    from core.io import prepare_output_dir, write_jsonl
    from retrievers.generative.model import DEFAULT_MODEL, load_tokenizer_and_spec

    config = config or TrieBuildConfig()
    out = prepare_output_dir(out, overwrite)
    corpus = Corpus.load(corpus_path)
    tokenizer, spec = load_tokenizer_and_spec(config.model, config.prompt, config.title_end)
    t0 = time.perf_counter()
    trie, doc_ids, dups = corpus_trie(corpus, tokenizer, spec)
    build_seconds = time.perf_counter() - t0
    check = prompt_report(trie, tokenizer, spec, doc_ids)
    if dups:
        logger.warning("%d titles are shared by several documents (first document kept): %s", len(dups),
                       ", ".join(list(dups)[:5]))
    staging = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        trie.save(staging, overwrite=True, corpus_checksum=corpus.checksum)
        texts = {d.id: d.text for d in corpus.documents} if config.store_text else {}
        write_jsonl(staging / DOCS_FILE, ({"wikipedia_id": i, **({"text": texts[i]} if texts else {})}
                                          for i in doc_ids))
        write_json(staging / DUPLICATES_FILE, {"count": len(dups), "titles": dups})
        manifest = read_json(staging / "manifest.json")
        model_ref = config.model
        if model_ref is not None and Path(str(model_ref)).expanduser().exists():
            model_ref = str(Path(str(model_ref)).expanduser().resolve())
        manifest["generative"] = {
            "model": model_ref or DEFAULT_MODEL, "corpus": str(corpus.path), "corpus_checksum": corpus.checksum,
            "model_kind": spec.kind, "prompt": spec.prompt, "build_seconds": round(build_seconds, 3),
            **({"title_end": spec.title_end} if spec.prompt else {}),
            "length_penalty": default_length_penalty(spec) if config.length_penalty is None else config.length_penalty,
            **({"prompt_check": check} if check is not None else {}),
            "docs": len(corpus), "titles": len(doc_ids), "docs_file": DOCS_FILE, "store_text": config.store_text,
            "duplicate_titles": {"count": len(dups), "extra_docs": sum(len(v) - 1 for v in dups.values()),
                                 "sample": dict(list(dups.items())[:20])},
        }
        write_json(staging / "manifest.json", manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def read_docs(index_dir: str | Path) -> tuple[list[str], list[str] | None]:
    """Doc ids (and texts when stored) aligned with the trie's title ids."""
    from core.io import iter_jsonl

    ids, texts = [], []
    for _, row in iter_jsonl(Path(index_dir) / DOCS_FILE):
        ids.append(str(row["wikipedia_id"]))
        texts.append(row.get("text"))
    return ids, (texts if any(t is not None for t in texts) else None)


def check_corpus(manifest: dict[str, Any]) -> None:
    if "generative" not in manifest:
        raise RagError("not a generative trie index (its manifest has no 'generative' section); "
                       "build it with `rag index build --kind trie`")
