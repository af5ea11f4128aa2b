"""Swap config: the dataclasses a swap config file fills (corpora, tasks, models and the top-level settings),
loading and validation."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import load_config_file
from core.errors import RagError
from rag.swap.kinds import CELL_KINDS

DEFAULT_METRICS = ("Rprec", "precision@1", "recall@5", "recall@20")


@dataclass
class ModelSpec:
    """One model variant (a row group of the table)."""
    name: str
    kind: str                              # a CELL_KINDS key: bm25 | dense | generative | reader
    method: str = ""                       # how it was trained: none, untuned, full, iaa, lora, cit λ=0.1 ...
    encoder: str | None = None             # dense: alias, folder, or run folder of `rag train retriever --kind dense`
    run: str | None = None                 # generative: run folder (reader: same as `reader`)
    reader: str | None = None              # reader: run folder of `rag train reader` / `rag experiment cit`
    retriever: str | None = None           # reader: the model (name) whose rankings feed it
    k: int | None = None                   # documents retrieved (default: the config's k)
    num_cpus: float = 1.0
    num_gpus: float = 0.0                  # used only where the cluster has GPUs
    batch_size: int = 64
    options: dict[str, Any] = field(default_factory=dict)   # passed to the kind's loader


@dataclass
class TaskSpec:
    """KILT task data: prepared with a preparer (fanoutqa) or given by path, tied to a corpus."""
    name: str
    corpus: str                            # the corpus (name) its gold provenance refers to
    path: str | None = None
    prepare: str | None = None             # a PREPARERS name, e.g. fanoutqa
    split: str = "dev"                     # prepared: which file (dev, train)
    limit: int | None = None               # first N questions only
    evaluate: bool = True                  # False: carried through derivations (e.g. train data), no cells


@dataclass
class CorpusSpec:
    """A corpus variant. Exactly one of path, prepare, derive."""
    name: str
    label: str = ""
    path: str | None = None                # corpus folder/file, or a derived folder (with derive.json)
    prepare: str | None = None             # a PREPARERS name: vital10k, foldoc, enwiki-mini
    derive: dict[str, Any] | None = None   # {from: CORPUS, transform: NAME, ...transform options}
    part: str | None = None                # which part of a multi-part derivation (topic-holdout: held-in/held-out)
    baseline: str | None = None            # the corpus this one is compared against (CRP); None: an original
    evaluate: bool = True                  # False: a source for derivations only
    optional: bool = False                 # a transform missing from this build: cells "unavailable", not an error
    tasks: list[str] | None = None         # restrict the evaluated tasks


@dataclass
class SwapConfig:
    name: str = "corpus-swap"
    corpora: list[CorpusSpec] = field(default_factory=list)
    tasks: list[TaskSpec] = field(default_factory=list)
    models: list[ModelSpec] = field(default_factory=list)
    k: int = 100
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 100])
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    max_retries: int = 1                   # retries per cell (and per index build) after the first attempt
    workers: int = 2                       # local Ray CPUs; 0 = no Ray, cells one by one in this process
    data_dir: str | None = None            # prepared/derived data (default OUT/data)
    index_dir: str | None = None           # index cache (default OUT/indexes)
    description: str = ""


def _named_list(value: Any, what: str) -> list[dict[str, Any]]:
    """`{name: {...}}` or `[{name: ..., ...}]` -> list of dicts with a name."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        items = []
        for name, body in value.items():
            body = dict(body or {})
            if "name" in body and body["name"] != name:
                raise RagError(f"{what} {name!r}: the key and name: {body['name']!r} differ")
            items.append({**body, "name": str(name)})
        return items
    if isinstance(value, list) and all(isinstance(v, Mapping) and "name" in v for v in value):
        return [dict(v) for v in value]
    raise RagError(f"{what}: expected a mapping name -> settings or a list of mappings with a name")


def _build(cls: type, raw: Mapping[str, Any], what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    data = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RagError(f"{what}: unknown option(s) {unknown}; allowed: {', '.join(sorted(names))}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise RagError(f"{what}: {exc}") from None


def swap_config_from_dict(data: Mapping[str, Any]) -> SwapConfig:
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    corpora = [_build(CorpusSpec, c, f"corpus {c['name']!r}") for c in _named_list(data.pop("corpora", None), "corpora")]
    tasks = [_build(TaskSpec, t, f"task {t['name']!r}") for t in _named_list(data.pop("tasks", None), "tasks")]
    models = [_build(ModelSpec, m, f"model {m['name']!r}") for m in _named_list(data.pop("models", None), "models")]
    config = _build(SwapConfig, {**data, "corpora": corpora, "tasks": tasks, "models": models}, "swap config")
    validate_config(config)
    return config


def load_swap_config(path: str | Path) -> SwapConfig:
    return swap_config_from_dict(load_config_file(path))


def validate_config(config: SwapConfig) -> None:
    corpora = {c.name: c for c in config.corpora}
    models = {m.name: m for m in config.models}
    for group, names in (("corpora", [c.name for c in config.corpora]), ("tasks", [t.name for t in config.tasks]),
                         ("models", [m.name for m in config.models])):
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RagError(f"swap config: duplicate {group} names {dupes}")
    if not config.models or not any(c.evaluate for c in config.corpora):
        raise RagError("swap config: needs at least one model and one evaluated corpus")
    for c in config.corpora:
        sources = [s for s in (c.path, c.prepare, c.derive) if s]
        if len(sources) != 1:
            raise RagError(f"corpus {c.name!r}: give exactly one of path, prepare, derive")
        if c.derive is not None:
            if not isinstance(c.derive, Mapping) or "from" not in c.derive or "transform" not in c.derive:
                raise RagError(f"corpus {c.name!r}: derive needs `from` and `transform`")
            if c.derive["from"] not in corpora:
                raise RagError(f"corpus {c.name!r}: derives from unknown corpus {c.derive['from']!r}")
        if c.baseline is not None and c.baseline not in corpora:
            raise RagError(f"corpus {c.name!r}: unknown baseline {c.baseline!r}")
    for t in config.tasks:
        if t.corpus not in corpora:
            raise RagError(f"task {t.name!r}: unknown corpus {t.corpus!r}")
        if bool(t.path) == bool(t.prepare):
            raise RagError(f"task {t.name!r}: give exactly one of path, prepare")
    for m in config.models:
        if m.kind not in CELL_KINDS:
            raise RagError(f"model {m.name!r}: unknown kind {m.kind!r}; known: {', '.join(sorted(CELL_KINDS))}")
        if m.retriever is not None and m.retriever not in models:
            raise RagError(f"model {m.name!r}: unknown retriever model {m.retriever!r}")
    _derive_order(config)  # raises on cycles


def _derive_order(config: SwapConfig) -> list[CorpusSpec]:
    by_name = {c.name: c for c in config.corpora}
    order: list[CorpusSpec] = []
    state: dict[str, int] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise RagError(f"swap config: corpora derive from each other in a cycle: {' -> '.join(chain + (name,))}")
        state[name] = 1
        spec = by_name[name]
        if spec.derive is not None:
            visit(spec.derive["from"], chain + (name,))
        state[name] = 2
        order.append(spec)

    for c in config.corpora:
        visit(c.name, ())
    return order

