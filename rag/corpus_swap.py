"""Corpus-swap generalisation harness: `rag eval corpus-swap --config SWAP.yaml --out DIR [--address ADDR]`.

A swap config names corpora (prepared, given by path, or derived from another with a transform of
eval/corpus_variants.py or rag/transforms.py), task files tied to them, and models (bm25, dense encoders
or run folders, generative retrievers, readers). The matrix is model x evaluated corpus x task; each cell
(retrieve, read, evaluate with the official KILT metrics) is one Ray task:

1. the driver prepares and derives the data (cheap, deterministic, cached under OUT/data);
2. every index the cells need is built once, as its own Ray task (one per (corpus, index kind, encoder),
   cached under OUT/indexes), so no two cells ever build the same index; a cell takes its index build's
   result as an argument, so Ray starts it as soon as its index exists;
3. cells run as Ray tasks with `num_cpus`/`num_gpus` from the model's config (GPUs only where the cluster
   has some), retried `max_retries` times on any exception or worker loss, then reported failed; the
   others carry on;
4. the driver appends each cell's row to OUT/results.jsonl as soon as the cell finishes (one O_APPEND
   write per row, fsynced); a rerun skips cells whose latest row is `ok` for the same spec (model, corpus
   and task checksums, k), so an interrupted or partly failed run resumes;
5. OUT/table.md (all cells, then "original vs swapped" with CRP = swapped / baseline per metric),
   OUT/plots/*.png (each metric per model on every corpus; CRP per model) and OUT/summary.json.

Cell kinds live in CELL_KINDS (name -> CellKind(run, index)); adding one is one entry. A kind whose
module is not in this build (generative retrieval, readers) reports status "unavailable", never a fake
score. `workers=0` runs everything in this process without Ray (the reference the Ray path must match).
On a multi-node cluster, OUT must be on a filesystem every node sees.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import load_config_file
from core.errors import RagError

log = logging.getLogger("rag.corpus_swap")

RESULTS = "results.jsonl"
TABLE = "table.md"
SUMMARY = "summary.json"
PLOTS = "plots"
DEFAULT_METRICS = ("Rprec", "precision@1", "recall@5", "recall@20")
READER_METRICS = ("em", "f1", "KILT-em")
STATUS_OK, STATUS_FAILED, STATUS_UNAVAILABLE = "ok", "failed", "unavailable"


class CellUnavailable(RagError):
    """The cell's kind (or a module it needs) is not in this build: reported, never retried or faked."""


# --------------------------------------------------------------------------- config

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


# --------------------------------------------------------------------------- plan: cells and indexes

@dataclass
class IndexSpec:
    kind: str                  # an INDEX_BUILDERS key
    corpus: str                # corpus file
    dir: str                   # where the index goes
    encoder: str | None = None # dense: the encoder; trie: the generative model (run folder) whose tokenizer it uses
    batch_size: int = 64
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class CellSpec:
    key: str                   # model|corpus|task
    spec_hash: str             # changes when the model, data or settings change: a rerun redoes the cell
    model: ModelSpec
    corpus: str
    corpus_label: str
    corpus_path: str
    baseline: str | None
    task: str
    task_path: str
    pseudo: bool
    k: int
    ks: list[int]
    workdir: str
    index_dir: str | None = None
    retriever_model: ModelSpec | None = None
    unavailable: str | None = None      # set when the corpus itself could not be made (optional transform)


@dataclass
class CorpusState:
    spec: CorpusSpec
    corpus: Path | None = None
    tasks: dict[str, Path] = field(default_factory=dict)
    pseudo: bool = False
    unavailable: str | None = None


@dataclass
class SwapPlan:
    config: SwapConfig
    out: Path
    corpora: dict[str, CorpusState]
    cells: list[CellSpec]
    indexes: dict[str, IndexSpec]      # by dir


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


def _hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:n]


_CHECKSUMS: dict[tuple[str, float, int], str] = {}


def _checksum(path: Path) -> str:
    from core.corpus import file_checksum
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime, stat.st_size)
    if key not in _CHECKSUMS:
        _CHECKSUMS[key] = file_checksum(path)
    return _CHECKSUMS[key]


def _limited(path: Path, limit: int | None, out: Path) -> Path:
    if limit is None:
        return path
    from core.io import atomic_file
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    target = out / f"{path.stem}.first{limit}.jsonl"
    if not target.exists() or target.read_text(encoding="utf-8") != "\n".join(lines) + "\n":
        with atomic_file(target) as fh:
            fh.write("\n".join(lines) + "\n")
    return target


