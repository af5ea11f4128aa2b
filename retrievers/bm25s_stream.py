"""bm25s indexes built from a stream of texts, and searched in batches over a thread pool.

`build_bm25s_streamed` writes the files `bm25s.BM25.save` writes for an index built with
`BM25(method="lucene").index(token_ids)` (`data.csc.index.npy` float32, `indices.csc.index.npy` int32,
`indptr.csc.index.npy` int64, `vocab.index.json`, `params.index.json`), with the same numbers, without
ever holding every text, every token list or the (term, passage) triples in memory:

* pass 1 reads the texts a chunk at a time (`BUILD_CHUNK` passages), tokenises them with the shared
  bm25s `Tokenizer` (its vocabulary grows as it goes, so token ids are the ones a one-shot
  `tokenize` gives), counts each passage's distinct terms once (document frequencies, an int64 array of
  the vocabulary's size) and appends each passage's (term, tf) pairs and its length to two scratch files;
* pass 2 reads the scratch files a chunk at a time, scores each (term, passage) pair with bm25s's own
  Lucene formula (`idf(df) * tf / (tf + k1 * (1 - b + b * len / avglen))`, idf as float32 from
  `math.log`, the rest in float64 and stored as float32, as bm25s does) and scatters it into the
  memory-mapped CSC arrays at its column's next free slot, so each column lists its passages in
  increasing order, as bm25s's sorted CSC does.

Memory: the output arrays are written through the page cache (memory-mapped); what the process holds is
the tokenizer's vocabulary (three Python dicts, about 200-300 bytes per distinct word; bm25s keeps the
same), four arrays of the vocabulary's size (df, idf, indptr and the column write heads: 28 bytes per
term) and one chunk's texts, token lists and numpy temporaries (`BUILD_CHUNK` passages). Disk: the index
is 8 bytes per (term, passage) pair + 8 per term; the scratch files another 8 per pair + 8 per passage,
deleted when the build ends.

Searching (`Bm25sSearcher`): the CSC arrays are memory-mapped (`bm25s.BM25.load(mmap=True)`; bm25s's own
vocabulary map is not loaded: queries are token ids of the saved tokenizer, which are the columns). A
query's score is accumulated over its terms' postings only into a per-thread dense float32 buffer (4 bytes
per passage per thread), adding the terms in query order exactly as bm25s's `get_scores` does, so the
float32 sums, and therefore the ties, are identical; the passages scoring > 0 are ranked by (score desc,
passage id asc). A batch of queries is split over a thread pool: numpy's fancy indexing, sorting and
comparisons release the GIL, but at ~50k passages a query is ~0.3 ms of mostly Python and two threads
gave no gain on a loaded 2-core machine (docs/bm25-at-scale.md); `threads=1` searches in the caller.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

BUILD_CHUNK = 8192  # passages tokenised / scored per step of the streamed build
DATA, INDICES, INDPTR = "data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy"
VOCAB, PARAMS = "vocab.index.json", "params.index.json"


def _chunks(texts: Iterable[str], size: int) -> Iterable[list[str]]:
    it = iter(texts)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct values, index of each one's first occurrence, its count) of a sorted array.

    np.unique does the same, but numpy 2.4's is 100-200x slower on these int arrays (measured here)."""
    if not len(sorted_values):
        return sorted_values, np.zeros(0, np.int64), np.zeros(0, np.int64)
    first = np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))
    return sorted_values[first], first, np.diff(np.append(first, len(sorted_values)))


def _lucene_idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    """float32 idf per term, from `math.log` per distinct df, exactly as bm25s's `_build_idf_array`."""
    order = np.argsort(df, kind="stable")
    values, _, counts = _runs(df[order])
    table = np.array([math.log(1 + (n_docs - d + 0.5) / (d + 0.5)) if d else 0.0 for d in values.tolist()],
                     dtype=np.float32)
    idf = np.zeros(len(df), dtype=np.float32)
    idf[order] = np.repeat(table, counts)
    return idf


