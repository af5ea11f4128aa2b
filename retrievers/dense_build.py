"""Streaming, resumable dense index build.

The corpus is read once into a passage table; embeddings are computed shard by shard and saved as
`.npy` files in a staging folder beside the output, so memory holds one shard at a time and an
interrupted build resumes from the finished shards. The Faiss index is assembled from memory-mapped
shards, the manifest is written last, and the staging folder is renamed into place only at the end.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from core.config import opt
from core.corpus import file_checksum, iter_documents, resolve_corpus_path, split_passages, validate_corpus
from core.errors import RagError
from core.io import prepare_output_dir, read_json, write_json
from index.faiss_index import FaissIndex
from index.manifest import write_manifest
from index.passages import PassageStore, write_passage_store
from retrievers.encoders import PASSAGE_PRECISIONS, DenseEncoder, encoder_id, load_encoder

SHARDS = "embeddings"
BUILD_KEY = "build_key.json"
PASSAGES_DONE = "passages.done"
PROGRESS_CHUNK = 1024  # passages per encode call within a shard (progress granularity)


@dataclass
class DenseBuildConfig:
    encoder: str | None = opt(None, "alias, folder, hub id or run folder; None = packaged MiniLM", check="model")
    faiss: str = opt("Flat", "any Faiss index-factory string")
    batch_size: int = opt(64, "passages per encode batch", min=1)
    passage_precision: str = opt("float32", "'bfloat16': passages encoded by a bf16 copy (queries stay float32)",
                                 choices=PASSAGE_PRECISIONS)
    token_sort: bool = opt(False, "batch passages by token count (less padding)")
    nprobe: int | None = opt(None, "IVF: lists searched by default (None: 16, recall@10 0.997 in bench_faiss)", min=1)
    ef_search: int | None = opt(None, "HNSW: search depth by default (None: 128)", min=1)
    shard_size: int = opt(8192, "passages per embedding shard (the unit of resume)", min=1)
    words_per_passage: int = opt(100, "words per passage", min=1)
    stride: int = opt(80, "words between passage starts (< words per passage: overlap)", min=1,
                      at_most="words_per_passage")
    max_train_vectors: int = opt(262_144, "sample size for IVF/PQ training", min=1)
    keep_embeddings: bool = opt(False, "keep the shards next to the index (e.g. to rebuild other indexes)")
    device: str | None = opt(None, "torch device for encoding (auto: cuda if available)", check="device")


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def shard_path(folder: Path, shard: int) -> Path:
    return folder / SHARDS / f"shard-{shard:05d}.npy"


def save_shard(folder: Path, shard: int, embeddings: np.ndarray) -> None:
    """Write a shard atomically: a shard file exists only when it is complete."""
    path = shard_path(folder, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, np.ascontiguousarray(embeddings, dtype=np.float32))
    os.replace(tmp, path)


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def _build_key(config: DenseBuildConfig, corpus_checksum: str) -> dict[str, Any]:
    return {"encoder": encoder_id(config.encoder), "corpus_checksum": corpus_checksum,
            "words_per_passage": config.words_per_passage, "stride": config.stride, "shard_size": config.shard_size}


def prepare_staging(out: Path, corpus_path: Path, config: DenseBuildConfig,
                    checksum: str | None = None) -> tuple[Path, dict[str, int]]:
    """Create or reuse the staging folder and its passage table; a different build starts afresh."""
    staging = staging_dir(out)
    key = _build_key(config, checksum or file_checksum(corpus_path))
    if staging.exists():
        try:
            same = read_json(staging / BUILD_KEY) == key
        except Exception:
            same = False
        if not same:
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    write_json(staging / BUILD_KEY, key)
    if not (staging / PASSAGES_DONE).exists():
        docs = (doc for _, doc in iter_documents(corpus_path))
        counts = write_passage_store(staging, split_passages(docs, config.words_per_passage, config.stride))
        write_json(staging / PASSAGES_DONE, counts)
    return staging, read_json(staging / PASSAGES_DONE)


def encode_missing_shards(staging: Path, encoder: DenseEncoder, batch_size: int, shard_size: int,
                          on_shard: Callable[[int], None] | None = None) -> int:
    """Encode every shard not yet on disk (single process). Returns how many were encoded now."""
    store = PassageStore(staging)
    ranges = shard_ranges(len(store), shard_size)
    todo = [i for i in range(len(ranges)) if not shard_path(staging, i).exists()]
    done_before = len(ranges) - len(todo)
    pending = set(todo)
    bar = tqdm(total=len(store), initial=sum(e - s for i, (s, e) in enumerate(ranges) if i not in pending),
               unit="passage", desc="encoding", dynamic_ncols=True)
    try:
        for shard in todo:
            start, end = ranges[shard]
            rows = [store.get(pid) for pid in range(start, end)]
            parts = []
            for lo in range(0, len(rows), PROGRESS_CHUNK):  # chunks only to move the progress bar
                parts.append(encode_rows(encoder, rows[lo:lo + PROGRESS_CHUNK], batch_size))
                bar.update(len(parts[-1]))
            save_shard(staging, shard, np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32))
            if on_shard is not None:
                on_shard(shard)
    finally:
        bar.close()
        store.close()
    return len(ranges) - done_before


def encode_rows(encoder: DenseEncoder, rows: list[dict], batch_size: int) -> np.ndarray:
    """Encode passage rows; a domain-routed encoder (MoE heads) also gets each row's `domain`."""
    texts = [_encode_text(row) for row in rows]
    if getattr(encoder, "wants_domains", False):
        return encoder.encode_passage(texts, batch_size=batch_size, domains=[row.get("domain") for row in rows])
    return encoder.encode_passage(texts, batch_size=batch_size)


