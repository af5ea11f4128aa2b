"""Benchmark: peak memory of corpus validation, `Corpus.load` and a corpus transform, at two corpus sizes.

The claim (issue 17): reading a corpus is memory-flat in its size, so ten times the documents raise the
peak memory of (a) `validate_corpus`, (b) `Corpus.load` + 10,000 random `get(id)` + one full iteration and
(c) one corpus transform (`perturb`: every document rewritten, file order shuffled) by less than 10%.
Compared with the code the toolkit had before (a copy kept below: `old_validate`, `OldCorpus`, `old_perturb`:
a dict of every id, a list of every Document, a list of every row), which is cheap to reproduce. The two
transforms' outputs are compared byte for byte (`outputs_identical`).

Each measurement runs in a fresh process (`--worker`): it imports what it needs, records its RSS (VmRSS) as the
baseline, does the work, and reports its peak RSS (VmHWM) and, at the end, RssAnon / RssFile.

Synthetic corpus: documents of 100-300 words (uniform) drawn from 5,000 made-up words (seed 0), in sentences of
8-20 words (capitalised, full stop) and paragraphs of 2-5 sentences; ids "doc-N", titles "Synthetic document N".
Sizes are in passages (100-word windows, stride 80, as `split_passages` cuts them: about 2.8 a document);
the corpus is generated into a temp folder until it holds that many.

Usage: python bench/bench_corpus_memory.py [--quick] [--sizes 100000,1000000] [--gets 10000] [--impls new,old]
Writes bench/results/corpus_memory.json (corpus_memory_quick.json with --quick).
Not part of the test suite: `make bench` / `bench/run_all.py` run it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import numpy as np  # noqa: E402

NAME = "corpus_memory"
VOCAB = 5000
WINDOW, STRIDE = 100, 80
STEPS = ("validate", "load", "transform")


# ------------------------------------------------------------------ synthetic corpus

def passages_of(words: int) -> int:
    starts = list(range(0, max(words - WINDOW, 0) + 1, STRIDE))
    return len(starts) + (starts[-1] + WINDOW < words)


def generate(path: Path, n_passages: int, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(3, 11, VOCAB)]
    docs = passages = 0
    with open(path, "w", encoding="utf-8") as fh:
        while passages < n_passages:
            n_words = int(rng.integers(100, 301))
            words = [vocab[i] for i in rng.integers(0, VOCAB, n_words)]
            paragraphs, sentence, paragraph = [], [], []
            sentence_len, paragraph_len = int(rng.integers(8, 21)), int(rng.integers(2, 6))
            for w in words:
                sentence.append(w)
                if len(sentence) == sentence_len:
                    paragraph.append(" ".join([sentence[0].capitalize(), *sentence[1:]]) + ".")
                    sentence, sentence_len = [], int(rng.integers(8, 21))
                    if len(paragraph) == paragraph_len:
                        paragraphs.append(" ".join(paragraph))
                        paragraph, paragraph_len = [], int(rng.integers(2, 6))
            if sentence:
                paragraph.append(" ".join([sentence[0].capitalize(), *sentence[1:]]) + ".")
            if paragraph:
                paragraphs.append(" ".join(paragraph))
            fh.write(json.dumps({"id": f"doc-{docs}", "title": f"Synthetic document {docs}",
                                 "text": "\n\n".join(paragraphs)}) + "\n")
            docs += 1
            passages += passages_of(n_words)
    return {"documents": docs, "passages": passages, "bytes": path.stat().st_size}


# ------------------------------------------------------------------ the code before issue 17 item 1

def old_validate(path: Path) -> int:
    """core/corpus.py's validate_corpus before: a dict of every id -> line."""
    from core.corpus import iter_documents
    from core.errors import InputError

    first_line: dict[str, int] = {}
    for line, doc in iter_documents(path):
        if doc.id in first_line:
            raise InputError(f"duplicate id {doc.id!r} (first seen on line {first_line[doc.id]})", path, line, "id")
        first_line[doc.id] = line
    return len(first_line)