def build_bm25s_streamed(texts: Iterable[str], out: str | Path, tokenizer: Any, k1: float, b: float,
                         chunk: int | None = None) -> dict[str, int]:
    """Write a bm25s (method "lucene") index of `texts` into `out`, plus the tokenizer's vocabulary and stop
    words; returns {"passages", "terms", "postings"}. `texts` is read once, `chunk` passages at a time."""
    import bm25s

    chunk = chunk or BUILD_CHUNK
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / ".build-scratch"
    scratch.mkdir(exist_ok=True)
    try:
        # ---- pass 1: tokenise, document frequencies, per-passage (term, tf) pairs and lengths
        df = np.zeros(1024, dtype=np.int64)
        n_docs = total_len = n_pairs = 0
        any_empty = False
        with open(scratch / "terms.i32", "wb") as f_terms, open(scratch / "tfs.i32", "wb") as f_tfs, \
                open(scratch / "nnz.i32", "wb") as f_nnz, open(scratch / "lens.i32", "wb") as f_lens:
            for texts_chunk in _chunks(texts, chunk):
                ids = list(tokenizer.streaming_tokenize(texts_chunk, update_vocab=True, allow_empty=True))
                lens = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
                flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
                del ids, texts_chunk
                rows = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
                width = int(flat.max(initial=0)) + 1
                keys, _, tfs = _runs(np.sort(rows * width + flat))  # sorted by (row, term)
                terms, pair_rows = keys % width, keys // width
                nnz = np.bincount(pair_rows, minlength=len(lens))
                if width > len(df):
                    df = np.concatenate([df, np.zeros(max(width, 2 * len(df)) - len(df), dtype=np.int64)])
                df[:width] += np.bincount(terms, minlength=width)  # each pair is one (passage, distinct term)
                any_empty = any_empty or bool(np.any(flat == 0))
                f_terms.write(terms.astype(np.int32).tobytes())
                f_tfs.write(tfs.astype(np.int32).tobytes())
                f_nnz.write(nnz.astype(np.int32).tobytes())
                f_lens.write(lens.astype(np.int32).tobytes())
                n_docs += len(lens)
                total_len += int(lens.sum())
                n_pairs += len(terms)
        vocab_size = max(tokenizer.word_to_id.values(), default=-1) + 1
        # bm25s's index(token_ids) columns: the ids seen plus the empty-token id 0, or max+1 when 0 was seen
        n_cols = vocab_size + 1 if any_empty else vocab_size
        df = df[:n_cols] if len(df) >= n_cols else np.concatenate([df, np.zeros(n_cols - len(df), np.int64)])
        avg_len = np.float64(total_len) / n_docs if n_docs else np.float64(0.0)
        idf = _lucene_idf(df, n_docs)

        # ---- pass 2: score each pair and scatter it into the CSC arrays at its column's next slot
        indptr = np.zeros(n_cols + 1, dtype=np.int64)
        np.cumsum(df, out=indptr[1:])
        data = np.lib.format.open_memmap(out / DATA, mode="w+", dtype=np.float32, shape=(n_pairs,))
        indices = np.lib.format.open_memmap(out / INDICES, mode="w+", dtype=np.int32, shape=(n_pairs,))
        heads = indptr[:-1].copy()
        all_terms = np.memmap(scratch / "terms.i32", dtype=np.int32, mode="r") if n_pairs else np.zeros(0, np.int32)
        all_tfs = np.memmap(scratch / "tfs.i32", dtype=np.int32, mode="r") if n_pairs else np.zeros(0, np.int32)
        all_nnz = np.memmap(scratch / "nnz.i32", dtype=np.int32, mode="r") if n_docs else np.zeros(0, np.int32)
        all_lens = np.memmap(scratch / "lens.i32", dtype=np.int32, mode="r") if n_docs else np.zeros(0, np.int32)
        pair_start = 0
        for doc_start in range(0, n_docs, chunk):
            nnz = np.asarray(all_nnz[doc_start:doc_start + chunk], dtype=np.int64)
            pair_end = pair_start + int(nnz.sum())
            terms = np.asarray(all_terms[pair_start:pair_end], dtype=np.int64)
            tf = np.asarray(all_tfs[pair_start:pair_end]).astype(np.float32)
            docs = np.repeat(np.arange(doc_start, doc_start + len(nnz), dtype=np.int64), nnz)
            l_d = np.repeat(np.asarray(all_lens[doc_start:doc_start + len(nnz)], dtype=np.int64), nnz)
            # bm25s.scoring._score_tfc_lucene, element by element the same float64 operations
            tfc = tf / (k1 * ((1 - b) + b * l_d / avg_len) + tf)
            scores = (idf[terms] * tfc).astype(np.float32)
            order = np.argsort(terms, kind="stable")  # passages stay increasing inside a column
            sorted_terms = terms[order]
            cols, first, counts = _runs(sorted_terms)
            rank = np.arange(len(order)) - np.repeat(first, counts)
            pos = heads[sorted_terms] + rank
            data[pos] = scores[order]
            indices[pos] = docs[order]
            heads[cols] += counts
            pair_start = pair_end
        data.flush()
        indices.flush()
        del data, indices, all_terms, all_tfs, all_nnz, all_lens
        np.save(out / INDPTR, indptr)
        with open(out / VOCAB, "w", encoding="utf-8") as fh:  # bm25s's {token id: column}: the identity
            fh.write("{" + ", ".join(f'"{i}": {i}' for i in range(n_cols)) + "}")
        params = dict(k1=k1, b=b, delta=0.5, method="lucene", idf_method="lucene", dtype="float32",
                      int_dtype="int32", num_docs=n_docs, version=bm25s.__version__, backend="numpy")
        with open(out / PARAMS, "w") as fh:
            json.dump(params, fh, indent=4)
        tokenizer.save_vocab(out)
        tokenizer.save_stopwords(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"passages": n_docs, "terms": n_cols, "postings": n_pairs}