def _transform(name: str) -> Callable[..., Any] | None:
    """This module's transforms first, then those registered in rag/transforms.py (e.g. counterfactual)."""
    from eval.corpus_variants import VARIANT_TRANSFORMS
    if name in VARIANT_TRANSFORMS:
        return VARIANT_TRANSFORMS[name]
    try:
        import rag.transforms as extra
    except ImportError:
        return None
    entry = (getattr(extra, "TRANSFORMS", None) or {}).get(name)
    if entry is None:
        return None
    if getattr(entry, "derive", None) is not None:  # a file-level transform (this module's signature)
        return entry.derive
    # rag/transforms.py registers Transform(fn(corpus_rows, qa_rows, seed) -> (corpus_rows, qa_rows, stats), ...)
    from functools import partial

    from eval.corpus_variants import derive_from_rows
    return partial(derive_from_rows, name, getattr(entry, "fn", entry))


def _call_transform(fn: Callable[..., Any], corpus: Path, out: Path, tasks: Mapping[str, Path],
                    options: Mapping[str, Any]) -> None:
    """Call a transform with the shared signature `(corpus, out_dir, *, tasks=..., **options)`."""
    fn(corpus, out, tasks=dict(tasks), **options)


def materialize_data(config: SwapConfig, out: Path) -> dict[str, CorpusState]:
    """Prepare, derive (cached by content) and resolve every corpus and its tasks, in dependency order."""
    from eval.corpus_variants import resolve_part
    from rag.data.preparers import PREPARERS

    data_dir = Path(config.data_dir) if config.data_dir else out / "data"
    states: dict[str, CorpusState] = {}
    tasks_by_corpus: dict[str, list[TaskSpec]] = {}
    for t in config.tasks:
        tasks_by_corpus.setdefault(t.corpus, []).append(t)

    for spec in _derive_order(config):
        state = CorpusState(spec)
        states[spec.name] = state
        if spec.prepare:
            if spec.prepare not in PREPARERS:
                raise RagError(f"corpus {spec.name!r}: unknown preparer {spec.prepare!r}; known: {sorted(PREPARERS)}")
            folder = data_dir / "corpora" / spec.name
            if not (folder / "corpus.jsonl").exists():
                log.info("preparing %s (%s)", spec.name, spec.prepare)
                PREPARERS[spec.prepare](folder)
            state.corpus = folder / "corpus.jsonl"
        elif spec.path:
            resolved = resolve_part(spec.path, spec.part)
            state.corpus, state.tasks, state.pseudo = resolved["corpus"], dict(resolved["tasks"]), resolved["pseudo"]
        else:
            source = states[spec.derive["from"]]
            if source.unavailable:
                state.unavailable = f"its source corpus {source.spec.name!r} is unavailable"
                state.tasks = dict(source.tasks)
                continue
            name = spec.derive["transform"]
            options = {k: v for k, v in spec.derive.items() if k not in ("from", "transform")}
            fn = _transform(name)
            if fn is None:
                reason = f"transform {name!r} is not in this build (rag/transforms.py or eval/corpus_variants.py)"
                if not spec.optional:
                    raise RagError(f"corpus {spec.name!r}: {reason}")
                log.warning("corpus %s skipped: %s", spec.name, reason)
                state.unavailable, state.tasks = reason, dict(source.tasks)
                continue
            key = {"transform": name, "options": options, "corpus": _checksum(source.corpus),
                   "tasks": {n: _checksum(p) for n, p in sorted(source.tasks.items())}}
            folder = data_dir / "derived" / f"{_slug(name)}-{_hash(key)}"
            if not folder.exists():
                log.info("deriving %s: %s from %s", spec.name, name, source.spec.name)
                try:
                    _call_transform(fn, source.corpus, folder, source.tasks, options)
                except Exception as exc:
                    if not spec.optional:
                        raise
                    log.warning("corpus %s skipped: transform %s failed: %s", spec.name, name, exc)
                    state.unavailable, state.tasks = f"transform {name!r} failed: {exc}", dict(source.tasks)
                    continue
            resolved = resolve_part(folder, spec.part)
            state.corpus, state.tasks, state.pseudo = resolved["corpus"], dict(resolved["tasks"]), resolved["pseudo"]
        for t in tasks_by_corpus.get(spec.name, []):
            if t.path:
                path = Path(t.path)
            else:
                folder = data_dir / "tasks" / t.name
                if not (folder / f"{t.split}.jsonl").exists():
                    if t.prepare not in PREPARERS:
                        raise RagError(f"task {t.name!r}: unknown preparer {t.prepare!r}")
                    log.info("preparing task %s (%s over %s)", t.name, t.prepare, spec.name)
                    PREPARERS[t.prepare](folder, corpus_dir=state.corpus)
                path = folder / f"{t.split}.jsonl"
            state.tasks[t.name] = _limited(path, t.limit, data_dir / "tasks" / t.name)
    return states


def _index_request(model: ModelSpec, models: Mapping[str, ModelSpec]) -> tuple[str, ModelSpec] | None:
    """(index kind, the model that defines it) a model's cells need, if any."""
    kind = CELL_KINDS[model.kind]
    if kind.index is not None:
        return kind.index, model
    if model.retriever is not None:
        return _index_request(models[model.retriever], models)
    return None