class OldCorpus:
    """core/corpus.py's Corpus.load before: a list of every Document and a dict id -> row."""

    def __init__(self, path: Path) -> None:
        from core.corpus import file_checksum, iter_documents

        self.documents = [doc for _, doc in iter_documents(path)]
        self._by_id = {d.id: i for i, d in enumerate(self.documents)}
        self.checksum = file_checksum(path)

    def get(self, doc_id: str) -> Any:
        return self.documents[self._by_id[doc_id]]

    def __iter__(self) -> Any:
        return iter(self.documents)


def old_perturb(corpus: Path, out: Path, seed: int = 0) -> None:
    """eval/corpus_variants.py's perturb before (defaults): every row in a list, shuffled, written at the end."""
    from core.corpus import iter_documents
    from core.io import write_jsonl
    from eval.corpus_variants import _perturb_text, _rng, split_paragraphs, split_sentences

    docs = [doc.to_json() for _, doc in iter_documents(corpus)]
    out_docs = []
    for doc in docs:
        before = Counter(split_sentences(doc["text"]))
        text = _perturb_text(doc["text"], _rng(seed, doc["id"]), True, True, True)
        if Counter(split_sentences(text)) != before:
            text = "\n\n".join(s for p in split_paragraphs(text) for s in split_sentences(p))
            if Counter(split_sentences(text)) != before:
                text = doc["text"]
        out_docs.append({**doc, "text": text})
    random.Random(seed).shuffle(out_docs)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "corpus.jsonl", out_docs)


# ------------------------------------------------------------------ workers (fresh processes)

def _status() -> dict[str, float]:
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


def worker(step: str, impl: str, corpus: str, n_docs: int, gets: int, out: str) -> dict[str, Any]:
    import core.corpus
    import eval.corpus_variants  # noqa: F401  (imports are part of the baseline)

    path = Path(corpus)
    ids = [f"doc-{i}" for i in np.random.default_rng(0).integers(0, n_docs, gets).tolist()]
    start = _status()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    info: dict[str, Any] = {}
    if step == "validate":
        info["documents"] = core.corpus.validate_corpus(path) if impl == "new" else old_validate(path)
    elif step == "load":
        loaded: Any = core.corpus.Corpus.load(path) if impl == "new" else OldCorpus(path)
        info["load_s"] = time.perf_counter() - t0
        info["after_load_mb"] = _status()["VmRSS"]
        t1 = time.perf_counter()
        info["get_chars"] = sum(len(loaded.get(i).text) for i in ids)
        info["get_us"] = (time.perf_counter() - t1) / max(gets, 1) * 1e6
        t1 = time.perf_counter()
        info["iterated"] = sum(1 for _ in loaded)
        info["iterate_s"] = time.perf_counter() - t1
    elif step == "transform":
        if impl == "new":
            eval.corpus_variants.perturb(path, Path(out), seed=0)
        else:
            old_perturb(path, Path(out), seed=0)
        with open(Path(out) / "corpus.jsonl", "rb") as fh:
            info["output_sha256"] = hashlib.file_digest(fh, "sha256").hexdigest()
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    end = _status()
    return {"step": step, "impl": impl, "seconds": seconds, "cpu_s": cpu, "baseline_mb": start["VmRSS"],
            "peak_mb": end["VmHWM"], "peak_minus_baseline_mb": end["VmHWM"] - start["VmRSS"],
            "end_anon_mb": end["RssAnon"], "end_file_mb": end["RssFile"], **info}


# ------------------------------------------------------------------ driver