def _encode_text(row: dict) -> str:
    return f"{row['title']}: {row['text']}" if row.get("title") else row["text"]


def iter_shards(staging: Path, n: int, shard_size: int):
    for shard, (start, end) in enumerate(shard_ranges(n, shard_size)):
        emb = np.load(shard_path(staging, shard), mmap_mode="r")
        if len(emb) != end - start:
            raise RagError(f"shard {shard} holds {len(emb)} rows, expected {end - start}: rebuild with --overwrite")
        yield emb


def search_defaults(factory: str, nprobe: int | None = None, ef_search: int | None = None) -> dict[str, int]:
    """The search parameters an index is opened with unless the caller gives its own.

    Faiss's own defaults (nprobe 1, efSearch 16) lose much recall (IVF4096,Flat: 0.62 recall@10 at nprobe 1,
    0.997 at 16 on 1M vectors, bench/bench_faiss.py), so approximate indexes carry sensible ones.
    """
    out = {}
    if "IVF" in factory:
        out["nprobe"] = nprobe or 16
    if "HNSW" in factory:
        out["ef_search"] = ef_search or 128
    return out


def assemble_index(staging: Path, n: int, dim: int, config: DenseBuildConfig) -> FaissIndex:
    """Train (if the factory needs it) on a sample, then add shard by shard from memory maps."""
    index = FaissIndex.create(dim, config.faiss)
    if index.needs_training:
        rng = np.random.default_rng(0)
        take = min(n, config.max_train_vectors)
        chosen = np.sort(rng.choice(n, size=take, replace=False))
        sample, offset = [], 0
        for emb in iter_shards(staging, n, config.shard_size):
            local = chosen[(chosen >= offset) & (chosen < offset + len(emb))] - offset
            sample.append(np.asarray(emb[local]))
            offset += len(emb)
        index.train(np.concatenate(sample))
    index.reserve(n)
    for emb in tqdm(iter_shards(staging, n, config.shard_size), desc="indexing", unit="shard",
                    total=len(shard_ranges(n, config.shard_size)), dynamic_ncols=True):
        index.add(np.asarray(emb))
    return index


def build_dense_index(corpus: str | Path, out: str | Path, config: DenseBuildConfig | None = None,
                      overwrite: bool = False, encoder: DenseEncoder | None = None,
                      encode_shards: Callable[..., int] | None = None) -> dict[str, Any]:
    """Build `out` from `corpus`. `encode_shards` lets the Ray runtime replace the local encoder loop."""
    config = config or DenseBuildConfig()
    out = prepare_output_dir(out, overwrite)
    corpus_path = resolve_corpus_path(corpus)
    n_docs = validate_corpus(corpus_path)
    FaissIndex.create(8, config.faiss)  # fail fast on a bad factory string, before any work
    if config.passage_precision not in PASSAGE_PRECISIONS:
        raise RagError(f"passage_precision must be one of {', '.join(PASSAGE_PRECISIONS)}, "
                       f"not {config.passage_precision!r}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    checksum = file_checksum(corpus_path)
    staging, counts = prepare_staging(out, corpus_path, config, checksum)
    timings["passages_s"] = time.perf_counter() - t0
    encoder = encoder or load_encoder(config.encoder, device=config.device, batch_size=config.batch_size,
                                      passage_precision=config.passage_precision, token_sort=config.token_sort)
    t1 = time.perf_counter()
    if encode_shards is None:
        encoded_now = encode_missing_shards(staging, encoder, config.batch_size, config.shard_size)
    else:
        encoded_now = encode_shards(staging, config)
    timings["encode_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    index = assemble_index(staging, counts["passages"], encoder.dim, config)
    index.save(staging)
    timings["index_s"] = time.perf_counter() - t2
    if not config.keep_embeddings:
        shutil.rmtree(staging / SHARDS, ignore_errors=True)
    for name in (BUILD_KEY, PASSAGES_DONE):
        (staging / name).unlink(missing_ok=True)
    manifest = write_manifest(
        staging, "dense", encoder=encoder_id(config.encoder), encoder_fingerprint=encoder.fingerprint(),
        dim=encoder.dim, faiss=config.faiss, metric="inner_product", normalized=True,
        corpus_path=str(corpus_path), corpus_checksum=checksum,
        counts={"documents": n_docs, "passages": counts["passages"], "shards_encoded_this_run": encoded_now},
        search_defaults=search_defaults(config.faiss, config.nprobe, config.ef_search),
        config=asdict(config), timings={k: round(v, 3) for k, v in timings.items()},
        passages_per_second=round(counts["passages"] / max(timings["encode_s"], 1e-9), 2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return manifest

