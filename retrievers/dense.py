"""Dense retrieval: a bi-encoder over a Faiss index, documents ranked by their best passage."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ManifestMismatch, RagError
from index.faiss_gpu import available_gpus
from index.faiss_index import FaissIndex
from index.manifest import check_files, check_versions, read_manifest, require_keys
from index.passages import PassageStore
from retrievers.base import Hit, aggregate_passages, check_k
from retrievers.dense_build import DenseBuildConfig, build_dense_index
from retrievers.encoders import DenseEncoder, encoder_id, load_encoder

__all__ = ["DenseRetriever", "DenseEncoder", "build_dense_index", "DenseBuildConfig"]

# What a dense folder's manifest must hold to be opened (besides kind and format_version).
DENSE_KEYS = {"encoder": str, "encoder_fingerprint": list, "dim": int, "faiss": str, "counts.passages": int}
FINGERPRINT_ATOL = 2e-3
# What open_dense passes on to DenseRetriever (the swap harness checks a dense model's options against it).
DENSE_OPTIONS = ("device", "gpu", "gpu_shard", "gpu_fp16", "nprobe", "ef_search", "batch_size", "k_factor", "mmap")


def same_fingerprint(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and bool(np.allclose(np.asarray(a, float), np.asarray(b, float), atol=FINGERPRINT_ATOL))


class DenseRetriever:
    """Loads the index folder, checks it is whole and matches the encoder, and searches.

    The encoder is accepted by what it computes, not by its name: its fingerprint (the embedding of a fixed
    probe, retrievers/fingerprint.py) must match the one recorded at build time, so an alias or a copy of
    the building model is accepted and another model under the same name is refused.

    mmap: memory-map the Faiss file instead of reading it (`index.faiss_index.mmap_flags`: with this faiss every
    CPU index type except fast-scan `...x4fs` ones; with a faiss lacking IO_FLAG_MMAP_IFC, IVF only). None (the
    default): mapped where the type allows it, read otherwise, and read when `gpu` (the index is copied to the
    GPUs anyway); True: mapped, a one-line error for a type that cannot be; False: read into memory. Results are
    the same either way.
    """

    def __init__(self, index_dir: str | Path, encoder: str | DenseEncoder | None = None, device: str | None = None,
                 gpu: bool = False, nprobe: int | None = None, ef_search: int | None = None,
                 batch_size: int = 64, k_factor: int | None = None, gpu_shard: bool = False,
                 gpu_fp16: bool = False, mmap: bool | None = None) -> None:
        if (gpu_shard or gpu_fp16) and not gpu:
            raise RagError("gpu_shard / gpu_fp16 (--gpu-shard / --gpu-fp16) need gpu (--gpu)")
        if gpu:
            available_gpus()  # before the encoder loads: faiss without GPU support fails at once, in one line
        self.index_dir = Path(index_dir)
        self.manifest = read_manifest(index_dir, "dense")
        require_keys(index_dir, self.manifest, DENSE_KEYS)
        check_files(index_dir, self.manifest)  # sizes: cheap, before loading anything
        check_versions(index_dir, self.manifest)
        passages, dim = self.manifest["counts"]["passages"], self.manifest["dim"]
        if isinstance(encoder, DenseEncoder):
            self.encoder = encoder
            asked = encoder.name
        else:
            asked = encoder or self.manifest["encoder"]
            self.encoder = load_encoder(asked, device=device, batch_size=batch_size)
        built = self.manifest["encoder"]
        shown = asked if encoder_id(asked) == asked else f"{asked} ({encoder_id(asked)})"
        if self.encoder.dim != dim:
            raise ManifestMismatch(f"{index_dir} does not match: dim: the index holds {dim}-dimensional vectors of "
                                   f"encoder {built!r}, encoder {shown!r} gives {self.encoder.dim}")
        fingerprint = self.encoder.fingerprint()
        if not same_fingerprint(fingerprint, self.manifest["encoder_fingerprint"]):
            which = (f"encoder {shown!r} embeds differently from when it built the index (same name, another "
                     "model)" if encoder_id(asked) == built else
                     f"encoder {shown!r} embeds differently from {built!r}, the one that built the index")
            raise ManifestMismatch(
                f"{index_dir}: {which}: fingerprint {fingerprint[:3]} vs {self.manifest['encoder_fingerprint'][:3]}; "
                "use the building encoder or rebuild the index")
        self.index = FaissIndex.load(index_dir, self.manifest["faiss"], mmap=(False if gpu else None) if mmap is None
                                     else mmap)
        self.index.check_shape(index_dir, passages, dim)
        if gpu:  # every visible GPU (CUDA_VISIBLE_DEVICES picks them)
            self.index = self.index.to_gpu(shard=gpu_shard, fp16=gpu_fp16)
        self.store = PassageStore(index_dir, expected=passages)
        defaults = self.manifest.get("search_defaults") or {}  # set at build time (retrievers/dense_build.py)
        self.nprobe = nprobe if nprobe is not None else defaults.get("nprobe")
        self.ef_search = ef_search if ef_search is not None else defaults.get("ef_search")
        self.k_factor = k_factor

    def search_passages(self, queries: Sequence[str], k: int,
                        domains: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Queries with a known domain go to its expert (MoE encoders); others through the router."""
        if domains is not None and getattr(self.encoder, "wants_domains", False):
            q = self.encoder.encode_query(list(queries), domains=list(domains))
        else:
            q = self.encoder.encode_query(list(queries))
        k = check_k(k)
        scores, pids = self.index.search(q, min(k, len(self.index)), nprobe=self.nprobe, ef_search=self.ef_search,
                                        k_factor=self.k_factor)
        return pids, scores

    def retrieve(self, queries: Sequence[str], k: int = 100, passage_factor: int = 3,
                 domains: Sequence[str | None] | None = None, **_: Any) -> list[list[Hit]]:
        k = check_k(k)
        check_k(passage_factor, "passage_factor")
        pids, scores = self.search_passages(queries, k * passage_factor, domains)
        return [aggregate_passages(p, s, self.store, k) for p, s in zip(pids, scores)]


def open_dense(index_dir: str | Path, encoder: str | None = None, **options: Any) -> DenseRetriever:
    known = {k: v for k, v in options.items() if k in DENSE_OPTIONS}
    return DenseRetriever(index_dir, encoder=encoder, **known)