def _settings(model: ModelSpec | None) -> dict[str, Any] | None:
    """A model's non-default settings (a field added later with a default does not invalidate old results)."""
    if model is None:
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec) if f.default is not dataclasses.MISSING}
    return {k: v for k, v in dataclasses.asdict(model).items() if k not in defaults or v != defaults[k]}


def plan_swap(config: SwapConfig, out: str | Path) -> SwapPlan:
    out = Path(out)
    states = materialize_data(config, out)
    index_root = Path(config.index_dir) if config.index_dir else out / "indexes"
    models = {m.name: m for m in config.models}
    no_cells = {t.name for t in config.tasks if not t.evaluate}
    cells: list[CellSpec] = []
    indexes: dict[str, IndexSpec] = {}
    for state in states.values():
        spec = state.spec
        if not spec.evaluate:
            continue
        task_names = [n for n in state.tasks if n not in no_cells and (spec.tasks is None or n in spec.tasks)]
        for model in config.models:
            request = _index_request(model, models)
            for task in task_names:
                cell_id = f"{model.name}|{spec.name}|{task}"
                workdir = out / "cells" / f"{_slug(model.name)}--{_slug(spec.name)}--{_slug(task)}"
                k = model.k or config.k
                cell = CellSpec(key=cell_id, spec_hash="", model=model, corpus=spec.name,
                                corpus_label=spec.label or spec.name, corpus_path=str(state.corpus or ""),
                                baseline=spec.baseline, task=task, task_path=str(state.tasks[task]),
                                pseudo=state.pseudo, k=k, ks=list(config.ks), workdir=str(workdir),
                                retriever_model=models.get(model.retriever) if model.retriever else None,
                                unavailable=state.unavailable)
                if cell.unavailable is None and CELL_KINDS[model.kind].available is not None:
                    cell.unavailable = CELL_KINDS[model.kind].available()
                if cell.unavailable is None:
                    if request is not None:
                        index_kind, owner = request
                        encoder = {"dense": owner.encoder, "trie": owner.run}.get(index_kind)
                        ident = {"kind": index_kind, "encoder": encoder, "corpus": _checksum(state.corpus)}
                        tag = f"{index_kind}-{_slug(Path(encoder).name) + '-' if encoder else ''}{_hash(ident, 8)}"
                        index_dir = str(index_root / _slug(spec.name) / tag)
                        indexes.setdefault(index_dir, IndexSpec(index_kind, str(state.corpus), index_dir, encoder,
                                                                owner.batch_size, owner.num_cpus, owner.num_gpus))
                        cell.index_dir = index_dir
                    cell.spec_hash = _hash({
                        "model": _settings(model), "retriever": _settings(cell.retriever_model),
                        "corpus": _checksum(state.corpus), "task": _checksum(Path(cell.task_path)),
                        "k": k, "ks": cell.ks})
                cells.append(cell)
    return SwapPlan(config, out, states, cells, indexes)


# --------------------------------------------------------------------------- index builders

def _build_bm25(spec: IndexSpec) -> None:
    from retrievers.bm25 import build_bm25_index
    build_bm25_index(spec.corpus, spec.dir, overwrite=True)


def _build_dense(spec: IndexSpec) -> None:
    from retrievers.dense_build import DenseBuildConfig, build_dense_index
    build_dense_index(spec.corpus, spec.dir, DenseBuildConfig(encoder=spec.encoder, batch_size=spec.batch_size),
                      overwrite=True)


def _build_trie(spec: IndexSpec) -> None:
    from retrievers.generative.index import TrieBuildConfig, build_trie_index
    build_trie_index(spec.corpus, spec.dir, TrieBuildConfig(model=spec.encoder), overwrite=True)


INDEX_BUILDERS: dict[str, Callable[[IndexSpec], None]] = {"bm25": _build_bm25, "dense": _build_dense,
                                                          "trie": _build_trie}


def index_ready(index_dir: str | Path) -> bool:
    from index.manifest import MANIFEST
    return (Path(index_dir) / MANIFEST).exists()


def build_index(spec: IndexSpec) -> str:
    """Build one index unless a finished one is there; returns its folder."""
    if not index_ready(spec.dir):
        start = time.perf_counter()
        INDEX_BUILDERS[spec.kind](spec)
        log.info("built %s index %s in %.1fs", spec.kind, spec.dir, time.perf_counter() - start)
    return spec.dir


# --------------------------------------------------------------------------- cell kinds

def _retrieve(cell: CellSpec, workdir: Path, index_dir: str, model: ModelSpec):
    from rag.commands.retrieve import retrieve_queries
    from core.tasks import load_queries
    from retrievers import open_retriever

    queries = load_queries(cell.task_path)
    retriever = open_retriever(index_dir, **model.options)
    rankings = retrieve_queries(retriever, [q.text for q in queries], cell.k, model.batch_size)
    return queries, rankings


