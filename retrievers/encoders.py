"""Bi-encoders (Tevatron style: `encode_query` / `encode_passage`) over sentence-transformers.

An encoder is named by an alias (`minilm`), a local sentence-transformers folder, a hub id, or a
run folder of `rag train retriever` (base model + trained parts); ENCODER_LOADERS decides which.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.models import resolve_model
from retrievers.dense_run import is_dense_run, load_dense_run
from retrievers.fingerprint import PROBE_TEXT, embedding_fingerprint  # noqa: F401

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
PASSAGE_PRECISIONS = PRECISIONS  # the name dense_build's config imports
CPU_BATCH_SIZE = 64
GPU_BATCH_SIZE = 256  # a GPU is idle between small batches; 256 short passages fit any card's memory


def model_device(model: Any) -> str:
    """Where a model's weights are ("cuda:0", "cpu"); a model that does not say is taken as on the CPU."""
    device = getattr(model, "device", None)
    return str(device) if device is not None else "cpu"


def on_gpu(device: str) -> bool:
    return device.startswith("cuda")


def half_precision() -> str:
    """bfloat16 where the GPU computes it natively (Ampere and newer), else float16."""
    import torch
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def resolve_precision(precision: str, device: str) -> str:
    """"auto" is half precision on a GPU (what its tensor cores are built for) and float32 on a CPU, as before."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision
    return half_precision() if on_gpu(device) else "float32"


def default_batch_size(device: str) -> int:
    return GPU_BATCH_SIZE if on_gpu(device) else CPU_BATCH_SIZE


class DenseEncoder:
    """Normalised float32 embeddings for queries and passages.

    `passage_precision="bfloat16"` encodes passages with a bf16 copy of the model (outputs renormalised
    in float32) and `token_sort=True` groups passages of similar token counts into batches, so less
    padding is computed: together about 2.3x the plain sentence-transformers throughput on a 2-core CPU
    with the same dev Rprec (bench/bench_encoding.py). `query_precision` does the same for queries.
    "auto" (the default of `load_encoder`) means half precision on a GPU and float32 on a CPU. The
    fingerprint is always computed in float32, so it is comparable across devices and precisions.

    `owns_model=True` (set by `load_encoder`) lets an encoder whose passages and queries share one half
    precision cast its model in place instead of keeping a float32 copy beside it: GPU memory holds one
    model. A caller's model (e.g. one being trained) is never cast: a half copy is made instead.
    """

    def __init__(self, model: Any, name: str, batch_size: int | None = CPU_BATCH_SIZE,
                 passage_precision: str = "float32", token_sort: bool = False, query_precision: str = "float32",
                 owns_model: bool = False) -> None:
        for precision in (passage_precision, query_precision):
            if precision not in PRECISIONS:
                raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.model = model
        self.name = name
        device = model_device(model)
        self.batch_size = batch_size or default_batch_size(device)
        self.passage_precision = resolve_precision(passage_precision, device)
        self.query_precision = resolve_precision(query_precision, device)
        self.token_sort = token_sort
        self._fingerprint: list[float] | None = None
        self._models: dict[str, Any] = {"float32": model}
        if owns_model and self.passage_precision == self.query_precision != "float32":
            self._cast_in_place(self.passage_precision)

    def _cast_in_place(self, precision: str) -> None:
        """Record the float32 fingerprint, then cast the model itself: no float32 copy stays in memory."""
        import torch
        self._fingerprint = embedding_fingerprint(self.model)
        self.model = self.model.to(getattr(torch, precision))
        self._models = {precision: self.model}

    @property
    def device(self) -> str:
        return model_device(self.model)

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def _encode_plain(self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False,
                      **kwargs: Any) -> np.ndarray:
        """The float32 model through sentence-transformers' own normalisation (the CPU default)."""
        emb = self.model.encode(list(texts), batch_size=batch_size or self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=show_progress, **kwargs)
        return np.asarray(emb, dtype=np.float32)

    def encode(self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False,
               **kwargs: Any) -> np.ndarray:
        """Encode texts the way queries are (query precision)."""
        if self.query_precision == "float32":
            return self._encode_plain(texts, batch_size, show_progress, **kwargs)
        return self._encode_fast(list(texts), None, self.query_precision, False, batch_size, **kwargs)

    @property
    def wants_domains(self) -> bool:
        """True for models that route by domain (MoE heads): pass `domains=` to encode_query/encode_passage."""
        return bool(getattr(self.model, "wants_domains", False))

    def _domains(self, domains: Sequence[str | None] | None) -> dict[str, Any]:
        return {"domains": list(domains)} if domains is not None and self.wants_domains else {}

    def encode_query(self, texts: Sequence[str], domains: Sequence[str | None] | None = None,
                     **kwargs: Any) -> np.ndarray:
        """`domains` (one per text, None = unknown) is used by domain-routed models and ignored by others."""
        if self.query_precision == "float32":
            return self._encode_plain(texts, **self._domains(domains), **kwargs)
        return self._encode_fast(list(texts), domains, self.query_precision, False, **kwargs)

    def encode_passage(self, texts: Sequence[str], domains: Sequence[str | None] | None = None,
                       **kwargs: Any) -> np.ndarray:
        if self.passage_precision == "float32" and not self.token_sort:
            return self._encode_plain(texts, **self._domains(domains), **kwargs)
        return self._encode_fast(list(texts), domains, self.passage_precision, self.token_sort, **kwargs)

    def model_for(self, precision: str) -> Any:
        """The model in `precision`: the encoder's own, or a cast copy made once (the float32 model stays)."""
        if precision not in self._models:
            import copy

            import torch
            base = self._models.get("float32", self.model)
            self._models[precision] = copy.deepcopy(base).to(getattr(torch, precision))
        return self._models[precision]

    def passage_model(self) -> Any:
        return self.model_for(self.passage_precision)

    def _token_order(self, texts: list[str]) -> np.ndarray:
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:  # no tokenizer to count with: character length is the next best proxy
            return np.argsort([-len(t) for t in texts], kind="stable")
        cap = getattr(self.model, "max_seq_length", None)
        counts = [len(ids) for ids in tokenizer(texts, truncation=cap is not None, max_length=cap)["input_ids"]]
        return np.argsort([-n for n in counts], kind="stable")

    def _encode_fast(self, texts: list[str], domains: Sequence[str | None] | None, precision: str,
                     token_sort: bool, batch_size: int | None = None, **kwargs: Any) -> np.ndarray:
        """Texts through the model in `precision`, renormalised in float32. With token_sort, one encode call
        per batch in token-count order (so the batches stay ours); without, one call for all (sentence-
        transformers then sorts the whole list by length itself)."""
        model, size = self.model_for(precision), batch_size or self.batch_size
        if token_sort:
            order = self._token_order(texts)
            groups = [order[start:start + size] for start in range(0, len(texts), size)]
        else:
            groups = [np.arange(len(texts))]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for idx in groups:
            extra = self._domains([domains[i] for i in idx]) if domains is not None else {}
            emb = model.encode([texts[i] for i in idx], batch_size=size, convert_to_numpy=False,
                               convert_to_tensor=True, normalize_embeddings=False, show_progress_bar=False,
                               **extra, **{k: v for k, v in kwargs.items() if k != "show_progress"})
            if hasattr(emb, "detach"):  # a tensor (bf16 stays a tensor: numpy has no bfloat16)
                emb = emb.detach().float().cpu().numpy()
            emb = np.asarray(emb, dtype=np.float32)
            out[idx] = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return out

    def fingerprint(self) -> list[float]:
        """A few embedding values of a fixed probe: tells two encoders apart even under one name."""
        if self._fingerprint is not None:  # taken in float32 before the model was cast in place
            return self._fingerprint
        return embedding_fingerprint(self._models.get("float32", self.model))


