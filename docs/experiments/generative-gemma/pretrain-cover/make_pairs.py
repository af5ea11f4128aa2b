"""Pre-training pairs in which every vital10k title is a target once (issue 14, item 3 c), and the control of
item 3 d: the same sources with their targets permuted across documents.

One ISS or LPS pair per document (seeded choice among the pairs whose first title is the document's own), so
one epoch of batch 8 (1,253 steps) shows every title once. Writes OUT/pairs-cover.jsonl and
OUT/pairs-permuted.jsonl, read by `rag train retriever --kind generative --stage pretrain --pairs FILE`.
Run from the repository root: python docs/experiments/generative-gemma/pretrain-cover/make_pairs.py CORPUS OUT
"""
from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

from core.corpus import Corpus
from retrievers.generative.pretrain_tasks import Pair, build_pairs, write_pairs


def main(corpus_path: str, out: str, seed: int = 0) -> None:
    corpus = Corpus.load(corpus_path)
    pairs, stats = build_pairs(corpus)
    by_doc: dict[str, list[Pair]] = {}
    for p in pairs:
        if p.task in ("iss", "lps") and p.titles:
            by_doc.setdefault(p.doc_id, []).append(p)
    rng = random.Random(seed)
    cover = []
    for doc in corpus.documents:
        own = [p for p in by_doc.get(doc.id, []) if p.titles[0] == doc.title]
        if own:
            cover.append(rng.choice(own))
    order = list(range(len(cover)))
    rng.shuffle(order)
    permuted = [Pair(p.task, p.source, cover[j].titles, p.doc_id) for p, j in zip(cover, order)]
    Path(out).mkdir(parents=True, exist_ok=True)
    write_pairs(Path(out) / "pairs-cover.jsonl", cover)
    write_pairs(Path(out) / "pairs-permuted.jsonl", permuted)
    print(f"{len(pairs)} pairs {stats.pairs}; one per document for {len(cover)} of {len(corpus.documents)} titles "
          f"{dict(Counter(p.task for p in cover))}; permuted targets left in place: "
          f"{sum(p.titles == q.titles for p, q in zip(cover, permuted))}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