def _flatten(result: Mapping[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"n": result["n"]}
    for section in ("retrieval", "downstream", "kilt"):
        metrics.update(result.get(section) or {})
    return metrics


def _score(cell: CellSpec, workdir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from eval.kilt import evaluate_kilt
    from core.io import write_jsonl

    write_jsonl(workdir / "guesses.jsonl", rows)
    return _flatten(evaluate_kilt(rows, cell.task_path, ks=cell.ks))


def retrieval_cell(cell: CellSpec, workdir: Path) -> dict[str, Any]:
    """bm25 / dense: retrieve top-k from the cell's index, score with the official KILT metrics."""
    from core.tasks import guess_rows
    queries, rankings = _retrieve(cell, workdir, cell.index_dir, cell.model)
    return _score(cell, workdir, guess_rows(queries, rankings))


def _module_missing(*modules: str) -> str | None:
    """None when every module imports; else why not (a kind whose modules are absent is "unavailable")."""
    import importlib
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} is not in this build ({exc})"
    return None


def _generative_available() -> str | None:
    return _module_missing("retrievers.generative.index", "retrievers.generative.retriever")


def _reader_available() -> str | None:
    missing = _module_missing("readers.base")
    if missing:
        return missing
    import importlib
    base = importlib.import_module("readers.base")
    return None if hasattr(base, "load_reader") and hasattr(base, "ReaderPassage") else \
        "readers.base has no load_reader / ReaderPassage"


def reader_cell(cell: CellSpec, workdir: Path) -> dict[str, Any]:
    """A trained reader (`reader: RUN_DIR`) over the rankings of its `retriever` model on this corpus variant:
    KILT retrieval metrics of the ranking, plus em / f1 / KILT-* of the answers. The reader reads the top
    `options.passages` (default 5) passages; other options (max_passage_tokens, num_beams, ...) override its
    ReaderConfig; options.kind (fid | causal) is read from the run folder when not given."""
    reason = _reader_available()
    if reason:
        raise CellUnavailable(reason)
    from readers.base import ReaderPassage, load_reader
    from core.tasks import guess_rows

    run_dir = cell.model.reader or cell.model.run
    if not run_dir:
        raise RagError(f"model {cell.model.name!r}: a reader cell needs reader: RUN_DIR")
    if cell.retriever_model is None or cell.index_dir is None:
        raise RagError(f"model {cell.model.name!r}: a reader cell needs retriever: MODEL (bm25 or dense)")
    options = dict(cell.model.options)
    n_passages = int(options.pop("passages", 5))
    kind, device = options.pop("kind", None), options.pop("device", None)
    batch_size = int(options.pop("batch_size", 8))
    queries, rankings = _retrieve(cell, workdir, cell.index_dir, cell.retriever_model)
    reader = load_reader(kind, run_dir, device=device, config_overrides=options or None)
    passages = [[ReaderPassage.from_hit(h) for h in hits[:n_passages]] for hits in rankings]
    answers = [a for a, _ in reader.answer_with_meta([q.text for q in queries], passages, batch_size)]
    return _score(cell, workdir, guess_rows(queries, rankings, answers))


@dataclass(frozen=True)
class CellKind:
    """run(cell, workdir) -> metrics. index: the INDEX_BUILDERS kind its cells read (None: none, or its retriever
    model's); available() -> None, or why the kind is not in this build (its cells are then "unavailable")."""
    run: Callable[[CellSpec, Path], dict[str, Any]]
    index: str | None = None
    available: Callable[[], str | None] | None = None
    description: str = ""


CELL_KINDS: dict[str, CellKind] = {
    "bm25": CellKind(retrieval_cell, "bm25", None, "BM25 (bm25s) over the corpus variant; no model"),
    "dense": CellKind(retrieval_cell, "dense", None,
                      "bi-encoder (alias or `rag train retriever --kind dense` run) + Faiss over the variant"),
    "generative": CellKind(retrieval_cell, "trie", _generative_available,
                           "CorpusBrain run folder (`run:`); title trie of the corpus variant"),
    "reader": CellKind(reader_cell, None, _reader_available,
                       "reader run folder (`reader:`; fid / causal, e.g. CIT) over a `retriever:` model"),
}


# --------------------------------------------------------------------------- running one cell

def _attempts_path(cell: CellSpec) -> Path:
    return Path(cell.workdir) / "attempts.log"


def _base_row(cell: CellSpec) -> dict[str, Any]:
    return {"cell": cell.key, "spec_hash": cell.spec_hash, "model": cell.model.name, "kind": cell.model.kind,
            "method": cell.model.method, "corpus": cell.corpus, "corpus_label": cell.corpus_label,
            "baseline": cell.baseline, "task": cell.task, "pseudo": cell.pseudo, "task_path": cell.task_path,
            "workdir": cell.workdir}


def run_cell(cell: CellSpec, *_index_ready: Any) -> dict[str, Any]:
    """One attempt at one cell -> its row. Raises on failure (the caller retries); unavailable is a row."""
    workdir = Path(cell.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(_attempts_path(cell), "a", encoding="utf-8") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid={os.getpid()}\n")
    row = _base_row(cell)
    start = time.perf_counter()
    try:
        if cell.unavailable:
            raise CellUnavailable(cell.unavailable)
        metrics = CELL_KINDS[cell.model.kind].run(cell, workdir)
    except CellUnavailable as exc:
        return {**row, "status": STATUS_UNAVAILABLE, "reason": str(exc), "metrics": {}, "seconds": 0.0,
                "attempts": 1, "finished_at": _now()}
    seconds = round(time.perf_counter() - start, 3)
    return {**row, "status": STATUS_OK, "metrics": metrics, "seconds": seconds,
            "attempts": _count_attempts(cell), "finished_at": _now()}


def _count_attempts(cell: CellSpec) -> int:
    try:
        return sum(1 for line in _attempts_path(cell).read_text(encoding="utf-8").splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _failed_row(cell: CellSpec, exc: BaseException) -> dict[str, Any]:
    cause = getattr(exc, "cause", None) or exc
    attempts = _count_attempts(cell)
    message = f"{type(cause).__name__}: {cause}".strip().splitlines()
    error = message[-1] if message else type(cause).__name__
    if attempts == 0:
        error = f"its index could not be built: {error}"
    Path(cell.workdir).mkdir(parents=True, exist_ok=True)
    (Path(cell.workdir) / "error.txt").write_text(
        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), encoding="utf-8")
    return {**_base_row(cell), "status": STATUS_FAILED, "error": error[:500], "metrics": {}, "seconds": None,
            "attempts": attempts, "finished_at": _now()}


# --------------------------------------------------------------------------- results file

def append_row(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one JSON line with a single O_APPEND write, then fsync: a row is either whole or absent."""
    data = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """The latest row of each cell; a torn last line (a crash mid-write) is skipped."""
    latest: dict[str, dict[str, Any]] = {}
    path = Path(path)
    if not path.exists():
        return latest
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d: not a whole row (interrupted write?); ignored", path, lineno)
            continue
        if isinstance(row, dict) and "cell" in row:
            latest[row["cell"]] = row
    return latest


# --------------------------------------------------------------------------- execution

def _with_retries(fn: Callable[[], Any], retries: int) -> Any:
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception:
            if attempt == retries:
                raise
            log.warning("attempt %d failed; retrying", attempt + 1, exc_info=True)


def _execute_local(plan: SwapPlan, todo: list[CellSpec], emit: Callable[[dict[str, Any]], None]) -> None:
    """No Ray: index builds, then cells, one by one in this process (same retries and rows)."""
    retries = plan.config.max_retries
    failed_index: dict[str, BaseException] = {}
    for spec in _needed_indexes(plan, todo):
        try:
            _with_retries(lambda spec=spec: build_index(spec), retries)
        except Exception as exc:  # noqa: BLE001 - reported on the cells that need it
            failed_index[spec.dir] = exc
    for cell in todo:
        if cell.index_dir in failed_index:
            emit(_failed_row(cell, failed_index[cell.index_dir]))
            continue
        try:
            emit(_with_retries(lambda cell=cell: run_cell(cell), retries))
        except Exception as exc:  # noqa: BLE001
            emit(_failed_row(cell, exc))


def _set_threads(num_cpus: float) -> None:
    try:
        import torch
        torch.set_num_threads(max(1, int(num_cpus)))
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _ray_build_index(spec: IndexSpec) -> str:
    _set_threads(spec.num_cpus)
    return build_index(spec)


def _ray_run_cell(cell: CellSpec, *index_ready: Any) -> dict[str, Any]:
    _set_threads(cell.model.num_cpus)
    return run_cell(cell, *index_ready)


def _needed_indexes(plan: SwapPlan, todo: Iterable[CellSpec]) -> list[IndexSpec]:
    dirs = dict.fromkeys(c.index_dir for c in todo if c.index_dir and not c.unavailable)
    return [plan.indexes[d] for d in dirs if not index_ready(d)]


def _execute_ray(plan: SwapPlan, todo: list[CellSpec], emit: Callable[[dict[str, Any]], None],
                 address: str | None, workers: int) -> None:
    from core.ray_runtime import ray_session

    retries = plan.config.max_retries
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAG_HOME", "HF_HOME",
                                      "TOKENIZERS_PARALLELISM") if k in os.environ}
    with ray_session(address=address, num_cpus=None if address else workers,
                     runtime_env={"env_vars": env} if env else None) as ray:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        build = ray.remote(_ray_build_index)
        cell_task = ray.remote(_ray_run_cell)
        index_refs = {}
        for spec in _needed_indexes(plan, todo):
            index_refs[spec.dir] = build.options(
                num_cpus=spec.num_cpus, num_gpus=spec.num_gpus if has_gpus else 0,
                max_retries=retries, retry_exceptions=True, name=f"index:{Path(spec.dir).parent.name}/{Path(spec.dir).name}",
            ).remote(spec)
        pending = {}
        for cell in todo:
            deps = [index_refs[cell.index_dir]] if cell.index_dir in index_refs else []
            ref = cell_task.options(
                num_cpus=cell.model.num_cpus, num_gpus=cell.model.num_gpus if has_gpus else 0,
                max_retries=retries, retry_exceptions=True, name=f"cell:{cell.key}",
            ).remote(cell, *deps)
            pending[ref] = cell
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                cell = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - retries are spent: report and go on
                    row = _failed_row(cell, exc)
                emit(row)


def run_plan(plan: SwapPlan, address: str | None = None, workers: int | None = None) -> list[dict[str, Any]]:
    """Run the cells not finished yet; return the latest row of every cell, in plan order."""
    out = plan.out
    results_path = out / RESULTS
    previous = read_results(results_path)
    todo = []
    for cell in plan.cells:
        row = previous.get(cell.key)
        if row and row.get("status") == STATUS_OK and row.get("spec_hash") == cell.spec_hash:
            continue
        todo.append(cell)
    skipped = len(plan.cells) - len(todo)
    workers = plan.config.workers if workers is None else workers
    log.info("%d cells: %d finished before, %d to run (%s)", len(plan.cells), skipped, len(todo),
             "no Ray" if workers == 0 and not address else f"Ray, {address or f'{workers} local workers'}")

    def emit(row: dict[str, Any]) -> None:
        append_row(results_path, row)
        shown = row.get("error") or row.get("reason") or ", ".join(
            f"{m}={row['metrics'][m]:.4f}" for m in plan.config.metrics if m in row.get("metrics", {}))
        log.info("cell %s: %s %s", row["cell"], row["status"], shown)

    for cell in todo:
        _attempts_path(cell).unlink(missing_ok=True)
    if todo:
        if workers == 0 and not address:
            _execute_local(plan, todo, emit)
        else:
            if workers is not None and workers < 1 and not address:
                raise RagError("workers must be >= 0")
            _execute_ray(plan, todo, emit, address, workers)
    latest = read_results(results_path)
    return [latest[c.key] for c in plan.cells if c.key in latest]


# --------------------------------------------------------------------------- CRP, table, plots

def _baseline_row(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The same model's row on the baseline corpus: same task if there is one, else its first task."""
    candidates = [r for r in rows if r["model"] == row["model"] and r["corpus"] == row.get("baseline")]
    for r in candidates:
        if r["task"] == row["task"]:
            return r
    return candidates[0] if candidates else None


def pair_baselines(rows: Sequence[dict[str, Any]], ks: Sequence[int]) -> None:
    """Where a swapped cell asks a strict subset of its baseline's questions (same task; e.g. counterfactual
    keeps only the questions whose answer it changed), score the baseline's guesses on that subset too:
    row["baseline_metrics"], row["paired_n"]. CRP then compares the same questions."""
    from eval.kilt import evaluate_kilt
    from core.io import read_jsonl

    for row in rows:
        row.pop("baseline_metrics", None)
        row.pop("paired_n", None)
        base = _baseline_row(row, rows) if row.get("baseline") else None
        if (base is None or row.get("status") != STATUS_OK or base.get("status") != STATUS_OK
                or base["task"] != row["task"] or not row.get("task_path") or not base.get("task_path")):
            continue
        try:
            ids = [str(r["id"]).strip() for r in read_jsonl(row["task_path"])]
            gold = {str(r["id"]).strip(): r for r in read_jsonl(base["task_path"])}
            if len(ids) >= len(gold) or not set(ids) <= gold.keys():
                continue
            wanted = set(ids)
            guesses = [g for g in read_jsonl(Path(base["workdir"]) / "guesses.jsonl") if str(g["id"]).strip() in wanted]
            row["baseline_metrics"] = _flatten(evaluate_kilt(guesses, [gold[i] for i in ids], ks=ks))
            row["paired_n"] = len(ids)
        except (RagError, OSError, KeyError) as exc:
            log.warning("cell %s: could not pair with its baseline: %s", row["cell"], exc)


def corpus_relative(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """CRP = swapped / baseline for every row with a baseline (None where either is missing or 0)."""
    out = []
    for row in rows:
        if not row.get("baseline"):
            continue
        base = _baseline_row(row, rows)
        names = metrics or sorted(row.get("metrics") or {})
        crp = {}
        base_metrics = row.get("baseline_metrics") or ((base.get("metrics") or {}) if base else {})
        for m in names:
            value = (row.get("metrics") or {}).get(m)
            ref = base_metrics.get(m) if base else None
            crp[m] = (value / ref) if (row.get("status") == STATUS_OK and base and base.get("status") == STATUS_OK
                                       and isinstance(value, (int, float)) and ref) else None
        out.append({"model": row["model"], "method": row.get("method", ""), "corpus": row["corpus"],
                    "corpus_label": row.get("corpus_label", row["corpus"]), "task": row["task"],
                    "pseudo": row.get("pseudo", False), "baseline": row["baseline"],
                    "baseline_task": base["task"] if base else None,
                    "status": row.get("status"), "baseline_status": base.get("status") if base else None,
                    "swapped": {m: (row.get("metrics") or {}).get(m) for m in names},
                    "original": {m: base_metrics.get(m) if base else None for m in names},
                    "paired_n": row.get("paired_n"), "crp": crp})
    return out


def _table_metrics(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None) -> list[str]:
    present = {m for r in rows for m in (r.get("metrics") or {})}
    chosen = [m for m in (metrics or DEFAULT_METRICS) if m in present or not present]
    chosen += [m for m in READER_METRICS if m in present and m not in chosen]
    return chosen


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def format_swap_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """Markdown: every cell, then "original vs swapped" (baseline -> swapped, CRP) per model and corpus."""
    rows = list(rows)
    names = _table_metrics(rows, metrics)
    pseudo_mark = "†"
    any_pseudo = any(r.get("pseudo") for r in rows)

    def task_cell(r: Mapping[str, Any]) -> str:
        return f"{r['task']}{pseudo_mark}" if r.get("pseudo") else r["task"]

    lines = ["### Cells", "",
             "| model | method | corpus | task | status | n | " + " | ".join(names) + " | s |",
             "|" + "---|" * (len(names) + 7)]
    for r in rows:
        m = r.get("metrics") or {}
        status = r.get("status", "")
        if status != STATUS_OK:
            status = f"{status}: {(r.get('error') or r.get('reason') or '')[:80]}"
        lines.append(f"| {r['model']} | {r.get('method') or ''} | {r.get('corpus_label') or r['corpus']} | "
                     f"{task_cell(r)} | {status} | {m.get('n', '')} | " + " | ".join(_fmt(m.get(x)) for x in names)
                     + f" | {r['seconds'] if r.get('seconds') is not None else ''} |")
    crp_rows = corpus_relative(rows, names)
    if crp_rows:
        lines += ["", "### Original vs swapped", "",
                  "Each cell: baseline → swapped (CRP = swapped / baseline; 1.00 = the model did not move).", "",
                  "| model | method | swapped corpus | vs | task | " + " | ".join(names) + " |",
                  "|" + "---|" * (len(names) + 5)]
        label = {r["corpus"]: r.get("corpus_label") or r["corpus"] for r in rows}
        for c in crp_rows:
            cells = []
            for x in names:
                if c["status"] != STATUS_OK or c["baseline_status"] != STATUS_OK:
                    cells.append(c["status"] if c["status"] != STATUS_OK else f"baseline {c['baseline_status']}")
                    continue
                crp = c["crp"][x]
                cells.append(f"{_fmt(c['original'][x])} → {_fmt(c['swapped'][x])} "
                             f"({crp:.2f})" if crp is not None else
                             f"{_fmt(c['original'][x])} → {_fmt(c['swapped'][x])} (–)")
            task = task_cell(c)
            if c["baseline_task"] and c["baseline_task"] != c["task"]:
                task += f" (vs {c['baseline_task']})"
            if c.get("paired_n"):
                task += f" (paired: the {c['paired_n']} questions it keeps)"
            lines.append(f"| {c['model']} | {c['method'] or ''} | {c['corpus_label']} | "
                         f"{label.get(c['baseline'], c['baseline'])} | {task} | " + " | ".join(cells) + " |")
    if any_pseudo:
        lines += ["", f"{pseudo_mark} pseudo-queries (a definition sentence with its term masked -> the term's "
                  "entry), not real questions: compare with care."]
    return "\n".join(lines) + "\n"


def write_plots(rows: Sequence[Mapping[str, Any]], folder: str | Path, metrics: Sequence[str]) -> list[Path]:
    """plots/metric-<m>.png: each metric per model on every corpus; plots/crp-<m>.png: CRP per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r.get("status") == STATUS_OK]
    if not ok:
        return []
    models = list(dict.fromkeys(r["model"] for r in rows))
    method = {r["model"]: r.get("method") or "" for r in rows}
    xlabels = [f"{m}\n({method[m]})" if method[m] else m for m in models]

    def series_key(r: Mapping[str, Any]) -> str:
        name = r.get("corpus_label") or r["corpus"]
        return f"{name} [pseudo]" if r.get("pseudo") else name

    paths: list[Path] = []

    def bars(title: str, series: dict[str, list[float]], path: Path, ylabel: str, hline: float | None = None) -> None:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(models) * max(1, len(series)) / 2), 4.2))
        width = 0.8 / max(1, len(series))
        x = np.arange(len(models))
        for i, (name, values) in enumerate(series.items()):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        if hline is not None:
            ax.axhline(hline, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(x, xlabels)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    for metric in metrics:
        series: dict[str, list[float]] = {}
        for r in ok:
            if metric in (r.get("metrics") or {}):
                series.setdefault(series_key(r), [float("nan")] * len(models))[models.index(r["model"])] = \
                    float(r["metrics"][metric])
        if series:
            bars(f"{metric}: original vs swapped corpora", series, folder / f"metric-{_slug(metric)}.png", metric)
        crp_series: dict[str, list[float]] = {}
        labels = {r["corpus"]: r.get("corpus_label") or r["corpus"] for r in rows}
        for c in corpus_relative(rows, [metric]):
            if c["crp"][metric] is not None:
                name = f"{series_key(c)} / {labels.get(c['baseline'], c['baseline'])}"
                crp_series.setdefault(name, [float("nan")] * len(models))[models.index(c["model"])] = \
                    float(c["crp"][metric])
        if crp_series:
            bars(f"CRP ({metric}): swapped / original", crp_series, folder / f"crp-{_slug(metric)}.png",
                 f"CRP {metric}", hline=1.0)
    return paths


# --------------------------------------------------------------------------- entry points

def run_swap(config_path: str | Path | SwapConfig, out_dir: str | Path, address: str | None = None,
             workers: int | None = None) -> list[dict[str, Any]]:
    """Run (or resume) a swap config; write results.jsonl, table.md, plots/ and summary.json under out_dir.

    Returns the latest row of every cell (plan order): {"cell", "model", "kind", "method", "corpus",
    "corpus_label", "baseline", "task", "pseudo", "status", "metrics", "seconds", "attempts", ...}.
    workers: local Ray CPUs (default: the config's; 0 = no Ray); address: join that Ray cluster instead.
    """
    config = config_path if isinstance(config_path, SwapConfig) else load_swap_config(config_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plan = plan_swap(config, out)
    plan_s = time.perf_counter() - start
    rows = run_plan(plan, address=address, workers=workers)
    wall = time.perf_counter() - start
    pair_baselines(rows, config.ks)
    from core.io import atomic_file, write_json
    table = format_swap_table(rows, config.metrics)
    header = (f"## Corpus swap: {config.name}\n\n{config.description.strip()}\n\n" if config.description.strip()
              else f"## Corpus swap: {config.name}\n\n")
    with atomic_file(out / TABLE) as fh:
        fh.write(header + table)
    plots = write_plots(rows, out / PLOTS, config.metrics)
    counts = {s: sum(r["status"] == s for r in rows) for s in (STATUS_OK, STATUS_FAILED, STATUS_UNAVAILABLE)}
    write_json(out / SUMMARY, {
        "config": dataclasses.asdict(config), "address": address,
        "workers": config.workers if workers is None else workers,
        "wall_s": round(wall, 1), "plan_s": round(plan_s, 1), "cells": len(plan.cells), "status": counts,
        "corpora": {n: {"corpus": str(s.corpus) if s.corpus else None, "tasks": {k: str(v) for k, v in s.tasks.items()},
                        "pseudo": s.pseudo, "unavailable": s.unavailable} for n, s in plan.corpora.items()},
        "crp": corpus_relative(rows, config.metrics), "plots": [str(p) for p in plots]})
    log.info("corpus swap %s: %s in %.1fs; table %s", config.name, counts, wall, out / TABLE)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="swap config (YAML/JSON), e.g. configs/swap-demo.yaml")
    parser.add_argument("--out", required=True, type=Path, help="output folder (rerun with the same folder to resume)")
    parser.add_argument("--address", help="join this Ray cluster (e.g. auto or ray://host:10001) instead of a local Ray")
    parser.add_argument("--workers", type=int, help="local Ray CPUs (default: the config's); 0 = no Ray, one by one")


def run(args: argparse.Namespace) -> int:
    """Run the matrix, print the table; exit 1 if any cell failed (unavailable cells are not failures)."""
    rows = run_swap(args.config, args.out, address=args.address, workers=args.workers)
    print((Path(args.out) / TABLE).read_text(encoding="utf-8"))
    print(f"results: {Path(args.out) / RESULTS}; plots: {Path(args.out) / PLOTS}/")
    return 1 if any(r["status"] == STATUS_FAILED for r in rows) else 0


if __name__ == "__main__":  # pragma: no cover - `rag eval corpus-swap` is the entry point
    import sys
    parser = argparse.ArgumentParser(prog="rag eval corpus-swap", description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run(parser.parse_args()))
