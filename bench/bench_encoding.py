"""Benchmark: dense-build encoding throughput (toolkit vs plain sentence-transformers) and faster variants.

Part A (overhead): the toolkit's dense build (`build_dense_index` with the packaged MiniLM) against a
plain `SentenceTransformer.encode` of the same passages, same model object, same batch size. The
vital10k documents are shuffled (fixed seed) and cut into rounds of about `--round-passages`
passages; every round is a small corpus file that the toolkit builds an index from, and whose
passage texts plain ST encodes, the two alternating which goes first. Ratio = toolkit passages/s /
plain passages/s, where the toolkit's figure is the manifest's (`encode_s`: passage-table reads,
encoding, shard writes) and, separately, the whole build's wall time (splitting, passage table,
encoding, Faiss, manifest).

Part B (variants): plain fp32 ST against variants that may be faster. Throughput and quality come
from the same encodings: a reduced corpus = every vital10k document that is gold for a FanOutQA
dev question + a fixed random sample of `--sample-docs` other vital10k documents (seed 0). Each
variant puts the reduced corpus's passages (100 words, stride 80, the build's defaults) in its own
global batching order - for most, sentence-transformers' order inside one encode call (character
length, longest first), which is what the toolkit gets when it encodes a whole shard in one call -
and cuts it into chunks of `--chunk` passages; chunk c of every variant is encoded in turn, in an
order rotated per chunk, so all variants see the same machine load. Throughput ratio = plain time
/ variant time summed over the chunks both ran (the median per-chunk ratio is reported too).
Quality = KILT R-precision of the FanOutQA dev questions (queries encoded by the same variant)
with an exact inner-product index over the reduced corpus, documents ranked by their best passage
(as the toolkit's DenseRetriever does); also the mean/min cosine of each passage embedding to
plain's and the top-10 passage overlap with plain. Variants whose computation equals another's
(threads, batching order) are timed on `--exact-passages` passages only (evenly spaced chunks) and
inherit that variant's quality (the embedding difference is reported).

ONNX Runtime variants run only when the `onnx` package is importable (the export needs it); they
are reported as skipped otherwise.

Usage: python bench/bench_encoding.py [--quick] [--part a|b|all]
Writes bench/results/encoding.json (encoding_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (sets the offline env and sys.path)

os.environ.setdefault("TQDM_DISABLE", "1")  # the build's progress bars: noise in a benchmark log
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.corpus import Corpus, split_passages  # noqa: E402

NAME = "encoding"
DEFAULT_THREADS = torch.get_num_threads()


# ------------------------------------------------------------------ helpers

def load_plain():
    """The model the toolkit loads for `minilm`: a SentenceTransformer on CPU."""
    from retrievers.encoders import load_encoder
    enc = load_encoder("minilm", device="cpu")
    return enc


def set_threads(n: int | None) -> None:
    torch.set_num_threads(n or DEFAULT_THREADS)


def token_stats(model, texts: list[str], batch_size: int) -> dict[str, Any]:
    """Token length distribution and the padding ST's length sorting saves (analytic, no model run)."""
    lens = np.array([len(ids) for ids in model.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]])
    cap = int(model.max_seq_length)
    eff = np.minimum(lens, cap)

    def padded(order: np.ndarray) -> int:
        total = 0
        for s in range(0, len(order), batch_size):
            total += int(eff[order[s:s + batch_size]].max()) * len(order[s:s + batch_size])
        return total

    rng = np.random.default_rng(0)
    sorted_by_chars = np.argsort([-len(t) for t in texts], kind="stable")  # what ST does (character length)
    real = int(eff.sum())
    return {
        "passages": len(texts), "max_seq_length": cap,
        "tokens_p50": float(np.percentile(lens, 50)), "tokens_p90": float(np.percentile(lens, 90)),
        "tokens_p99": float(np.percentile(lens, 99)), "tokens_max": int(lens.max()),
        "frac_over_128": float((lens > 128).mean()), "frac_over_256": float((lens > 256).mean()),
        "padding_efficiency_sorted": real / padded(sorted_by_chars),
        "padding_efficiency_unsorted": real / padded(rng.permutation(len(texts))),
    }


