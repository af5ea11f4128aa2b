"""Benchmark: peak memory of the passage store (index/passages.py), building and opening, at two sizes.

The claim (issue 17): the passage store's memory is flat in the corpus size, so ten times the passages
raise the peak memory of building it, and of opening it and fetching passages, by less than 10%.
Compared with the format-1 store that the toolkit wrote before (a copy of its code is kept below as
`OldWriter` / `OldStore`: Python lists of every offset, doc row and document, and `docs.json` written
and read whole).

Each measurement runs in a fresh process (`--worker`): it imports what it needs, records its RSS
(VmRSS) as the baseline, does the work, and reports its peak RSS (VmHWM, per address space) and, at the
end, the split of the current RSS into anonymous memory (RssAnon: what the process allocated) and
file-backed mapped pages (RssFile: pages of the memory-mapped arrays the reads touched, reclaimable
page cache shared between processes; for a store opened by 8 Ray actors the kernel keeps one copy).

* build: `write_passage_store` fed by a generator of synthetic passages (nothing of the corpus is held);
* open + fetch: `PassageStore(folder)` then `get(pid)` and `doc_of(pid)` for `--fetch` random passage
  ids (seed 0), as a retriever does for its hits.

Synthetic corpus: documents of 10 passages, each passage 100 words drawn uniformly from 5,000 made-up
words (seed 0); ids "doc-N", titles "Synthetic document N". Sizes are in passages.

Usage: python bench/bench_passage_store_memory.py [--quick] [--sizes 100000,1000000] [--fetch 10000]
Writes bench/results/passage_store_memory.json (passage_store_memory_quick.json with --quick).
Not part of the test suite: `make bench` / `bench/run_all.py` run it.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import numpy as np  # noqa: E402

NAME = "passage_store_memory"
WORDS = 100
PASSAGES_PER_DOC = 10
VOCAB = 5000


# ------------------------------------------------------------------ synthetic corpus (a stream)

def synthetic_passages(n: int, seed: int = 0) -> Iterator[Any]:
    from core.corpus import Passage

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(3, 11, VOCAB)]
    pid = 0
    while pid < n:
        doc = pid // PASSAGES_PER_DOC
        count = min(PASSAGES_PER_DOC, n - pid)
        words = rng.integers(0, VOCAB, size=(count, WORDS))
        for row in words:
            yield Passage(pid, f"doc-{doc}", f"Synthetic document {doc}", " ".join([vocab[i] for i in row]))
            pid += 1


# ------------------------------------------------------------------ the format-1 store, as the toolkit had it

class OldWriter:
    """index/passages.py's writer before format 2 (commit 2ba15ba): lists of every offset, row and document."""

    def __init__(self, folder: Path) -> None:
        from core.io import atomic_file
        self.folder = folder
        self._ctx = atomic_file(folder / "passages.jsonl", "wb")
        self._fh = self._ctx.__enter__()
        self._offsets: list[int] = []
        self._doc_rows: list[int] = []
        self._docs: list[dict] = []
        self._doc_index: dict[str, int] = {}
        self._pos = 0

    def add(self, passage: Any) -> None:
        row = self._doc_index.get(passage.doc_id)
        if row is None:
            row = self._doc_index[passage.doc_id] = len(self._docs)
            self._docs.append({"id": passage.doc_id, "title": passage.title, "domain": passage.domain})
        line = (json.dumps({"pid": passage.pid, "doc_id": passage.doc_id, "title": passage.title,
                            "text": passage.text, "domain": passage.domain}, ensure_ascii=False) + "\n").encode()
        self._offsets.append(self._pos)
        self._doc_rows.append(row)
        self._fh.write(line)
        self._pos += len(line)

    def close(self) -> dict[str, int]:
        from core.io import write_json
        self._ctx.__exit__(None, None, None)
        np.save(self.folder / "passage_offsets.npy", np.asarray(self._offsets, dtype=np.int64))
        np.save(self.folder / "passage_docs.npy", np.asarray(self._doc_rows, dtype=np.int32))
        write_json(self.folder / "docs.json", self._docs)
        return {"passages": len(self._offsets), "documents": len(self._docs)}


