"""Benchmark: peak memory and scaling of the dense build pipeline, with a fake encoder.

The encoder is a FAKE (deterministic random unit vectors, dim 384, one RNG draw per batch seeded by
the batch's texts) injected with `build_dense_index(encoder=DenseEncoder(FakeModel()))` as
tests/index/test_dense_index.py does, so the measurement isolates the pipeline (corpus validation,
passage table, shard loop, Faiss assembly, manifest) from the model. Each measurement runs in a
fresh subprocess and reads its own RSS high-water mark (resource.getrusage ru_maxrss); a sampling
thread (every 20 ms) also records the RSS per build phase (from the manifest's timings).

Synthetic corpus: documents of 260 words (= exactly 3 passages of 100 words at stride 80, the
build's defaults: about Wikipedia's passages per article), words drawn from the vital10k unigram
distribution (seed 0); titles "Synthetic document N". Sizes are in passages.

Figures:
* memory: peak RSS of the build minus the peak of a baseline process that imports the same modules
  and builds the fake encoder but no index; compared with n x 384 x 4 bytes (the Flat index, which
  holds every embedding) - the residual is what the pipeline itself keeps per passage;
* scaling: build time (split into passage table / encoding / index assembly), search time of 100
  queries (k=10, exact Flat search, and `retrieve` with document aggregation) in a second fresh
  process, and both peaks, at each size: time per passage and memory minus index per passage
  should stay flat;
* open with and without mmap, at the largest scaling size: `DenseRetriever(INDEX, mmap=True)` (the Faiss
  file memory-mapped, faiss IO_FLAG_MMAP_IFC) vs `mmap=False` (read into memory), each in a fresh process,
  alternated over `--open-rounds` rounds: open seconds, RSS after opening (RssAnon = the process's own
  memory, RssFile = mapped file pages), and after 100 exact searches (which touch every vector of a Flat
  index, so a mapped Flat index ends with the whole file resident as shared page cache, not as
  anonymous memory). The index file was just written, so both read it from the page cache (caches are
  not dropped on the shared machine).

3M passages x 384 float32 = 4.6 GB of vectors for Flat: the full default builds it (about 6 GB peak; the
machine has 24 GB), `--scaling` to choose other sizes.

Usage: python bench/bench_build_memory.py [--quick] [--sizes 20000,200000] [--scaling 100000,1000000,3000000]
Writes bench/results/build_memory.json (build_memory_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

NAME = "build_memory"
DIM = 384
WORDS_PER_DOC = 260  # 3 passages of 100 words at stride 80
PASSAGES_PER_DOC = 3


class FakeModel:
    """Deterministic random unit vectors: one RNG draw per encode call, seeded by the texts."""

    def __init__(self, dim: int = DIM) -> None:
        self.dim = dim

    def get_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, batch_size=64, normalize_embeddings=True, **_):
        texts = list(texts)
        seed = zlib.crc32(("\x00".join(texts[:2]) + f"|{len(texts)}").encode("utf-8"))
        out = np.random.default_rng(seed).standard_normal((len(texts), self.dim), dtype=np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def fake_encoder():
    from retrievers.encoders import DenseEncoder
    return DenseEncoder(FakeModel(), "fake")


# ------------------------------------------------------------------ synthetic corpus

def vocabulary() -> tuple[np.ndarray, np.ndarray]:
    from collections import Counter

    from core.corpus import iter_documents
    counts: Counter[str] = Counter()
    for _, doc in iter_documents(C.vital10k()):
        counts.update(doc.text.split())
    words, freq = zip(*counts.most_common())
    p = np.asarray(freq, dtype=np.float64)
    return np.asarray(words, dtype=object), p / p.sum()


def write_corpus(path: Path, n_passages: int, seed: int = 0) -> dict[str, Any]:
    words, p = vocabulary()
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(p)
    n_docs = -(-n_passages // PASSAGES_PER_DOC)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    block = 2000
    with open(path, "w", encoding="utf-8") as fh:
        for start in range(0, n_docs, block):
            m = min(block, n_docs - start)
            idx = np.searchsorted(cdf, rng.random(m * WORDS_PER_DOC)).clip(0, len(words) - 1)
            ws = words[idx].reshape(m, WORDS_PER_DOC)
            for j in range(m):
                fh.write(json.dumps({"id": f"s{start + j}", "title": f"Synthetic document {start + j}",
                                     "text": " ".join(ws[j].tolist())}, ensure_ascii=False) + "\n")
    return {"docs": n_docs, "passages": n_docs * PASSAGES_PER_DOC, "bytes": path.stat().st_size,
            "write_s": time.perf_counter() - t0}


# ------------------------------------------------------------------ workers (fresh processes)

class RssSampler:
    def __init__(self, every: float = 0.02) -> None:
        self.samples: list[tuple[float, float]] = []
        self.every = every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), C.current_rss_mb()))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()

    def peak_between(self, a: float, b: float) -> float:
        xs = [r for t, r in self.samples if a <= t <= b]
        return max(xs) if xs else float("nan")


def worker_baseline() -> dict[str, Any]:
    from retrievers.dense import DenseRetriever  # noqa: F401
    from retrievers.dense_build import build_dense_index  # noqa: F401  (same imports as a build)
    fake_encoder().fingerprint()
    return {"peak_rss_mb": C.peak_rss_mb(), "rss_mb": C.current_rss_mb()}


def growing_codes() -> None:
    """The toolkit build before it reserved the code buffer: FaissIndex.reserve made a no-op.

    Faiss grows `codes` (a std::vector) geometrically while adding shard by shard, so the old and new
    buffers coexist at each growth; the toolkit now sizes it once before the adds (FaissIndex.reserve).
    """
    import retrievers.dense_build as db
    db.FaissIndex.reserve = lambda self, n: False


def worker_build(corpus: str, out: str, factory: str, presize: str = "0") -> dict[str, Any]:
    import retrievers.dense_build as db
    marks: dict[str, float] = {}
    if presize == "1":
        growing_codes()

    def timed(name: str, fn):
        def wrapper(*a, **kw):
            marks[name + "_start"] = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                marks[name + "_end"] = time.perf_counter()
        return wrapper

    # phase marks: the build calls these module-level functions in turn
    db.prepare_staging = timed("passages", db.prepare_staging)
    db.encode_missing_shards = timed("encode", db.encode_missing_shards)
    db.assemble_index = timed("index", db.assemble_index)
    enc = fake_encoder()
    enc.fingerprint()
    before = {"peak_rss_mb": C.peak_rss_mb(), "rss_mb": C.current_rss_mb()}
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        manifest = db.build_dense_index(corpus, out, db.DenseBuildConfig(faiss=factory), overwrite=True, encoder=enc)
        t1 = time.perf_counter()
    return {
        "before": before, "peak_rss_mb": C.peak_rss_mb(), "rss_after_mb": C.current_rss_mb(),
        "build_s": t1 - t0, "timings": manifest["timings"], "passages": manifest["counts"]["passages"],
        "documents": manifest["counts"]["documents"],
        "phase_s": {"validate": marks["passages_start"] - t0, "finish (save, manifest)": t1 - marks["index_end"]},
        "phase_peak_rss_mb": {"validate": sampler.peak_between(t0, marks["passages_start"]),
                              "passages": sampler.peak_between(marks["passages_start"], marks["passages_end"]),
                              "encode": sampler.peak_between(marks["encode_start"], marks["encode_end"]),
                              "index": sampler.peak_between(marks["index_start"], marks["index_end"]),
                              "finish": sampler.peak_between(marks["index_end"], t1)},
        "index_file_bytes": (Path(out) / "index.faiss").stat().st_size,
    }


def _status_mb() -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return out


def worker_open(index_dir: str, mmap: str, n_queries: int, k: int) -> dict[str, Any]:
    """Open time and memory of a DenseRetriever with (mmap=1) or without (mmap=0) a memory-mapped index."""
    from retrievers.dense import DenseRetriever
    enc = fake_encoder()
    enc.fingerprint()
    base = _status_mb()
    t0 = time.perf_counter()
    r = DenseRetriever(index_dir, encoder=enc, mmap=mmap == "1")
    open_s = time.perf_counter() - t0
    opened = _status_mb()
    queries = [f"query {i} about rivers and empires" for i in range(n_queries)]
    t0 = time.perf_counter()
    r.search_passages(queries, k)
    first_search_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r.search_passages(queries, k)
    search_s = time.perf_counter() - t0
    return {"mmap": mmap == "1", "open_s": open_s, "first_search_s": first_search_s, "search_s": search_s,
            "queries": n_queries, "base": base, "after_open": opened, "after_search": _status_mb(),
            "peak_rss_mb": C.vmhwm_mb(), "mapped": r.index.mapped is not None}


def worker_search(index_dir: str, n_queries: int, k: int) -> dict[str, Any]:
    from retrievers.dense import DenseRetriever
    t0 = time.perf_counter()
    r = DenseRetriever(index_dir, encoder=fake_encoder())
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    words = ["history", "river", "science", "music", "war", "city", "language", "species", "empire", "energy"]
    queries = [" ".join(rng.choice(words, size=6).tolist()) + f" q{i}" for i in range(n_queries)]
    r.search_passages(queries[:2], k)  # warm-up
    best_search, best_retrieve = float("inf"), float("inf")
    for _ in range(3):
        t = time.perf_counter()
        r.search_passages(queries, k)
        best_search = min(best_search, time.perf_counter() - t)
        t = time.perf_counter()
        r.retrieve(queries, k=k)
        best_retrieve = min(best_retrieve, time.perf_counter() - t)
    return {"load_s": load_s, "search_s": best_search, "retrieve_s": best_retrieve, "queries": n_queries, "k": k,
            "peak_rss_mb": C.peak_rss_mb()}


# ------------------------------------------------------------------ driver

def measure(n: int, workdir: Path, factory: str, baseline_peak: float, n_queries: int, k: int,
            search: bool, growing: bool, open_rounds: int = 0) -> dict[str, Any]:
    corpus = workdir / f"corpus-{n}" / "corpus.jsonl"
    info = write_corpus(corpus, n)
    out = workdir / f"index-{n}"
    extra = {}
    if growing:  # the build before the fix, same corpus, fresh process (run first: the toolkit build's row stays last)
        p = C.run_worker(Path(__file__), ["build", str(corpus), str(out) + "-growing", factory, "1"])
        extra = {"growing_build_peak_mb": p["peak_rss_mb"], "growing_minus_baseline_mb": p["peak_rss_mb"] - baseline_peak,
                 "growing_phase_peak_rss_mb": p["phase_peak_rss_mb"], "growing_build_s": p["build_s"]}
        shutil.rmtree(str(out) + "-growing", ignore_errors=True)
    b = C.run_worker(Path(__file__), ["build", str(corpus), str(out), factory])
    index_mb = b["passages"] * DIM * 4 / 2**20
    row: dict[str, Any] = {
        "passages": b["passages"], "documents": b["documents"], "corpus_mb": info["bytes"] / 2**20,
        "build_s": b["build_s"], "passages_s": b["timings"]["passages_s"], "encode_s": b["timings"]["encode_s"],
        "index_s": b["timings"]["index_s"], "validate_s": b["phase_s"]["validate"],
        "finish_s": b["phase_s"]["finish (save, manifest)"], "build_peak_mb": b["peak_rss_mb"],
        "build_minus_baseline_mb": b["peak_rss_mb"] - baseline_peak, "flat_index_mb": index_mb,
        "index_file_mb": b["index_file_bytes"] / 2**20,
        "residual_mb": b["peak_rss_mb"] - baseline_peak - index_mb, "phase_peak_rss_mb": b["phase_peak_rss_mb"],
        "us_per_passage_build": b["build_s"] / b["passages"] * 1e6, **extra,
    }
    if extra:
        row["growing_residual_mb"] = extra["growing_build_peak_mb"] - baseline_peak - index_mb
    if search:
        s = C.run_worker(Path(__file__), ["search", str(out), str(n_queries), str(k)])
        row.update(search_s=s["search_s"], retrieve_s=s["retrieve_s"], load_s=s["load_s"],
                   search_peak_mb=s["peak_rss_mb"], search_minus_baseline_mb=s["peak_rss_mb"] - baseline_peak,
                   ms_per_query_search=s["search_s"] / n_queries * 1e3,
                   ms_per_query_retrieve=s["retrieve_s"] / n_queries * 1e3)
    if open_rounds:
        opens: dict[str, list[dict[str, Any]]] = {"1": [], "0": []}
        for rnd in range(open_rounds):
            for mm in (("1", "0") if rnd % 2 == 0 else ("0", "1")):
                opens[mm].append(C.run_worker(Path(__file__), ["open", str(out), mm, str(n_queries), str(k)]))
        row["open"] = []
        for mm, runs in opens.items():
            row["open"].append({
                "mmap": mm == "1", "mapped": runs[0]["mapped"], "open_s": min(r["open_s"] for r in runs),
                "open_s_rounds": [r["open_s"] for r in runs],
                "first_search_s": min(r["first_search_s"] for r in runs), "search_s": min(r["search_s"] for r in runs),
                "rss_base_mb": min(r["base"]["VmRSS"] for r in runs),
                "rss_after_open_mb": max(r["after_open"]["VmRSS"] for r in runs),
                "anon_after_open_mb": max(r["after_open"]["RssAnon"] for r in runs),
                "file_after_open_mb": max(r["after_open"]["RssFile"] for r in runs),
                "anon_after_search_mb": max(r["after_search"]["RssAnon"] for r in runs),
                "file_after_search_mb": max(r["after_search"]["RssFile"] for r in runs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "rounds": len(runs)})
        o = {x["mmap"]: x for x in row["open"]}
        print(f"  open at {n:,}: mmap {o[True]['open_s']:.2f} s / anon {o[True]['anon_after_open_mb']:.0f} MB, "
              f"read {o[False]['open_s']:.2f} s / anon {o[False]['anon_after_open_mb']:.0f} MB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(corpus.parent, ignore_errors=True)
    print(f"  {n:,} passages: build {row['build_s']:.1f}s, peak {row['build_peak_mb']:.0f} MB "
          f"(+{row['build_minus_baseline_mb']:.0f} over baseline, Flat index {index_mb:.0f} MB)", flush=True)
    return row


def tables(res: dict[str, Any]) -> list[str]:
    out = []
    m = res["memory"]
    rows = []
    for r in m["rows"]:
        ph, pp = r["phase_peak_rss_mb"], r["growing_phase_peak_rss_mb"]
        rows.append(["toolkit", r["passages"], r["build_peak_mb"], r["build_minus_baseline_mb"], r["flat_index_mb"],
                     r["residual_mb"], ph["validate"], ph["passages"], ph["encode"], ph["index"], ph["finish"]])
        rows.append(["growing codes (before the fix)", r["passages"], r["growing_build_peak_mb"], r["growing_minus_baseline_mb"],
                     r["flat_index_mb"], r["growing_residual_mb"], pp["validate"], pp["passages"], pp["encode"],
                     pp["index"], pp["finish"]])
    d = m["difference"]
    out.append(
        "### Dense build peak memory (fake encoder, Flat), fresh process per build\n\n" +
        C.md_table(["build", "passages", "peak RSS MB", "minus baseline MB", "n x 384 x 4 B (MB)", "residual MB",
                    "RSS peak: validate", "passage table", "encode", "index", "save+manifest"], rows) +
        f"\n\nBaseline process (same imports, fake encoder, no build): {res['baseline_peak_mb']:.0f} MB. "
        f"Peak difference {d['large']:,} vs {d['small']:,} passages: toolkit {d['peak_diff_mb']:.0f} MB, with "
        f"growing codes {d['growing_peak_diff_mb']:.0f} MB, vs {d['index_diff_mb']:.0f} MB of embeddings in the Flat "
        f"index (explained: {d['explained_fraction']:.0%} / {d['growing_explained_fraction']:.0%}; residual "
        f"{d['residual_per_passage_bytes']:.0f} / {d['growing_residual_per_passage_bytes']:.0f} bytes per passage). "
        "The toolkit sizes the Faiss code buffer once before the adds (FaissIndex.reserve); 'growing codes' = "
        "the same build with that turned off, as it was before.")
    s = res["scaling"]
    rows = [[r["passages"], r["build_s"], r["passages_s"], r["encode_s"], r["index_s"], r["us_per_passage_build"],
             r.get("ms_per_query_search"), r.get("ms_per_query_retrieve"), r["build_peak_mb"],
             r["residual_mb"], r.get("search_peak_mb")] for r in s["rows"]]
    out.append(
        "### Scaling (fake encoder, Flat, synthetic 260-word docs = 3 passages each)\n\n" +
        C.md_table(["passages", "build s", "passage table s", "encode s (fake)", "index s", "build us/passage",
                    "search ms/query (k=10)", "retrieve ms/query", "build peak MB", "peak - baseline - index MB",
                    "search peak MB"], rows) +
        f"\n\nbuild time per passage, largest / smallest size: {s['time_per_passage_ratio']:.2f} (1 = linear); "
        f"the search figures are exact Flat search ({s['queries']} queries, best of 3), linear in n by construction.")
    big = next((r for r in reversed(s["rows"]) if r.get("open")), None)
    if big:
        rows = [["mmap (IO_FLAG_MMAP_IFC)" if o["mmap"] else "read into memory", o["mapped"], o["open_s"],
                 o["rss_after_open_mb"], o["anon_after_open_mb"], o["file_after_open_mb"], o["first_search_s"],
                 o["search_s"], o["anon_after_search_mb"], o["file_after_search_mb"], o["peak_rss_mb"]]
                for o in big["open"]]
        out.append(
            f"### Opening the {big['passages']:,}-passage Flat index (fake encoder) with and without mmap, "
            f"fresh process each, {big['open'][0]['rounds']} alternated rounds\n\n" +
            C.md_table(["open", "mapped", "open s", "RSS after open MB", "RssAnon after open MB",
                        "RssFile after open MB", f"first {s['queries']} searches s", f"next {s['queries']} searches s",
                        "RssAnon after search MB", "RssFile after search MB", "peak RSS MB (VmHWM)"], rows) +
            f"\n\nFlat index file {big['index_file_mb']:,.0f} MB. The file was just written (page cache warm for both). "
            "A Flat search reads every vector, so after searching the mapped file is resident as RssFile (shared, "
            "evictable page cache) instead of RssAnon.")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "baseline":
            C.emit_worker_result(worker_baseline())
        elif mode == "build":
            C.emit_worker_result(worker_build(*rest))
        elif mode == "search":
            C.emit_worker_result(worker_search(rest[0], int(rest[1]), int(rest[2])))
        elif mode == "open":
            C.emit_worker_result(worker_open(rest[0], rest[1], int(rest[2]), int(rest[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=None, help="memory comparison sizes (default 20000,200000; quick 5000,50000)")
    ap.add_argument("--scaling", default=None,
                    help="scaling sizes (default 100000,1000000,3000000; quick 10000,100000)")
    ap.add_argument("--open-rounds", type=int, default=2,
                    help="mmap vs read open rounds at the largest scaling size (0: skip)")
    ap.add_argument("--factory", default="Flat")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    q = args.quick
    sizes = [int(x) for x in (args.sizes or ("5000,50000" if q else "20000,200000")).split(",")]
    scaling = [int(x) for x in (args.scaling or ("10000,100000" if q else "100000,1000000,3000000")).split(",")]
    started = time.perf_counter()
    C.vital10k()
    workdir = Path(tempfile.mkdtemp(prefix="bench-mem-", dir=args.workdir))
    try:
        base = C.run_worker(Path(__file__), ["baseline"])
        baseline_peak = base["peak_rss_mb"]
        cache: dict[int, dict[str, Any]] = {}
        for n in sorted(set(sizes) | set(scaling)):
            cache[n] = measure(n, workdir, args.factory, baseline_peak, args.queries, args.k, search=n in scaling,
                               growing=n in sizes, open_rounds=args.open_rounds if n == max(scaling) else 0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    mem_rows = [cache[n] for n in sizes]
    small, large = mem_rows[0], mem_rows[-1]
    peak_diff = large["build_peak_mb"] - small["build_peak_mb"]
    index_diff = large["flat_index_mb"] - small["flat_index_mb"]
    pre_diff = large["growing_build_peak_mb"] - small["growing_build_peak_mb"]
    sc_rows = [cache[n] for n in scaling]
    res = {
        "encoder": "fake (deterministic random unit vectors, dim 384)", "factory": args.factory,
        "synthetic_corpus": f"{WORDS_PER_DOC}-word docs ({PASSAGES_PER_DOC} passages each), vital10k unigram words, seed 0",
        "baseline_peak_mb": baseline_peak,
        "memory": {"rows": mem_rows, "difference": {
            "small": small["passages"], "large": large["passages"], "peak_diff_mb": peak_diff,
            "index_diff_mb": index_diff, "explained_fraction": index_diff / peak_diff if peak_diff else float("nan"),
            "residual_per_passage_bytes": (peak_diff - index_diff) * 2**20 / (large["passages"] - small["passages"]),
            "growing_peak_diff_mb": pre_diff,
            "growing_explained_fraction": index_diff / pre_diff if pre_diff else float("nan"),
            "growing_residual_per_passage_bytes": (pre_diff - index_diff) * 2**20 / (large["passages"] - small["passages"])}},
        "scaling": {"rows": sc_rows, "queries": args.queries, "k": args.k,
                    "time_per_passage_ratio": sc_rows[-1]["us_per_passage_build"] / sc_rows[0]["us_per_passage_build"]},
    }
    C.write_result(NAME, q, res, tables(res), args.out, started)


if __name__ == "__main__":
    main()