# ------------------------------------------------------------------ part A: toolkit vs plain

def part_a(enc, n_passages: int, round_passages: int, batch_size: int, seed: int) -> dict[str, Any]:
    from retrievers.dense_build import DenseBuildConfig, build_dense_index
    docs = list(Corpus.load(C.vital10k()))
    order = np.random.default_rng(seed).permutation(len(docs))
    rounds: list[list] = []
    cur, cur_n, total = [], 0, 0
    for i in order:
        n = sum(1 for _ in split_passages([docs[i]]))
        cur.append(docs[i])
        cur_n += n
        total += n
        if cur_n >= round_passages:
            rounds.append(cur)
            cur, cur_n = [], 0
        if total >= n_passages:
            break
    if cur:
        rounds.append(cur)
    model = enc.model
    set_threads(None)
    model.encode(["warm-up " * 50] * batch_size, batch_size=batch_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-enc-") as tmp:
        for r, round_docs in enumerate(rounds):
            corpus = Path(tmp) / f"round{r}" / "corpus.jsonl"
            corpus.parent.mkdir(parents=True)
            with open(corpus, "w", encoding="utf-8") as fh:
                for d in round_docs:
                    fh.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
            texts = [p.encode_text for p in split_passages(round_docs)]
            res: dict[str, Any] = {"round": r, "passages": len(texts)}

            def toolkit() -> None:
                out = Path(tmp) / f"round{r}" / "index"
                t0 = time.perf_counter()
                man = build_dense_index(corpus, out, DenseBuildConfig(batch_size=batch_size, keep_embeddings=True),
                                        overwrite=True, encoder=enc)
                res["toolkit_build_s"] = time.perf_counter() - t0
                res["toolkit_encode_s"] = man["timings"]["encode_s"]
                res["_emb_toolkit"] = np.concatenate([np.load(p) for p in sorted((out / "embeddings").glob("shard-*.npy"))])

            def plain() -> None:
                t0 = time.perf_counter()
                res["_emb_plain"] = model.encode(texts, batch_size=batch_size)
                res["plain_s"] = time.perf_counter() - t0

            for fn in ((toolkit, plain) if r % 2 == 0 else (plain, toolkit)):
                fn()
            res["max_abs_diff"] = float(np.abs(res.pop("_emb_toolkit") - res.pop("_emb_plain")).max())
            res["ratio_encode"] = res["plain_s"] / res["toolkit_encode_s"]
            res["ratio_build"] = res["plain_s"] / res["toolkit_build_s"]
            rows.append(res)
            print(f"  [A] round {r}: {len(texts)} passages, plain {len(texts) / res['plain_s']:.1f}/s, "
                  f"toolkit encode {len(texts) / res['toolkit_encode_s']:.1f}/s, ratio {res['ratio_encode']:.3f}",
                  flush=True)
    n = sum(r["passages"] for r in rows)
    plain_s = sum(r["plain_s"] for r in rows)
    enc_s = sum(r["toolkit_encode_s"] for r in rows)
    build_s = sum(r["toolkit_build_s"] for r in rows)
    return {
        "passages": n, "rounds": len(rows), "batch_size": batch_size, "threads": DEFAULT_THREADS,
        "plain_pps": n / plain_s, "toolkit_encode_pps": n / enc_s, "toolkit_build_pps": n / build_s,
        "ratio_encode_total": plain_s / enc_s, "ratio_build_total": plain_s / build_s,
        "ratio_encode_median": C.median([r["ratio_encode"] for r in rows]),
        "ratio_build_median": C.median([r["ratio_build"] for r in rows]),
        "max_abs_diff_embeddings": max(r["max_abs_diff"] for r in rows),
        "per_round": rows,
    }


# ------------------------------------------------------------------ part B: variants

@dataclass
class Variant:
    name: str
    what: str
    encode: Callable[[list[str]], np.ndarray] | None = None
    threads: int | None = None
    quality_of: str | None = None         # same computation as this variant: timed on a subset only
    skipped: str | None = None
    order: Callable[[list[str]], np.ndarray] | None = None  # global batching order; None = ST's (chars, longest first)
    what_order: str = "ST"
    setup_s: float = 0.0                   # one-off cost counted in its time (e.g. tokenising to sort)
    times: dict[int, float] = field(default_factory=dict)   # chunk -> seconds
    emb: dict[int, np.ndarray] = field(default_factory=dict)
    idx: dict[int, np.ndarray] = field(default_factory=dict)


def st_order(texts: list[str]) -> np.ndarray:
    """sentence-transformers' own order inside one encode call: character length, longest first."""
    return np.argsort([-len(t) for t in texts], kind="stable")


def per_batch(model, batch_size: int) -> Callable[[list[str]], np.ndarray]:
    """One encode call per batch, so the batches are exactly the caller's (ST cannot regroup them)."""
    def encode(texts: list[str]) -> np.ndarray:
        return np.concatenate([np.asarray(model.encode(texts[s:s + batch_size], batch_size=batch_size), dtype=np.float32)
                               for s in range(0, len(texts), batch_size)])
    return encode


def _st_encoder(model, batch_size: int) -> Callable[[list[str]], np.ndarray]:
    return lambda texts: np.asarray(model.encode(texts, batch_size=batch_size), dtype=np.float32)


def renormalized(encode: Callable[[list[str]], np.ndarray]) -> Callable[[list[str]], np.ndarray]:
    """bf16's own normalisation leaves norms 1 +- 0.004: renormalise in float32 (what the toolkit should do)."""
    def run(texts: list[str]) -> np.ndarray:
        e = encode(texts)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return run


def _toolkit_fast(model, batch_size: int) -> Callable[[list[str]], np.ndarray]:
    """What users get from the build flags: bf16 passages + token-count batching, inside DenseEncoder."""
    from retrievers.encoders import DenseEncoder
    enc = DenseEncoder(model, "minilm", batch_size, passage_precision="bfloat16", token_sort=True)
    return lambda texts: enc.encode_passage(texts)


def _quantized(model, per_channel: bool):
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic
    q = copy.deepcopy(model)
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    quantize_dynamic(q, {torch.nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    return q


def _onnx_variants(model, batch_size: int, workdir: Path) -> tuple[Variant, Variant]:
    """ONNX Runtime on the exported BERT body + ST's mean pooling and normalisation, fp32 and int8.

    sentence-transformers' own `backend="onnx"` needs optimum-onnx, which pins transformers<4.58 (this
    venv has 5.x), so the export is done here with torch.onnx (needs the `onnx` package).
    """
    what_fp32 = "ONNX Runtime fp32 (torch.onnx export of the BERT body, ST pooling)"
    what_int8 = "ONNX Runtime int8 (onnxruntime.quantization.quantize_dynamic, per-channel)"
    try:
        import onnx  # noqa: F401  (torch.onnx.export and onnxruntime.quantization need it)
        import onnxruntime as ort
    except ImportError as exc:
        reason = (f"skipped: {exc.name} not installed (sentence-transformers backend='onnx' needs optimum-onnx, "
                  "which would downgrade transformers to <4.58; torch.onnx.export needs the `onnx` package)")
        return Variant("onnx", what_fp32, skipped=reason), Variant("onnx_int8", what_int8, skipped=reason)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    bert = model[0].auto_model.eval()
    tok = model.tokenizer
    cap = int(model.max_seq_length)
    sample = tok(["export probe sentence", "a second, longer probe sentence for the export"], padding=True,
                 return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]

    class Body(torch.nn.Module):
        def __init__(self, b):
            super().__init__()
            self.b = b

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.b(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    fp32_path, int8_path = workdir / "minilm.onnx", workdir / "minilm-int8.onnx"
    with torch.no_grad():
        torch.onnx.export(Body(bert), tuple(sample[n] for n in names), str(fp32_path), input_names=names,
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in [*names, "last_hidden_state"]})
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True)

    def make(path: Path) -> Callable[[list[str]], np.ndarray]:
        sessions: dict[int, Any] = {}

        def session():
            n = torch.get_num_threads()
            if n not in sessions:
                so = ort.SessionOptions()
                so.intra_op_num_threads = n
                so.inter_op_num_threads = 1
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                sessions[n] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            return sessions[n]

        def encode(texts: list[str]) -> np.ndarray:
            sess = session()
            order = np.argsort([-len(t) for t in texts], kind="stable")  # ST's length sorting
            out = np.zeros((len(texts), 384), dtype=np.float32)
            for s in range(0, len(texts), batch_size):
                idx = order[s:s + batch_size]
                feats = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=cap, return_tensors="np")
                hidden = sess.run(None, {n: feats[n].astype(np.int64) for n in names})[0]
                mask = feats["attention_mask"][..., None].astype(np.float32)
                pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
                out[idx] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            return out
        return encode

    return Variant("onnx", what_fp32, make(fp32_path)), Variant("onnx_int8", what_int8, make(int8_path))


def build_variants(model, batch_size: int, names: list[str], workdir: Path) -> list[Variant]:
    plain = Variant("plain", f"SentenceTransformer.encode fp32, {DEFAULT_THREADS} threads, batch {batch_size}",
                    _st_encoder(model, batch_size))

    def random_order(texts: list[str]) -> np.ndarray:
        return np.random.default_rng(1).permutation(len(texts))

    def token_order(texts: list[str]) -> np.ndarray:
        lens = [len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]]
        return np.argsort([-n for n in lens], kind="stable")

    def lazy(fn):
        holder: dict[str, Any] = {}
        return lambda: holder.setdefault("m", fn())

    msl = lazy(lambda: _with_msl(model, 128))
    bf16 = lazy(lambda: copy.deepcopy(model).to(torch.bfloat16))
    int8 = lazy(lambda: _quantized(model, per_channel=False))
    int8pc = lazy(lambda: _quantized(model, per_channel=True))
    factories: dict[str, Callable[[], Variant]] = {
        "plain": lambda: plain,
        "nosort": lambda: Variant("nosort", "plain, batches in corpus order (no length sorting)",
                                  per_batch(model, batch_size), quality_of="plain", order=random_order,
                                  what_order="random"),
        "toksort": lambda: Variant("toksort", "plain, batches sorted by token count (tokenising counted)",
                                   per_batch(model, batch_size), quality_of="plain", order=token_order,
                                   what_order="tokens"),
        "threads1": lambda: Variant("threads1", "plain with torch.set_num_threads(1)", plain.encode, threads=1,
                                    quality_of="plain"),
        "bs16": lambda: Variant("bs16", "plain with batch size 16", _st_encoder(model, 16), quality_of="plain"),
        "bs256": lambda: Variant("bs256", "plain with batch size 256", _st_encoder(model, 256), quality_of="plain"),
        "msl128": lambda: Variant("msl128", "max_seq_length 128 (default 256)", _st_encoder(msl(), batch_size)),
        "bf16": lambda: Variant("bf16", "model.to(torch.bfloat16), output renormalised in fp32",
                                renormalized(_st_encoder(bf16(), batch_size))),
        "bf16_toksort": lambda: Variant("bf16_toksort", "bf16 + batches sorted by token count",
                                        renormalized(per_batch(bf16(), batch_size)), order=token_order,
                                        what_order="tokens"),
        "bf16_toksort_t1": lambda: Variant("bf16_toksort_t1", "bf16_toksort with torch.set_num_threads(1)",
                                           renormalized(per_batch(bf16(), batch_size)), order=token_order,
                                           what_order="tokens", threads=1, quality_of="bf16_toksort"),
        "int8": lambda: Variant("int8", "torch quantize_dynamic qint8 on Linear, per-tensor weights",
                                _st_encoder(int8(), batch_size)),
        "int8pc": lambda: Variant("int8pc", "torch quantize_dynamic qint8 on Linear, per-channel weights",
                                  _st_encoder(int8pc(), batch_size)),
        "int8pc_t1": lambda: Variant("int8pc_t1", "int8pc with torch.set_num_threads(1)",
                                     _st_encoder(int8pc(), batch_size), threads=1, quality_of="int8pc"),
        "toolkit_fast": lambda: Variant("toolkit_fast", "the toolkit's `rag index build --passage-precision "
                                        "bfloat16 --token-sort` path (DenseEncoder.encode_passage)",
                                        _toolkit_fast(model, batch_size)),
        "bf16_t1": lambda: Variant("bf16_t1", "bf16 with torch.set_num_threads(1)",
                                   renormalized(_st_encoder(bf16(), batch_size)), threads=1, quality_of="bf16"),
    }
    onnx_pair: list[Variant] = []

    def onnx(i: int) -> Variant:
        if not onnx_pair:
            try:
                onnx_pair.extend(_onnx_variants(model, batch_size, workdir))
            except Exception as exc:  # export or quantisation failure: report, keep going
                msg = f"skipped: ONNX export/quantisation failed: {type(exc).__name__}: {str(exc)[:300]}"
                onnx_pair.extend([Variant("onnx", "ONNX Runtime fp32", skipped=msg),
                                  Variant("onnx_int8", "ONNX Runtime int8", skipped=msg)])
        return onnx_pair[i]

    factories["onnx"] = lambda: onnx(0)
    factories["onnx_int8"] = lambda: onnx(1)
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(factories)}")
    out = [factories["plain"]()] + [factories[n]() for n in names if n != "plain"]
    return out