class OldStore:
    """The format-1 reader: memory-mapped arrays, docs.json loaded whole (the checks of the time included)."""

    def __init__(self, folder: Path) -> None:
        from core.io import read_json
        self.offsets = np.load(folder / "passage_offsets.npy", mmap_mode="r")
        self.passage_docs = np.load(folder / "passage_docs.npy", mmap_mode="r")
        self.docs: list[dict] = read_json(folder / "docs.json")
        assert len(self.passage_docs) == len(self.offsets)
        assert int(np.max(self.passage_docs)) < len(self.docs)
        self._fh = open(folder / "passages.jsonl", "rb")

    def get(self, pid: int) -> dict:
        self._fh.seek(int(self.offsets[pid]))
        return json.loads(self._fh.readline())

    def doc_of(self, pid: int) -> dict:
        return self.docs[int(self.passage_docs[pid])]

    def close(self) -> None:
        self._fh.close()


def write_old(folder: Path, passages: Iterable[Any]) -> dict[str, int]:
    writer = OldWriter(folder)
    for passage in passages:
        writer.add(passage)
    return writer.close()


# ------------------------------------------------------------------ workers (fresh processes)

def _status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MB."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024.0
    return out


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_build(impl: str, n: int, folder: str) -> dict[str, Any]:
    from index.passages import write_passage_store

    write = write_passage_store if impl == "new" else write_old
    next(synthetic_passages(1))  # imports and the generator's own set-up are part of the baseline
    start_status = _status()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    counts = write(Path(folder), synthetic_passages(n))
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    end = _status()
    return {"impl": impl, "passages": n, "documents": counts["documents"], "build_s": seconds, "build_cpu_s": cpu,
            "baseline_mb": start_status["VmRSS"], "peak_mb": end["VmHWM"],
            "peak_minus_baseline_mb": end["VmHWM"] - start_status["VmRSS"],
            "end_anon_mb": end["RssAnon"], "end_file_mb": end["RssFile"],
            "store_mb": sum(p.stat().st_size for p in Path(folder).iterdir()) / 2**20}


def worker_open(impl: str, folder: str, fetch: int) -> dict[str, Any]:
    from index.passages import PassageStore

    ids = np.random.default_rng(0).integers(0, 1 << 62, fetch)
    start_status = _status()
    t0 = time.perf_counter()
    store: Any = PassageStore(folder) if impl == "new" else OldStore(Path(folder))
    open_s = time.perf_counter() - t0
    opened = _status()
    n = len(store.offsets)
    t0, cpu0 = time.perf_counter(), _cpu_s()
    chars = 0
    for pid in (ids % n).tolist():
        chars += len(store.get(pid)["text"]) + len(store.doc_of(pid)["id"])
    fetch_s, fetch_cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    end = _status()
    store.close()
    return {"impl": impl, "passages": n, "fetched": fetch, "open_s": open_s, "fetch_us": fetch_s / fetch * 1e6,
            "fetch_cpu_us": fetch_cpu / fetch * 1e6,
            "baseline_mb": start_status["VmRSS"], "peak_mb": end["VmHWM"],
            "peak_minus_baseline_mb": end["VmHWM"] - start_status["VmRSS"],
            "after_open_anon_mb": opened["RssAnon"], "after_open_file_mb": opened["RssFile"],
            "end_anon_mb": end["RssAnon"], "end_file_mb": end["RssFile"], "chars": chars}


# ------------------------------------------------------------------ driver

