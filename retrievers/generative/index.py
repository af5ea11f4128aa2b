"""`rag index build --kind trie`: the corpus's title trie over a model's tokenizer, plus the id mapping.

The folder is index/trie/ (the saved trie) (arrays, ``titles.jsonl``, ``manifest.json`` with kind "trie",
the tokenizer fingerprint and the decoder start / eos ids) plus:

* ``docs.jsonl``: one row per trie title, in title-id order: ``{"wikipedia_id", "text"}`` (text only
  with ``store_text``, the default; readers need it), so retrieval writes provenance with the corpus id;
* ``duplicates.json``: titles held by several documents. Trie titles are unique: the first document
  with a title keeps it (the others cannot be told apart by a generated title); all are reported here,
  in the manifest (``generative.duplicate_titles``) and in the build output;
* manifest key ``generative``: the model the trie was built for (the default model of `rag retrieve`
  and `rag answer`), corpus path and checksum, counts.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import opt
from core.errors import RagError
from core.io import read_json, write_json

logger = logging.getLogger(__name__)

DOCS_FILE = "docs.jsonl"
DUPLICATES_FILE = "duplicates.json"


@dataclass
class TrieBuildConfig:
    model: str | None = opt(None, "model id/path or generative run folder (its tokenizer and start/eos ids)")
    store_text: bool = opt(True, "keep document texts in docs.jsonl (for readers)")


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


def corpus_trie(corpus, tokenizer, start_token_id: int, eos_token_id: int):
    """(TitleTrie over the corpus's unique titles, doc ids aligned with title ids, duplicates)."""
    from index.trie import TitleTrie

    titles, docs, dups = unique_titles(corpus.documents)
    trie = TitleTrie.from_titles(titles, tokenizer, start_token_id, eos_token_id,
                                 corpus_checksum=getattr(corpus, "checksum", None))
    return trie, [d.id for d in docs], dups


def build_trie_index(corpus_path: str | Path, out: str | Path, config: TrieBuildConfig | None = None,
                     overwrite: bool = False) -> dict[str, Any]:
    """Build the trie index folder (atomically: staged beside ``out``, renamed into place)."""
    from core.corpus import Corpus
    from core.io import prepare_output_dir, write_jsonl
    from retrievers.generative.model import DEFAULT_MODEL, load_tokenizer_and_ids

    config = config or TrieBuildConfig()
    out = prepare_output_dir(out, overwrite)
    corpus = Corpus.load(corpus_path)
    tokenizer, start, eos = load_tokenizer_and_ids(config.model)
    trie, doc_ids, dups = corpus_trie(corpus, tokenizer, start, eos)
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
