"""Bi-encoders (Tevatron style: `encode_query` / `encode_passage`) over sentence-transformers.

An encoder is named by an alias (`minilm`), a local sentence-transformers folder, a hub id, or a
run folder of `rag train retriever` (base model + trained parts); ENCODER_LOADERS decides which.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rag.models import resolve_model

PROBE_TEXT = "rag-toolkit encoder fingerprint probe: the quick brown fox."


class DenseEncoder:
    """Normalised float32 embeddings for queries and passages."""

    def __init__(self, model: Any, name: str, batch_size: int = 64) -> None:
        self.model = model
        self.name = name
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False,
               **kwargs: Any) -> np.ndarray:
        emb = self.model.encode(list(texts), batch_size=batch_size or self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=show_progress, **kwargs)
        return np.asarray(emb, dtype=np.float32)

    @property
    def wants_domains(self) -> bool:
        """True for models that route by domain (MoE heads): pass `domains=` to encode_query/encode_passage."""
        return bool(getattr(self.model, "wants_domains", False))

    def _domains(self, domains: Sequence[str | None] | None) -> dict[str, Any]:
        return {"domains": list(domains)} if domains is not None and self.wants_domains else {}

    def encode_query(self, texts: Sequence[str], domains: Sequence[str | None] | None = None,
                     **kwargs: Any) -> np.ndarray:
        """`domains` (one per text, None = unknown) is used by domain-routed models and ignored by others."""
        return self.encode(texts, **self._domains(domains), **kwargs)

    def encode_passage(self, texts: Sequence[str], domains: Sequence[str | None] | None = None,
                       **kwargs: Any) -> np.ndarray:
        return self.encode(texts, **self._domains(domains), **kwargs)

    def fingerprint(self) -> list[float]:
        """A few embedding values of a fixed probe: tells two encoders apart even under one name."""
        return [round(float(x), 5) for x in self.encode([PROBE_TEXT])[0][:8]]


def _load_sentence_transformer(path: str, device: str | None, **_: Any) -> Any:
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(path, device=device, trust_remote_code=False)


# (predicate on the resolved path, loader). Later entries (e.g. run folders) are inserted first.
ENCODER_LOADERS: list[tuple[Callable[[str], bool], Callable[..., Any]]] = [
    (lambda path: True, _load_sentence_transformer),
]


def load_encoder(name_or_path: str | None = None, device: str | None = None, batch_size: int = 64,
                 **options: Any) -> DenseEncoder:
    path = resolve_model(name_or_path)
    if (Path(path) / "dense_run.json").is_file():
        import retrievers.dense_train  # noqa: F401  (registers the run-folder loader in ENCODER_LOADERS)
    for accepts, loader in ENCODER_LOADERS:
        if accepts(path):
            model = loader(path, device, **options)
            return DenseEncoder(model, str(name_or_path or "minilm"), batch_size)
    raise AssertionError("the catch-all loader accepts every path")


def encoder_id(name_or_path: str | None) -> str:
    """What the manifest records: the alias or the resolved path."""
    name = str(name_or_path or "minilm")
    path = Path(name)
    return str(path.resolve()) if path.exists() else name