def _with_msl(model, n: int):
    m = copy.deepcopy(model)
    m.max_seq_length = n
    return m


def reduced_corpus(sample_docs: int, seed: int):
    corpus = Corpus.load(C.vital10k())
    questions = C.dev_questions()
    gold = {p["wikipedia_id"] for q in questions for o in q["output"] for p in o.get("provenance", [])}
    others = [i for i, d in enumerate(corpus.documents) if d.id not in gold]
    rng = np.random.default_rng(seed)
    take = set(rng.choice(others, size=min(sample_docs, len(others)), replace=False).tolist())
    docs = [d for i, d in enumerate(corpus.documents) if d.id in gold or i in take]
    return docs, questions, len(gold)


def quality(emb: np.ndarray, passages, doc_rows: np.ndarray, docs, q_emb: np.ndarray,
            questions: list[dict]) -> tuple[dict[str, float], np.ndarray]:
    import faiss

    from core.tasks import Query, guess_rows
    from eval.kilt import evaluate_kilt
    from retrievers.base import Hit
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb, dtype=np.float32))
    scores, pids = index.search(np.ascontiguousarray(q_emb, dtype=np.float32), min(300, len(emb)))
    rankings = []
    for prow, srow in zip(pids, scores):
        seen: dict[str, Hit] = {}
        for pid, s in zip(prow.tolist(), srow.tolist()):
            if pid < 0:
                continue
            d = docs[int(doc_rows[pid])]
            if d.id not in seen:
                seen[d.id] = Hit(d.id, d.title, float(s), passages[pid].text, pid)
                if len(seen) == 100:
                    break
        rankings.append(list(seen.values()))
    queries = [Query(str(q["id"]), q["input"]) for q in questions]
    res = evaluate_kilt(guess_rows(queries, rankings), questions, ks=(1, 5, 10, 100))["retrieval"]
    keep = {k: res[k] for k in ("Rprec", "recall@5", "recall@10", "recall@100")}
    return keep, pids[:, :10]


