"""The generative retriever: a seq2seq model writes document titles under the corpus's title trie.

Opened by `rag retrieve --index TRIE_DIR [--model RUN_DIR] [--beams 10]` (manifest kind "trie"). Every
beam is a ranked candidate (constrained beam search, retrievers/generative/constrained.py); each
title maps back to its corpus document id for the provenance. The model defaults to the one the trie
was built for. A model whose tokenizer does not match the trie's manifest is refused
(ManifestMismatch), as is one whose decoder start / eos ids differ from the trie's.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import ManifestMismatch
from retrievers.base import Hit


class GenerativeRetriever:
    def __init__(self, model: Any, tokenizer: Any, trie: Any, doc_ids: Sequence[str],
                 texts: Sequence[str | None] | None = None, beams: int = 10, multi_title: bool = False,
                 batch_size: int = 8, max_input_length: int = 256) -> None:
        from retrievers.generative.model import prepare_for_generation

        self.model = prepare_for_generation(model)
        self.tokenizer = tokenizer
        self.trie = trie
        self.beams = int(beams)
        self.multi_title = multi_title
        self.batch_size = batch_size
        self.max_input_length = max_input_length
        self._doc = {trie.title(i): (doc_ids[i], (texts[i] if texts else None) or "") for i in range(len(doc_ids))}
        self.seconds = 0.0
        self.queries = 0

    def retrieve(self, queries: Sequence[str], k: int = 100, **kwargs: Any) -> list[list[Hit]]:
        from retrievers.generative.constrained import decode_titles

        if not queries:
            return []
        t0 = time.perf_counter()
        ranked = decode_titles(self.model, self.tokenizer, self.trie, list(queries), num_beams=self.beams,
                               num_return_sequences=self.beams, batch_size=self.batch_size,
                               multi_title=self.multi_title, max_input_length=self.max_input_length)
        self.seconds += time.perf_counter() - t0
        self.queries += len(queries)
        out = []
        for items in ranked:
            hits = []
            for title, score in items[:k]:
                doc_id, text = self._doc[title]
                hits.append(Hit(doc_id, title, float(score), text))
            out.append(hits)
        return out

    @property
    def queries_per_second(self) -> float | None:
        return self.queries / self.seconds if self.seconds else None


def open_generative(index_dir: str | Path, model: Any = None, beams: int | None = 10, device: str | None = None,
                    multi_title: bool | None = None, batch_size: int = 8, **_: Any) -> GenerativeRetriever:
    """Load the trie (checked against the model's tokenizer) and the model; ``model`` defaults to the
    one recorded in the index manifest."""
    from index.manifest import read_manifest
    from index.trie import TitleTrie
    from retrievers.generative.index import check_corpus, read_docs
    from retrievers.generative.model import decoder_ids, is_generative_run, load_generative, read_run_meta

    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir, "trie")
    check_corpus(manifest)
    spec = model or manifest["generative"]["model"]
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net, tokenizer = load_generative(spec, device=device)
    trie = TitleTrie.load(index_dir, tokenizer=tokenizer)  # ManifestMismatch when the tokenizer differs
    start, eos = decoder_ids(net, tokenizer)
    if (start, eos) != (trie.start_token_id, trie.eos_token_id):
        raise ManifestMismatch(f"{index_dir}: trie start/eos ids ({trie.start_token_id}, {trie.eos_token_id}) != "
                               f"the model's decoder start/eos ids ({start}, {eos}); rebuild the trie with "
                               f"--model {spec}")
    if multi_title is None:
        multi_title = bool(is_generative_run(spec) and read_run_meta(spec).get("multi_title"))
    doc_ids, texts = read_docs(index_dir)
    if len(doc_ids) != len(trie):
        raise ManifestMismatch(f"{index_dir}: {len(doc_ids)} document ids for {len(trie)} trie titles")
    return GenerativeRetriever(net, tokenizer, trie, doc_ids, texts, beams=beams or 10, multi_title=multi_title,
                               batch_size=batch_size)