class Bm25sSearcher:
    """A bm25s index memory-mapped, searched in batches over `threads` threads (see the module docstring)."""

    def __init__(self, folder: Path, tokenizer: Any, threads: int | None = None) -> None:
        import bm25s
        self.model = bm25s.BM25.load(folder, mmap=True, load_vocab=False)
        tokenizer.load_vocab(folder)
        tokenizer.load_stopwords(folder)
        self.tokenizer = tokenizer
        self.n = int(self.model.scores["num_docs"])
        self.threads = max(1, threads or os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()

    def _buffer(self) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.zeros(self.n, dtype=np.float32)
        return buf

    def scores(self, query: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(passage ids ascending, their float32 scores) of the passages scoring > 0 for token ids `query`."""
        data, indices, indptr = (self.model.scores[key] for key in ("data", "indices", "indptr"))
        spans = [(int(indptr[t]), int(indptr[t + 1])) for t in query]
        spans_kept = [(a, z) for a, z in spans if z > a]
        if not spans_kept:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        buf = self._buffer()
        for a, z in spans:  # every term in query order (repeats included), as bm25s's np.add.at loop
            if z > a:
                buf[indices[a:z]] += data[a:z]  # a column lists each passage once: same as np.add.at
        postings = sum(z - a for a, z in spans_kept)
        if len({a for a, _ in spans_kept}) == 1:
            a, z = spans_kept[0]
            touched = np.asarray(indices[a:z], dtype=np.int64)
        elif postings * 16 < self.n:
            touched = _runs(np.sort(np.concatenate([indices[a:z] for a, z in spans_kept])))[0].astype(np.int64)
        else:
            touched = np.flatnonzero(buf)
        s = buf[touched]
        buf[touched] = 0  # leave the buffer zeroed for this thread's next query
        keep = s > 0
        return touched[keep], s[keep]

    def _top(self, query: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        hits, s = self.scores(query)
        if len(hits) > k:  # keep every passage tied with the k-th score, then order exactly
            kth = np.partition(s, len(hits) - k)[len(hits) - k]
            keep = s >= kth
            hits, s = hits[keep], s[keep]
        order = np.lexsort((hits, -s))[:k]
        return hits[order], s[order]

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k among the passages scoring > 0 (ties: lower passage id first), the batch over threads.

        bm25s's own top-k runs np.argpartition over every passage; most score exactly 0 for a query and
        argpartition degrades badly on such ties (bench/bench_bm25.py: 74 -> 3,300 queries/s at 100k
        passages when only the non-zero scores are ranked). Passages sharing no term are not hits anyway.
        """
        k = min(k, self.n)
        ids = self.tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)
        # bm25s maps unknown words to the empty-string id; drop them so they score nothing.
        unk = self.tokenizer.word_to_id.get("")
        ids = [[t for t in q if t != unk] for q in ids]
        pids = np.full((len(ids), k), -1, dtype=np.int64)
        scores = np.zeros((len(ids), k), dtype=np.float32)
        if k == 0:
            return pids, scores

        def one(i: int) -> None:
            if ids[i]:
                top, s = self._top(ids[i], k)
                pids[i, :len(top)], scores[i, :len(top)] = top, s

        if self.threads == 1 or len(ids) < 2:
            for i in range(len(ids)):
                one(i)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="bm25s")
            list(self._pool.map(one, range(len(ids))))
        return pids, scores

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
