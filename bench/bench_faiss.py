"""Benchmark: Faiss Flat vs HNSW vs IVF (Flat lists, SQ8, PQ, PQ fast-scan, with/without exact re-ranking).

Data: synthetic 384-d unit vectors with structure, NOT uniform random (on uniform random points
nearest neighbours are barely nearer than anything else and ANN comparisons mean nothing). The
generator (seed 0) is a two-level Gaussian mixture on the sphere with a low-intrinsic-dimension
noise:
  * `topics` topic directions t uniform on the sphere; each of `topics x subclusters` cluster
    centres is normalize(t + 0.8 u), u a random unit vector (clusters of one topic are near each
    other, as in real corpora);
  * cluster sizes are log-normal (sigma 1): a few big clusters, many small ones;
  * a point is normalize(c + beta * R (sqrt(s) * z)), z ~ N(0, I), s_i proportional to 1 / i (a
    power-law spectrum, effective dimension about 26 of 384), R one fixed random rotation (so no
    axis is special, which matters for PQ), beta = 1;
  * queries (default 1,000) are fresh draws from the same mixture.
The achieved statistics (query to its 1st / 10th neighbour cosine, to a random vector) are reported
so they can be compared with real embeddings (MiniLM on Wikipedia passages: about 0.6-0.8 to the
nearest passages).

Every index is built from a Faiss factory string with METRIC_INNER_PRODUCT, as the toolkit's
FaissIndex does, trained on `--train` vectors (the toolkit's max_train_vectors default, 262,144).
The IVF variants share one trained coarse quantizer and one coarse assignment of the base vectors
(computed once, `add_preassigned`); their build time is reported as shared + own. Search: all
queries in one batch, k=10, best of `--repeats`; recall@10 = |top-10 found & exact top-10| / 10
against Flat. QPS ratios use a Flat search of the same query batch timed right before each index's
sweep, so each ratio compares two measurements taken under the same machine load (a smaller probe
batch would make Flat look slower per query: its GEMM is less efficient). Index
size = bytes of `faiss.write_index`. The sweep (nprobe, efSearch, refine k_factor) finds the
settings with recall@10 >= `--target-recall` at >= `--target-speedup` x Flat's QPS; the smallest
and the fastest such setting are reported as the recommendation.

Usage: python bench/bench_faiss.py [--quick] [--n 1000000] [--skip HNSW32]
Writes bench/results/faiss.json (faiss_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import faiss  # noqa: E402
import numpy as np  # noqa: E402

NAME = "faiss"


# ------------------------------------------------------------------ data

def generate(n: int, nq: int, d: int, topics: int, subclusters: int, seed: int = 0,
             block: int = 100_000) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rot = rot.astype(np.float32)
    spectrum = 1.0 / np.arange(1, d + 1)
    spectrum /= spectrum.sum()
    scale = np.sqrt(spectrum).astype(np.float32)
    t = rng.standard_normal((topics, d)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    u = rng.standard_normal((topics * subclusters, d)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    centres = np.repeat(t, subclusters, axis=0) + 0.8 * u
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    w = rng.lognormal(0.0, 1.0, size=len(centres))
    w /= w.sum()
    beta = 1.0

    def draw(m: int, r: np.random.Generator) -> np.ndarray:
        out = np.empty((m, d), dtype=np.float32)
        for s in range(0, m, block):
            k = min(block, m - s)
            cl = r.choice(len(centres), size=k, p=w)
            z = r.standard_normal((k, d), dtype=np.float32) * scale
            x = centres[cl] + beta * (z @ rot.T)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[s:s + k] = x
        return out

    xb = draw(n, np.random.default_rng(seed + 1))
    xq = draw(nq, np.random.default_rng(seed + 2))
    eff_dim = float(spectrum.sum() ** 2 / (spectrum ** 2).sum())
    return xb, xq, {"clusters": len(centres), "topics": topics, "subclusters": subclusters, "beta": beta,
                    "noise_effective_dim": eff_dim}


# ------------------------------------------------------------------ helpers

def index_bytes(index: faiss.Index) -> int:
    with tempfile.NamedTemporaryFile(suffix=".faiss", delete=True) as fh:
        faiss.write_index(index, fh.name)
        return os.path.getsize(fh.name)


def timed_search(index: faiss.Index, xq: np.ndarray, k: int, repeats: int,
                 min_total_s: float = 0.5) -> tuple[float, np.ndarray]:
    """Best of `repeats` runs, repeating fast ones until `min_total_s` has been spent (at most 20 runs)."""
    best, ids, spent, runs = float("inf"), None, 0.0, 0
    while runs < repeats or (spent < min_total_s and runs < 20):
        t0 = time.perf_counter()
        _, ids = index.search(xq, k)
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best, ids


def recall_at(ids: np.ndarray, gt: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(ids, gt)]))


def set_params(index: faiss.Index, nprobe: int | None = None, ef: int | None = None, k_factor: int | None = None) -> None:
    if k_factor is not None:
        faiss.downcast_index(index).k_factor = k_factor
    if nprobe is not None:
        faiss.extract_index_ivf(index).nprobe = nprobe
    if ef is not None:
        base = faiss.downcast_index(index)
        base = faiss.downcast_index(base.base_index) if hasattr(base, "base_index") else base
        base.hnsw.efSearch = ef


# ------------------------------------------------------------------ main

def run(args) -> dict[str, Any]:
    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    xb, xq, gen = generate(args.n, args.nq, args.d, args.topics, args.subclusters)
    gen["generate_s"] = time.perf_counter() - t0
    print(f"  generated {args.n:,} x {args.d} + {args.nq} queries in {gen['generate_s']:.0f}s", flush=True)
    k = args.k
    flat = faiss.index_factory(args.d, "Flat", faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    flat.add(xb)
    flat_add_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gt_scores, gt = flat.search(xq, max(k, 10))
    flat_full_s = time.perf_counter() - t0
    probe = xq if args.probe >= len(xq) else xq[:args.probe]
    rand = xb[np.random.default_rng(3).choice(len(xb), size=min(1000, len(xb)), replace=False)]
    gen.update(q_nn1_cos=float(gt_scores[:, 0].mean()), q_nn10_cos=float(gt_scores[:, 9].mean()),
               q_random_cos=float((xq[:200] @ rand.T).mean()), q_random_cos_p99=float(np.percentile(xq[:200] @ rand.T, 99)))
    print(f"  Flat ground truth: {flat_full_s:.0f}s for {args.nq} queries; nn1 cos {gen['q_nn1_cos']:.3f}, "
          f"nn10 {gen['q_nn10_cos']:.3f}, random {gen['q_random_cos']:.3f}", flush=True)
    flat_probes: list[float] = []

    def flat_probe() -> float:
        s, _ = timed_search(flat, probe, k, 1)
        flat_probes.append(len(probe) / s)
        return len(probe) / s

    rows: list[dict[str, Any]] = []
    flat_bytes = index_bytes(flat)
    q0 = flat_probe()
    rows.append({"index": "Flat", "param": "-", "build_s": flat_add_s, "bytes": flat_bytes,
                 "qps": args.nq / flat_full_s, "flat_qps_probe": q0, "speedup": 1.0, "recall@10": 1.0})

    rng = np.random.default_rng(0)
    train = xb[np.sort(rng.choice(len(xb), size=min(args.train, len(xb)), replace=False))]
    nlist = args.nlist
    specs = [s.replace("{nlist}", str(nlist)) for s in args.indexes.split(";") if s.strip()]
    shared: dict[str, Any] = {}

    def coarse() -> tuple[np.ndarray, np.ndarray, float, float]:
        if not shared:
            q = faiss.index_factory(args.d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            t = time.perf_counter()
            q.train(train)
            train_s = time.perf_counter() - t
            cq = faiss.extract_index_ivf(q).quantizer
            centroids = cq.reconstruct_n(0, cq.ntotal)
            t = time.perf_counter()
            _, assign = cq.search(xb, 1)
            assign_s = time.perf_counter() - t
            shared.update(centroids=centroids, assign=assign.ravel().astype(np.int64), train_s=train_s,
                          assign_s=assign_s)
            print(f"  coarse quantizer IVF{nlist}: train {train_s:.0f}s on {len(train):,}, assign {assign_s:.0f}s",
                  flush=True)
        return shared["centroids"], shared["assign"], shared["train_s"], shared["assign_s"]

    built: dict[str, tuple[faiss.Index, dict[str, Any]]] = {}
    for spec in specs:
        if any(spec.startswith(s) for s in args.skip):
            continue
        t_spec = time.perf_counter()
        info: dict[str, Any] = {"index": spec}
        base_spec = spec[:-len(",RFlat")] if spec.endswith(",RFlat") else None
        if base_spec in built:
            # same index as the factory string builds, without training the codec twice: exact re-ranking
            # (IndexRefineFlat) over the already built base index
            base, base_info = built[base_spec]
            t = time.perf_counter()
            index = faiss.IndexRefineFlat(base, faiss.swig_ptr(xb))
            index.referenced_objects = [base]
            info.update(build_s=base_info["build_s"] + time.perf_counter() - t, built_as=f"IndexRefineFlat({base_spec})")
        elif "IVF" in spec:
            index = faiss.index_factory(args.d, spec, faiss.METRIC_INNER_PRODUCT)
            centroids, assign, ctrain_s, cassign_s = coarse()
            ivf = faiss.extract_index_ivf(index)
            ivf.quantizer.add(centroids)  # trained quantizer: IVF.train only trains the codec now
            t = time.perf_counter()
            index.train(train)
            own_train_s = time.perf_counter() - t
            t = time.perf_counter()
            top = faiss.downcast_index(index)
            if "fs" in spec.split(",")[1] or hasattr(top, "refine_index"):
                # fast-scan lists pack codes in blocks: add_core would store them unpacked (garbage results)
                index.add(xb)
                info["preassigned"] = False
            else:
                from faiss.contrib.ivf_tools import add_preassigned
                add_preassigned(ivf, xb, assign)
                info["preassigned"] = True
            own_add_s = time.perf_counter() - t
            info.update(build_s=ctrain_s + (0 if not info["preassigned"] else cassign_s) + own_train_s + own_add_s,
                        coarse_train_s=ctrain_s, coarse_assign_s=cassign_s if info["preassigned"] else None,
                        own_train_s=own_train_s, own_add_s=own_add_s)
        else:
            index = faiss.index_factory(args.d, spec, faiss.METRIC_INNER_PRODUCT)
            t = time.perf_counter()
            if not index.is_trained:
                index.train(train)
            index.add(xb)
            info["build_s"] = time.perf_counter() - t
        if any(s_ == spec + ",RFlat" for s_ in specs):
            built[spec] = (index, info)
        info["bytes"] = index_bytes(index)
        print(f"  {spec}: built in {info['build_s']:.0f}s, {info['bytes'] / 2**20:.0f} MB", flush=True)
        # sweep
        if "HNSW" in spec:
            sweep = [{"ef": e} for e in args.ef]
        elif "IVF" in spec:
            kfs = args.k_factor if "RFlat" in spec or "Refine" in spec else [None]
            sweep = [{"nprobe": p, "k_factor": kf} for kf in kfs for p in args.nprobe if p <= nlist]
        else:
            sweep = [{}]
        flat_qps = flat_probe()  # same query batch as the sweep, right before it: same load, same GEMM shape
        points = []
        done_groups: set = set()
        for params in sweep:
            group = params.get("k_factor")
            if group in done_groups:  # recall saturated or slower than Flat: larger nprobe/ef only slows down
                continue
            set_params(index, params.get("nprobe"), params.get("ef"), params.get("k_factor"))
            s, ids = timed_search(index, xq, k, args.repeats)
            rec = recall_at(ids, gt, k)
            points.append({"params": params, "search_s": s, "qps": args.nq / s, "recall@10": rec})
            if rec >= args.stop_recall or args.nq / s < flat_qps:
                done_groups.add(group)
        for p in points:
            label = ", ".join(f"{k_}={v}" for k_, v in p["params"].items() if v is not None) or "-"
            rows.append({**{k_: v for k_, v in info.items()}, "param": label, "qps": p["qps"],
                         "flat_qps_probe": flat_qps, "speedup": p["qps"] / flat_qps, "recall@10": p["recall@10"]})
        print(f"  {spec}: sweep of {len(sweep)} settings in {time.perf_counter() - t_spec:.0f}s total; "
              f"best recall {max(p['recall@10'] for p in points):.3f}", flush=True)
        if spec not in built:
            del index
    target = [r for r in rows if r["recall@10"] >= args.target_recall and r["speedup"] >= args.target_speedup
              and r["index"] != "Flat"]
    rec = {}
    if target:
        fastest = max(target, key=lambda r: r["speedup"])
        smallest = min(target, key=lambda r: (r["bytes"], -r["speedup"]))
        rec = {"fastest": {k_: fastest[k_] for k_ in ("index", "param", "speedup", "recall@10", "bytes", "build_s")},
               "smallest": {k_: smallest[k_] for k_ in ("index", "param", "speedup", "recall@10", "bytes", "build_s")}}
    return {"n": args.n, "d": args.d, "nq": args.nq, "k": k, "threads": args.threads, "nlist": nlist,
            "train_vectors": len(train), "generator": gen, "flat_qps_probes": flat_probes,
            "flat_probe_queries": len(probe), "targets": {"recall@10": args.target_recall, "speedup": args.target_speedup},
            "rows": rows, "recommended": rec, "goal_met": bool(target)}


def tables(res: dict[str, Any]) -> list[str]:
    g = res["generator"]
    rows = [[r["index"], r["param"], r["build_s"], r["bytes"] / 2**20, r["qps"], r["speedup"], r["recall@10"],
             "yes" if (r["recall@10"] >= res["targets"]["recall@10"] and r["speedup"] >= res["targets"]["speedup"]
                       and r["index"] != "Flat") else ""] for r in res["rows"]]
    out = ["### Faiss on {:,} synthetic clustered 384-d unit vectors, {} queries, k=10, {} threads\n\n".format(
        res["n"], res["nq"], res["threads"]) +
        C.md_table(["index", "search param", "build s", "size MB", "QPS", "QPS / Flat", "recall@10",
                    f">= {res['targets']['recall@10']} at >= {res['targets']['speedup']:g}x"], rows) +
        f"\n\nData: {g['clusters']:,} clusters in {g['topics']} topics, power-law noise (effective dim "
        f"{g['noise_effective_dim']:.0f}); query cosine to its 1st / 10th neighbour {g['q_nn1_cos']:.3f} / "
        f"{g['q_nn10_cos']:.3f}, to a random vector {g['q_random_cos']:.3f}. IVF lists: {res['nlist']}, trained on "
        f"{res['train_vectors']:,} vectors; IVF build time = shared coarse training + assignment + own codec "
        f"training + add. QPS / Flat uses a Flat search of {res['flat_probe_queries']} queries timed right before each "
        f"index's sweep (Flat probe QPS ranged {min(res['flat_qps_probes']):.1f}-{max(res['flat_qps_probes']):.1f})."]
    if res["recommended"]:
        f, s = res["recommended"]["fastest"], res["recommended"]["smallest"]
        out.append(f"Recommended (recall@10 >= {res['targets']['recall@10']} at >= {res['targets']['speedup']:g}x Flat): "
                   f"fastest `{f['index']}` with {f['param']} ({f['speedup']:.0f}x, recall {f['recall@10']:.3f}, "
                   f"{f['bytes'] / 2**20:.0f} MB); smallest `{s['index']}` with {s['param']} ({s['speedup']:.0f}x, recall "
                   f"{s['recall@10']:.3f}, {s['bytes'] / 2**20:.0f} MB).")
    else:
        out.append("No setting reached the recall and speed targets together.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100k vectors, 200 queries, IVF1024")
    ap.add_argument("--n", type=int, default=None, help="base vectors (default 1,000,000; quick 100,000)")
    ap.add_argument("--nq", type=int, default=None, help="queries (default 1000; quick 200)")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--topics", type=int, default=None, help="default n / 10,000 (at least 10)")
    ap.add_argument("--subclusters", type=int, default=10)
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4096; quick 1024)")
    ap.add_argument("--train", type=int, default=262_144, help="training vectors (toolkit max_train_vectors)")
    ap.add_argument("--indexes", default="HNSW32;IVF{nlist},Flat;IVF{nlist},SQ8;IVF{nlist},PQ48;IVF{nlist},PQ48,RFlat;"
                                         "IVF{nlist},PQ96x4fs;IVF{nlist},PQ96x4fs,RFlat",
                    help="';'-separated factory strings ({nlist} is substituted); Flat is always the reference")
    ap.add_argument("--skip", default="", help="comma list of factory prefixes to skip (e.g. HNSW32)")
    ap.add_argument("--nprobe", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--ef", default="16,32,64,128,256")
    ap.add_argument("--k-factor", default="4,16,32", help="re-ranking factor for the RFlat indexes")
    ap.add_argument("--stop-recall", type=float, default=0.995,
                    help="stop raising nprobe/efSearch once recall@10 reaches this")
    ap.add_argument("--threads", type=int, default=None, help="Faiss OpenMP threads (default: all cores)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--probe", type=int, default=None,
                    help="queries in each Flat probe (default: all; fewer queries make Flat look slower per query)")
    ap.add_argument("--target-recall", type=float, default=0.98)
    ap.add_argument("--target-speedup", type=float, default=10.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    q = args.quick
    args.n = args.n or (100_000 if q else 1_000_000)
    args.nq = args.nq or (200 if q else 1000)
    args.nlist = args.nlist or (1024 if q else 4096)
    args.topics = args.topics or max(10, args.n // 10_000)
    args.threads = args.threads or faiss.omp_get_max_threads()
    args.probe = args.probe or args.nq
    args.nprobe = [int(x) for x in args.nprobe.split(",")]
    args.ef = [int(x) for x in args.ef.split(",")]
    args.k_factor = [int(x) for x in args.k_factor.split(",")]
    args.skip = [s for s in args.skip.split(",") if s]
    started = time.perf_counter()
    res = run(args)
    res["versions"] = C.versions("faiss-cpu", "numpy")
    C.write_result(NAME, q, res, tables(res), args.out, started)


if __name__ == "__main__":
    main()