def _load_sentence_transformer(path: str, device: str | None, **_: Any) -> Any:
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(path, device=device, trust_remote_code=False)


# (predicate on the resolved path, loader): the first that accepts the path loads it.
ENCODER_LOADERS: list[tuple[Callable[[str], bool], Callable[..., Any]]] = [
    (is_dense_run, load_dense_run),
    (lambda path: True, _load_sentence_transformer),
]


def load_encoder(name_or_path: str | None = None, device: str | None = None, batch_size: int | None = None,
                 passage_precision: str = "auto", token_sort: bool = False, query_precision: str = "auto",
                 **options: Any) -> DenseEncoder:
    """Load an encoder on `device` (None: CUDA when there is one). Precisions and the batch size default
    by where the model lands: half precision and GPU_BATCH_SIZE on a GPU, float32 and 64 on a CPU."""
    path = resolve_model(name_or_path)
    for accepts, loader in ENCODER_LOADERS:
        if accepts(path):
            model = loader(path, device, **options)
            return DenseEncoder(model, str(name_or_path or "minilm"), batch_size, passage_precision, token_sort,
                                query_precision=query_precision, owns_model=True)
    raise AssertionError("the catch-all loader accepts every path")


def encoder_id(name_or_path: str | None) -> str:
    """What the manifest records: the alias or the resolved path."""
    name = str(name_or_path or "minilm")
    path = Path(name)
    return str(path.resolve()) if path.exists() else name
