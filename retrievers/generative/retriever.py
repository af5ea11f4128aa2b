"""The generative retriever: a seq2seq model or a decoder-only LM writes document titles under the corpus's
title trie.

Opened by `rag retrieve --index TRIE_DIR [--model RUN_DIR] [--beams 10]` (manifest kind "trie"). Every
beam is a ranked candidate (constrained beam search, retrievers/generative/constrained.py); each
title maps back to its corpus document id for the provenance. The model defaults to the one the trie
was built for; a decoder-only model reads the question in the prompt template recorded in the trie's
manifest. Refused (ManifestMismatch): a model whose tokenizer does not match the trie's manifest, whose
start / eos ids differ from the trie's, whose kind (seq2seq / causal) is not the one the trie was built
for, or a run trained with another prompt than the trie's. Beams must be at least 1.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import InputError, ManifestMismatch
from retrievers.base import Hit


class GenerativeRetriever:
    def __init__(self, model: Any, tokenizer: Any, trie: Any, doc_ids: Sequence[str],
                 texts: Sequence[str | None] | None = None, beams: int = 10, multi_title: bool = False,
                 batch_size: int = 8, max_input_length: int = 256, prompt: str | None = None,
                 length_penalty: float = 1.0) -> None:
        from retrievers.generative.model import prepare_for_generation

        check_beams(beams)
        self.model = prepare_for_generation(model)
        self.tokenizer = tokenizer
        self.trie = trie
        self.prompt = prompt
        self.length_penalty = float(length_penalty)  # beam scores: log-prob / generated tokens ** length_penalty
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
                               multi_title=self.multi_title, max_input_length=self.max_input_length,
                               prompt=self.prompt, length_penalty=self.length_penalty)
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


def check_beams(beams: Any) -> int:
    if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
        raise InputError(f"--beams must be a positive integer (every beam is a ranked candidate), got {beams!r}")
    return beams


def open_generative(index_dir: str | Path, model: Any = None, beams: int | None = 10, device: str | None = None,
                    multi_title: bool | None = None, batch_size: int = 8, length_penalty: float | None = None,
                    **_: Any) -> GenerativeRetriever:
    """Load the trie (checked against the model's tokenizer) and the model; ``model`` defaults to the
    one recorded in the index manifest. ``length_penalty`` (default: the index's, set at build time, else 1:
    log-probs normalised by the generated tokens; 0 ranks beams by their summed log-prob)."""
    from index.manifest import read_manifest
    from index.trie import TitleTrie
    from retrievers.generative.index import check_corpus, read_docs
    from retrievers.generative.model import (
        CAUSAL,
        SEQ2SEQ,
        is_generative_run,
        load_generative,
        model_kind,
        read_run_meta,
        title_spec,
    )

    beams = check_beams(10 if beams is None else beams)
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir, "trie")
    check_corpus(manifest)
    gen = manifest["generative"]
    spec = model or gen["model"]
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net, tokenizer = load_generative(spec, device=device)
    trie = TitleTrie.load(index_dir, tokenizer=tokenizer)  # ManifestMismatch when the tokenizer differs
    kind, trie_kind = model_kind(net), gen.get("model_kind", SEQ2SEQ)
    if kind != trie_kind:
        raise ManifestMismatch(f"{index_dir}: the trie was built for a {trie_kind} model ({gen['model']}), "
                               f"{spec} is a {kind} model; rebuild the trie with --model {spec}")
    prompt = gen.get("prompt") if kind == CAUSAL else None
    run_meta = read_run_meta(spec) if is_generative_run(spec) else {}
    if kind == CAUSAL and run_meta.get("prompt") and run_meta["prompt"] != prompt:
        raise ManifestMismatch(f"{index_dir}: the trie was built for the prompt {prompt!r}, {spec} was trained with "
                               f"{run_meta['prompt']!r}; rebuild the trie with --model {spec}")
    if kind == CAUSAL and run_meta and run_meta.get("title_end", "eos") != gen.get("title_end", "eos"):
        raise ManifestMismatch(f"{index_dir}: the trie ends titles with {gen.get('title_end', 'eos')}, {spec} was "
                               f"trained to end them with {run_meta.get('title_end', 'eos')}; rebuild the trie with "
                               f"--model {spec}")
    ts = title_spec(net, tokenizer, prompt, gen.get("title_end", "eos"))  # tries before title_end were EOS-ended
    if (ts.start_token_id, ts.eos_token_id) != (trie.start_token_id, trie.eos_token_id):
        raise ManifestMismatch(f"{index_dir}: trie start/eos ids ({trie.start_token_id}, {trie.eos_token_id}) != "
                               f"the model's {'prompt end' if kind == CAUSAL else 'decoder start'}/eos ids "
                               f"({ts.start_token_id}, {ts.eos_token_id}); rebuild the trie with --model {spec}")
    if prompt:
        trie.meta["prompt"] = prompt
    if multi_title is None:
        multi_title = bool(run_meta.get("multi_title"))
    doc_ids, texts = read_docs(index_dir)
    if len(doc_ids) != len(trie):
        raise ManifestMismatch(f"{index_dir}: {len(doc_ids)} document ids for {len(trie)} trie titles")
    return GenerativeRetriever(net, tokenizer, trie, doc_ids, texts, beams=beams, multi_title=multi_title,
                               batch_size=batch_size, prompt=prompt,
                               length_penalty=gen.get("length_penalty", 1.0) if length_penalty is None
                               else length_penalty)