def part_b(enc, args) -> dict[str, Any]:
    model = enc.model
    docs, questions, n_gold = reduced_corpus(args.sample_docs, args.seed)
    passages = list(split_passages(docs))
    doc_index = {d.id: i for i, d in enumerate(docs)}
    doc_rows = np.array([doc_index[p.doc_id] for p in passages])
    texts = [p.encode_text for p in passages]
    n_chunks = -(-len(texts) // args.chunk)
    n_exact = min(n_chunks, max(1, -(-args.exact_passages // args.chunk)))
    exact_chunks = set(np.unique(np.linspace(0, n_chunks - 1, n_exact).round().astype(int)).tolist())
    stats = token_stats(model, [p.encode_text for p in split_passages(Corpus.load(C.vital10k()).documents)],
                        args.batch_size)
    workdir = Path(tempfile.mkdtemp(prefix="bench-enc-b-"))
    variants = build_variants(model, args.batch_size, args.variants, workdir)
    q_texts = [q["input"] for q in questions]
    for v in variants:  # warm-up: builds lazily created models, first-call kernels; a failure skips the variant
        if v.skipped:
            continue
        try:
            set_threads(v.threads)
            v.encode(texts[:8])
        except Exception as exc:
            v.skipped = f"skipped: failed on warm-up: {type(exc).__name__}: {str(exc)[:300]}"
    active = [v for v in variants if v.skipped is None]
    # Each variant's global batching order over the whole reduced corpus (what one big encode call of a
    # shard does); its chunk c is the c-th slice of that order, so chunked timing batches the same way.
    for v in active:
        t0 = time.perf_counter()
        order = (v.order or st_order)(texts)
        v.setup_s = time.perf_counter() - t0 if v.order is not None else 0.0
        for c in range(n_chunks):
            v.idx[c] = np.asarray(order[c * args.chunk:(c + 1) * args.chunk])
    print(f"  [B] reduced corpus: {len(docs)} docs ({n_gold} gold + {len(docs) - n_gold} sampled), "
          f"{len(passages)} passages in {n_chunks} chunks; variants: {[v.name for v in active]}", flush=True)
    t_start = time.perf_counter()
    for c in range(n_chunks):
        runners = [v for v in active if v.quality_of is None or c in exact_chunks]
        shift = c % len(runners)
        for v in runners[shift:] + runners[:shift]:
            chunk_texts = [texts[i] for i in v.idx[c]]
            set_threads(v.threads)
            t0 = time.perf_counter()
            e = v.encode(chunk_texts)
            v.times[c] = time.perf_counter() - t0
            v.emb[c] = e
        set_threads(None)
        print(f"  [B] chunk {c + 1}/{n_chunks} ({time.perf_counter() - t_start:.0f}s): " +
              ", ".join(f"{v.name} {len(v.idx[c]) / v.times[c]:.1f}/s" for v in runners), flush=True)
    set_threads(None)
    plain = variants[0]
    full = {v.name: v for v in active if v.quality_of is None}

    def assembled(v: Variant) -> np.ndarray:
        out = np.full((len(texts), 384), np.nan, dtype=np.float32)
        for c in v.times:
            out[v.idx[c]] = v.emb[c]
        return out

    plain_emb = assembled(plain)
    results: dict[str, dict[str, Any]] = {}
    plain_top10 = None
    for v in sorted(variants, key=lambda v: v.quality_of is not None):  # references before their copies
        row: dict[str, Any] = {"variant": v.name, "what": v.what, "threads": v.threads or DEFAULT_THREADS}
        if v.skipped:
            row["skipped"] = v.skipped
            results[v.name] = row
            continue
        cs = sorted(v.times)
        n = sum(len(v.idx[c]) for c in cs)
        # one-off set-up (e.g. tokenising to sort) is charged in proportion to the share of chunks timed
        t_v = sum(v.times[c] for c in cs) + v.setup_s * len(cs) / n_chunks
        t_p = sum(plain.times[c] for c in cs)
        # headline = median of per-chunk ratios: robust to load spikes on a shared machine (one chunk
        # of plain hit by a burst of other work would otherwise move the total ratio for every variant)
        setup_per_chunk = v.setup_s / n_chunks
        row.update(batching_order=v.what_order, passages_timed=n, pps=n / t_v, plain_pps_same_chunks=n / t_p,
                   speedup=C.median([plain.times[c] / (v.times[c] + setup_per_chunk) for c in cs]),
                   speedup_total=t_p / t_v, setup_s=v.setup_s)
        emb = assembled(v)
        shared = ~np.isnan(emb[:, 0]) & ~np.isnan(plain_emb[:, 0])
        cos = (emb[shared] * plain_emb[shared]).sum(1)
        row.update(cos_to_plain_mean=float(cos.mean()), cos_to_plain_min=float(cos.min()))
        if v.quality_of is None:
            set_threads(v.threads)
            q_emb = v.encode(q_texts)
            set_threads(None)
            q, top10 = quality(emb, passages, doc_rows, docs, q_emb, questions)
            if plain_top10 is None:
                plain_top10 = top10
            row.update(q)
            row["top10_overlap_with_plain"] = float(np.mean([len(set(a) & set(b)) / 10
                                                             for a, b in zip(top10, plain_top10)]))
        else:
            ref = results[v.quality_of] if v.quality_of in results else None
            ref_full = full.get(v.quality_of)
            if ref is not None and ref_full is not None:
                # same computation as `quality_of`: check it on the shared chunks, then inherit its quality
                ref_emb = assembled(ref_full)
                both = ~np.isnan(emb[:, 0]) & ~np.isnan(ref_emb[:, 0])
                diff = float(np.abs(emb[both] - ref_emb[both]).max())
                row["max_abs_diff_vs_" + v.quality_of] = diff
                row["quality_inherited_from"] = v.quality_of
                for k in ("Rprec", "recall@5", "recall@10", "recall@100", "top10_overlap_with_plain"):
                    row[k] = ref.get(k)
        results[v.name] = row
    results = {v.name: results[v.name] for v in variants}  # back to the listed order
    shutil.rmtree(workdir, ignore_errors=True)  # ONNX exports, if any
    base = results["plain"]["Rprec"]
    for row in results.values():
        if "Rprec" in row and row.get("Rprec") is not None:
            row["Rprec_delta"] = row["Rprec"] - base
            row["meets_goal_2x_rprec_0.01"] = bool(row["speedup"] >= 2.0 and abs(row["Rprec_delta"]) <= 0.01)
    return {
        "reduced_corpus": {"docs": len(docs), "gold_docs": n_gold, "sampled_docs": len(docs) - n_gold,
                           "passages": len(passages), "questions": len(questions), "chunk": args.chunk,
                           "chunks": n_chunks, "exact_variant_chunks": sorted(exact_chunks),
                           "exact_variant_passages": sum(len(plain.idx[c]) for c in exact_chunks)},
        "token_stats_vital10k": stats,
        "batch_size": args.batch_size,
        "variants": list(results.values()),
    }


# ------------------------------------------------------------------ report

def tables(res: dict[str, Any]) -> list[str]:
    out = []
    if "part_a" in res:
        a = res["part_a"]
        out.append("### Encoding: toolkit dense build vs plain SentenceTransformer.encode (same model, texts, batch)\n\n" +
                   C.md_table(["measure", "toolkit passages/s", "plain passages/s", "ratio total", "ratio median round"],
                              [["encode step (manifest encode_s)", a["toolkit_encode_pps"], a["plain_pps"],
                                a["ratio_encode_total"], a["ratio_encode_median"]],
                               ["whole build (wall)", a["toolkit_build_pps"], a["plain_pps"],
                                a["ratio_build_total"], a["ratio_build_median"]]]) +
                   f"\n\n{a['passages']:,} vital10k passages in {a['rounds']} alternating rounds, batch {a['batch_size']}, "
                   f"{a['threads']} torch threads; max |toolkit - plain| embedding difference {a['max_abs_diff_embeddings']:.2g}. "
                   "Target ratio >= 0.95.")
    if "part_b" in res:
        b = res["part_b"]
        rc, ts = b["reduced_corpus"], b["token_stats_vital10k"]
        rows = []
        for v in b["variants"]:
            if v.get("skipped"):
                rows.append([v["variant"], v["what"], "-", "-", "-", "-", "-", "-", "-", "-", v["skipped"]])
                continue
            notes = (["goal met"] if v.get("meets_goal_2x_rprec_0.01") else []) + (
                [f"quality = {v['quality_inherited_from']}'s"] if v.get("quality_inherited_from") else [])
            rows.append([v["variant"], v["what"], v["batching_order"], v["passages_timed"], v["pps"], v["speedup"],
                         v["speedup_total"], v.get("Rprec"), v.get("Rprec_delta"), v["cos_to_plain_mean"],
                         "; ".join(notes)])
        out.append("### Encoding variants: throughput vs plain fp32 and FanOutQA dev R-precision (reduced corpus)\n\n" +
                   C.md_table(["variant", "what", "batch order", "passages timed", "passages/s", "speedup (median chunk)", "speedup (total time)",
                               "dev Rprec", "Rprec - plain", "cos to plain", "note"], rows) +
                   f"\n\nReduced corpus: {rc['docs']:,} vital10k docs ({rc['gold_docs']} dev gold + {rc['sampled_docs']:,} "
                   f"random, seed 0) = {rc['passages']:,} passages, {rc['questions']} dev questions; chunks of {rc['chunk']} "
                   f"passages, variants rotated per chunk; exact-computation variants timed on {rc['exact_variant_passages']:,} "
                   f"passages. Goal: speedup >= 2 with |Rprec - plain| <= 0.01 (one question = {1 / rc['questions']:.4f}).")
        out.append("### vital10k passage token lengths (MiniLM tokenizer, 100-word passages)\n\n" +
                   C.md_table(["passages", "p50", "p90", "p99", "max", "> 128", "> 256 (truncated now)",
                               "padding efficiency, ST sorted", "unsorted"],
                              [[ts["passages"], ts["tokens_p50"], ts["tokens_p90"], ts["tokens_p99"], ts["tokens_max"],
                                ts["frac_over_128"], ts["frac_over_256"], ts["padding_efficiency_sorted"],
                                ts["padding_efficiency_unsorted"]]]))
    return out


def _cpu_capability() -> dict[str, Any]:
    """bf16 speed depends on the CPU: native bf16 (AVX512-BF16 / AMX) makes it fast, emulation slow."""
    out: dict[str, Any] = {}
    try:
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["mkldnn_bf16_supported"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception as exc:  # private API: report, don't fail
        out["error"] = str(exc)[:200]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument("--part", choices=["a", "b", "all"], default="all")
    ap.add_argument("--passages", type=int, default=None, help="part A passages (default 2000, quick 256)")
    ap.add_argument("--round-passages", type=int, default=None, help="part A passages per round (250, quick 128)")
    ap.add_argument("--sample-docs", type=int, default=None, help="part B random non-gold docs (2000, quick 100)")
    ap.add_argument("--chunk", type=int, default=128, help="part B passages per interleaving chunk")
    ap.add_argument("--exact-passages", type=int, default=None,
                    help="part B passages for same-computation variants (768, quick 128)")
    ap.add_argument("--variants", default="plain,nosort,toksort,threads1,msl128,bf16,bf16_toksort,bf16_toksort_t1,"
                                          "toolkit_fast,int8,int8pc,int8pc_t1,onnx,onnx_int8",
                    help="comma list; also available: bs16, bs256, bf16_t1")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    q = args.quick
    args.passages = args.passages or (256 if q else 2000)
    args.round_passages = args.round_passages or (128 if q else 250)
    args.sample_docs = args.sample_docs if args.sample_docs is not None else (100 if q else 2000)
    args.exact_passages = args.exact_passages or (128 if q else 768)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    started = time.perf_counter()
    enc = load_plain()
    res: dict[str, Any] = {"versions": C.versions("torch", "sentence-transformers", "transformers", "onnxruntime", "onnx",
                                                  "faiss-cpu"),
                           "load_avg_start": C.load_avg(), "cpu_capability": _cpu_capability()}
    if args.part in ("a", "all"):
        res["part_a"] = part_a(enc, args.passages, args.round_passages, args.batch_size, args.seed)
        res["part_a"]["meets_target_0.95"] = bool(res["part_a"]["ratio_encode_total"] >= 0.95)
    if args.part in ("b", "all"):
        res["part_b"] = part_b(enc, args)
    res["load_avg_end"] = C.load_avg()
    C.write_result(NAME + ("" if args.part == "all" else f"_{args.part}"), q, res, tables(res), args.out, started)


if __name__ == "__main__":
    main()
