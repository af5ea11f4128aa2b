"""Dense retrieval: a bi-encoder over a Faiss index, documents ranked by their best passage."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ManifestMismatch
from index.faiss_index import FaissIndex
from index.manifest import check_expected, read_manifest
from index.passages import PassageStore
from retrievers.base import Hit, aggregate_passages
from retrievers.dense_build import DenseBuildConfig, build_dense_index
from retrievers.encoders import DenseEncoder, encoder_id, load_encoder

__all__ = ["DenseRetriever", "DenseEncoder", "build_dense_index", "DenseBuildConfig"]


class DenseRetriever:
    """Loads the index folder, checks the manifest against the encoder, and searches."""

    def __init__(self, index_dir: str | Path, encoder: str | DenseEncoder | None = None, device: str | None = None,
                 gpu: bool = False, nprobe: int | None = None, ef_search: int | None = None,
                 batch_size: int = 64, k_factor: int | None = None) -> None:
        self.index_dir = Path(index_dir)
        self.manifest = read_manifest(index_dir, "dense")
        if isinstance(encoder, DenseEncoder):
            self.encoder = encoder
            asked = encoder.name
        else:
            asked = encoder or self.manifest["encoder"]
            if encoder is not None:
                check_expected(index_dir, self.manifest, {"encoder": encoder_id(encoder)})
            self.encoder = load_encoder(asked, device=device, batch_size=batch_size)
        check_expected(index_dir, self.manifest, {"dim": self.encoder.dim})
        fingerprint = self.encoder.fingerprint()
        if not np.allclose(fingerprint, self.manifest["encoder_fingerprint"], atol=2e-3):
            raise ManifestMismatch(
                f"{index_dir}: encoder {asked!r} embeds differently from the one that built the index "
                f"({self.manifest['encoder']!r}): fingerprint {fingerprint[:3]} vs {self.manifest['encoder_fingerprint'][:3]}")
        self.index = FaissIndex.load(index_dir, self.manifest["faiss"])
        if gpu:
            self.index = self.index.to_gpu()
        self.store = PassageStore(index_dir)
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
        scores, pids = self.index.search(q, min(k, len(self.index)), nprobe=self.nprobe, ef_search=self.ef_search,
                                        k_factor=self.k_factor)
        return pids, scores

    def retrieve(self, queries: Sequence[str], k: int = 100, passage_factor: int = 3,
                 domains: Sequence[str | None] | None = None, **_: Any) -> list[list[Hit]]:
        pids, scores = self.search_passages(queries, k * passage_factor, domains)
        return [aggregate_passages(p, s, self.store, k) for p, s in zip(pids, scores)]


def open_dense(index_dir: str | Path, encoder: str | None = None, **options: Any) -> DenseRetriever:
    known = {k: v for k, v in options.items() if k in ("device", "gpu", "nprobe", "ef_search", "batch_size", "k_factor")}
    return DenseRetriever(index_dir, encoder=encoder, **known)