def tables(res: dict[str, Any]) -> list[str]:
    rows = []
    for r in res["rows"]:
        b, o = r["build"], r["open"]
        rows.append([r["impl"], r["passages"], b["documents"], b["store_mb"], b["build_cpu_s"], b["peak_mb"],
                     b["peak_minus_baseline_mb"], o["open_s"] * 1000, o["fetch_cpu_us"], o["peak_mb"],
                     o["peak_minus_baseline_mb"], o["end_anon_mb"], o["end_file_mb"]])
    main = C.md_table(["store", "passages", "documents", "files MB", "build CPU s", "build peak MB",
                       "build peak - baseline MB", "open ms", "fetch CPU us/passage", "open+fetch peak MB",
                       "open+fetch peak - baseline MB", "RssAnon at end MB", "RssFile at end MB"], rows)
    growth = [[g["impl"], g["what"], g["small_mb"], g["large_mb"], g["ratio"], g["growth_pct"],
               g["meets_10pct"]] for g in res["growth"]]
    sizes = res["sizes"]
    grow = C.md_table(["store", "peak RSS of", f"at {sizes[0]:,} MB", f"at {sizes[-1]:,} MB", "ratio", "growth %",
                       "< 10 %"], growth)
    return [f"#### Passage store peak memory, {res['fetch']:,} random fetches, fresh process per step\n\n" + main,
            f"#### Growth of the peak RSS from {sizes[0]:,} to {sizes[-1]:,} passages\n\n" + grow]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "build":
            C.emit_worker_result(worker_build(rest[0], int(rest[1]), rest[2]))
        elif mode == "open":
            C.emit_worker_result(worker_open(rest[0], rest[1], int(rest[2])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 and 100,000 passages")
    ap.add_argument("--sizes", default=None, help="passage counts (default 100000,1000000; quick 10000,100000)")
    ap.add_argument("--fetch", type=int, default=10000, help="random passages fetched after opening (default 10000)")
    ap.add_argument("--impls", default="new,old", help="stores to measure (default new,old; old = format 1)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = [int(x) for x in (args.sizes or ("10000,100000" if args.quick else "100000,1000000")).split(",")]
    impls = [x for x in args.impls.split(",") if x]
    started = time.perf_counter()
    rows = []
    for n in sizes:
        for impl in impls:
            folder = Path(tempfile.mkdtemp(prefix=f"bench-store-{impl}-", dir=args.workdir))
            try:
                build = C.run_worker(Path(__file__), ["build", impl, str(n), str(folder)])
                opened = C.run_worker(Path(__file__), ["open", impl, str(folder), str(args.fetch)])
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            rows.append({"impl": impl, "passages": n, "build": build, "open": opened})
            print(f"{impl} {n:,}: build peak {build['peak_mb']:.1f} MB in {build['build_s']:.1f}s, "
                  f"open+fetch peak {opened['peak_mb']:.1f} MB", flush=True)
    growth = []
    for impl in impls:
        small = next(r for r in rows if r["impl"] == impl and r["passages"] == sizes[0])
        large = next(r for r in rows if r["impl"] == impl and r["passages"] == sizes[-1])
        for what, key in (("build", "build"), ("open + fetch", "open")):
            a, b = small[key]["peak_mb"], large[key]["peak_mb"]
            growth.append({"impl": impl, "what": what, "small_mb": a, "large_mb": b, "ratio": b / a,
                           "growth_pct": 100 * (b / a - 1), "meets_10pct": b / a < 1.10})
    res = {"sizes": sizes, "fetch": args.fetch, "words_per_passage": WORDS, "passages_per_doc": PASSAGES_PER_DOC,
           "synthetic_corpus": f"{WORDS}-word passages of {VOCAB} made-up words, {PASSAGES_PER_DOC} per document, "
                               "seed 0", "rows": rows, "growth": growth,
           "goal": "peak RSS grows by less than 10% from the smaller to the larger size (format 2, 'new')",
           "goal_met": all(g["meets_10pct"] for g in growth if g["impl"] == "new")}
    C.write_result(NAME, args.quick, res, tables(res), args.out, started)


if __name__ == "__main__":
    main()