def tables(res: dict[str, Any]) -> list[str]:
    rows = [[r["impl"], r["passages"], r["documents"], r["corpus_mb"], r["step"], r["seconds"], r["baseline_mb"],
             r["peak_mb"], r["peak_minus_baseline_mb"]] for r in res["rows"]]
    main = C.md_table(["code", "passages", "documents", "corpus MB", "step", "s", "baseline MB", "peak MB",
                       "peak - baseline MB"], rows)
    growth = [[g["impl"], g["step"], g["small_mb"], g["large_mb"], g["growth_pct"], g["meets_10pct"],
               g["above_baseline_small_mb"], g["above_baseline_large_mb"]] for g in res["growth"]]
    sizes = res["sizes"]
    grow = C.md_table(["code", "step", f"peak at {sizes[0]:,} MB", f"peak at {sizes[-1]:,} MB", "growth %",
                       "< 10 %", "peak - baseline, small MB", "peak - baseline, large MB"], growth)
    return [f"#### Corpus reading peak memory (validate; load + {res['gets']:,} get + one iteration; perturb), "
            "fresh process per step\n\n" + main,
            f"#### Growth of the peak RSS from {sizes[0]:,} to {sizes[-1]:,} passages' worth of documents\n\n" + grow]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        step, impl, corpus, n_docs, gets, out = sys.argv[2:8]
        C.emit_worker_result(worker(step, impl, corpus, int(n_docs), int(gets), out))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 and 100,000 passages")
    ap.add_argument("--sizes", default=None, help="passage counts (default 100000,1000000; quick 10000,100000)")
    ap.add_argument("--gets", type=int, default=10000, help="random get(id) after loading (default 10000)")
    ap.add_argument("--impls", default="new,old", help="code to measure (default new,old; old = before issue 17)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = [int(x) for x in (args.sizes or ("10000,100000" if args.quick else "100000,1000000")).split(",")]
    impls = [x for x in args.impls.split(",") if x]
    started = time.perf_counter()
    rows = []
    identical = []
    for n in sizes:
        folder = Path(tempfile.mkdtemp(prefix="bench-corpus-", dir=args.workdir))
        try:
            corpus = folder / "corpus.jsonl"
            made = generate(corpus, n)
            print(f"{n:,} passages: {made['documents']:,} documents, {made['bytes'] / 2**20:.0f} MB", flush=True)
            shas = {}
            for step in STEPS:
                for impl in impls:
                    out = folder / f"out-{impl}"
                    r = C.run_worker(Path(__file__), [step, impl, str(corpus), str(made["documents"]),
                                                      str(args.gets), str(out)])
                    shutil.rmtree(out, ignore_errors=True)
                    if "output_sha256" in r:
                        shas[impl] = r["output_sha256"]
                    rows.append({**r, "passages": n, "documents": made["documents"],
                                 "corpus_mb": made["bytes"] / 2**20})
                    print(f"  {step} {impl}: peak {r['peak_mb']:.1f} MB (+{r['peak_minus_baseline_mb']:.1f}) "
                          f"in {r['seconds']:.1f}s", flush=True)
            if len(shas) == 2:
                identical.append(len(set(shas.values())) == 1)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    growth = []
    for impl in impls:
        for step in STEPS:
            small = next(r for r in rows if r["impl"] == impl and r["step"] == step and r["passages"] == sizes[0])
            large = next(r for r in rows if r["impl"] == impl and r["step"] == step and r["passages"] == sizes[-1])
            a, b = small["peak_mb"], large["peak_mb"]
            growth.append({"impl": impl, "step": step, "small_mb": a, "large_mb": b, "ratio": b / a,
                           "growth_pct": 100 * (b / a - 1), "meets_10pct": b / a < 1.10,
                           "above_baseline_small_mb": small["peak_minus_baseline_mb"],
                           "above_baseline_large_mb": large["peak_minus_baseline_mb"]})
    res = {"sizes": sizes, "gets": args.gets, "transform": "perturb (defaults, seed 0)",
           "synthetic_corpus": "100-300-word documents of 5,000 made-up words in sentences and paragraphs, seed 0",
           "rows": rows, "growth": growth, "outputs_identical": identical,
           "goal": "peak RSS grows by less than 10% from the smaller to the larger size (new code)",
           "goal_met": all(g["meets_10pct"] for g in growth if g["impl"] == "new")}
    C.write_result(NAME, args.quick, res, tables(res), args.out, started)


if __name__ == "__main__":
    main()
