"""Cells: data materialisation (prepare, derive, resolve), planning (the cells and the indexes they share), index
building, the cell kinds (retrieval, reader) and running one cell."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import RagError
from rag.swap.config import CorpusSpec, ModelSpec, SwapConfig, TaskSpec, _derive_order
from rag.swap.kinds import CELL_KINDS, CellKind, CellUnavailable

log = logging.getLogger("rag.swap")

STATUS_OK, STATUS_FAILED, STATUS_UNAVAILABLE = "ok", "failed", "unavailable"


# --------------------------------------------------------------------------- plan: cells and indexes

@dataclass
class IndexSpec:
    kind: str                  # an index kind of retrievers/index_kinds.py
    corpus: str                # corpus file
    dir: str                   # where the index goes
    encoder: str | None = None # dense: the encoder; trie: the generative model (run folder) whose tokenizer it uses
    batch_size: int = 64
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class CellSpec:
    key: str                   # model|corpus|task
    spec_hash: str             # changes when the model (its weights too), data or settings change: a rerun redoes it
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
    weights: dict[str, str] = field(default_factory=dict)   # "model.encoder" -> content fingerprint (spec_hash has it)


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
    reuse: dict[str, Any] = field(default_factory=dict)   # filled by run_plan: reused / stale / new / retried cells


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


def _hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:n]


_CHECKSUMS: dict[tuple[str, int, int, int], str] = {}

# What a model folder's content fingerprint covers: its weight files and the small files that say how to load them
# (anywhere in the folder, except hidden files and checkpoints/, the intermediate states of a training run).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy",
                   ".npz", ".model")
LOADER_FILES = ("config.json", "reader.json", "adapter_config.json", "dense_run.json", "generative_run.json",
                "reranker_run.json", "modules.json", "sentence_bert_config.json")
SKIPPED_DIRS = ("checkpoints",)


def _checksum(path: Path) -> str:
    """sha256 of a file's bytes, memoised by (path, size, mtime, inode): a rewritten file is read again."""
    from core.corpus import file_checksum
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _CHECKSUMS:
        _CHECKSUMS[key] = file_checksum(path)
    return _CHECKSUMS[key]


def _weight_files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        for name in sorted(files):
            if not name.startswith(".") and (name.endswith(WEIGHT_SUFFIXES) or name in LOADER_FILES):
                found.append(Path(root) / name)
    return found


def weights_fingerprint(model: str | None) -> str | None:
    """A content fingerprint of a model a cell depends on: for a folder (a model folder or a training run folder),
    the sha256 of its weight files' bytes (and of the files that say how to load them); for a file, its sha256; an
    alias resolves to its packaged folder first; anything else (a hub id) is fingerprinted by its name."""
    if not model:
        return None
    from core.gemma import GEMMA_ALIAS, gemma_path
    from core.models import MODEL_ALIASES

    name = str(model)
    if name == GEMMA_ALIAS:  # readers and generative cells mean the causal LM, not the bi-encoder alias of that name
        try:
            name = gemma_path()
        except RagError:
            return f"alias:{model}"
    elif name in MODEL_ALIASES:
        try:
            name = MODEL_ALIASES[name]()
        except RagError:
            return f"alias:{model}"
    path = Path(name).expanduser()
    try:
        if path.is_file():
            return _checksum(path)
        if not path.is_dir():
            return f"name:{model}"
        digest = hashlib.sha256()
        for file in _weight_files(path):
            digest.update(f"{file.relative_to(path).as_posix()}\0{_checksum(file)}\n".encode())
        return f"sha256:{digest.hexdigest()}"
    except OSError as exc:   # unreadable: the cell fails where it loads the model (failed cells always rerun)
        return f"unreadable:{model}:{exc.errno}"


def model_fingerprints(model: ModelSpec | None, prefix: str = "model") -> dict[str, str]:
    """{"model.encoder": fingerprint, ...} of every model folder a model spec names (encoder, run, reader and the
    options that name a model: encoder, model)."""
    if model is None:
        return {}
    named = {f: getattr(model, f) for f in ("encoder", "run", "reader")}
    named.update({f"options.{k}": model.options.get(k) for k in ("encoder", "model")
                  if isinstance(model.options.get(k), str)})
    return {f"{prefix}.{f}": fp for f, value in named.items() if (fp := weights_fingerprint(value)) is not None}


def index_fingerprint(index_dir: str | Path | None) -> str | None:
    """The checksum of an index's manifest.json (None: no index, or not built yet)."""
    if not index_dir:
        return None
    from index.manifest import MANIFEST
    path = Path(index_dir) / MANIFEST
    return _checksum(path) if path.is_file() else None


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
    """The transform of eval/transforms.py as a file-level function `(corpus, out_dir, *, tasks, **options)`."""
    from eval.transforms import TRANSFORMS

    entry = TRANSFORMS.get(name)
    if entry is None:
        return None
    if entry.derive is not None:
        return entry.derive
    from functools import partial

    from eval.corpus_variants import derive_from_rows
    return partial(derive_from_rows, name, entry.fn)


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
                reason = f"transform {name!r} is not in this build (eval/transforms.py)"
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
                    cell.weights = {**model_fingerprints(model), **model_fingerprints(cell.retriever_model, "retriever")}
                    ident: dict[str, Any] | None = None
                    if request is not None:
                        index_kind, owner = request
                        encoder = {"dense": owner.encoder, "trie": owner.run}.get(index_kind)
                        # the encoder's weights name the index: a retrained encoder gets a new index, never the old one
                        ident = {"kind": index_kind, "encoder": encoder, "corpus": _checksum(state.corpus)}
                        if encoder:
                            ident["weights"] = weights_fingerprint(encoder)
                        tag = f"{index_kind}-{_slug(Path(encoder).name) + '-' if encoder else ''}{_hash(ident, 8)}"
                        index_dir = str(index_root / _slug(spec.name) / tag)
                        indexes.setdefault(index_dir, IndexSpec(index_kind, str(state.corpus), index_dir, encoder,
                                                                owner.batch_size, owner.num_cpus, owner.num_gpus))
                        cell.index_dir = index_dir
                    cell.spec_hash = _hash({
                        "model": _settings(model), "retriever": _settings(cell.retriever_model),
                        "weights": cell.weights, "index": ident,
                        "corpus": _checksum(state.corpus), "task": _checksum(Path(cell.task_path)),
                        "k": k, "ks": cell.ks})
                cells.append(cell)
    return SwapPlan(config, out, states, cells, indexes)


# --------------------------------------------------------------------------- index builders

def _index_options(spec: IndexSpec) -> dict[str, Any]:
    """The swap config's model settings as options of the index kind's config (retrievers/index_kinds.py)."""
    if spec.kind == "dense":
        return {"encoder": spec.encoder, "batch_size": spec.batch_size}
    if spec.kind == "trie":
        return {"model": spec.encoder}
    return {}


def _build_with_registry(spec: IndexSpec) -> None:
    from retrievers.index_kinds import build_index as build_kind
    from retrievers.index_kinds import index_config
    build_kind(spec.kind, spec.corpus, spec.dir, index_config(spec.kind, _index_options(spec)), overwrite=True)


def index_ready(index_dir: str | Path) -> bool:
    from index.manifest import MANIFEST
    return (Path(index_dir) / MANIFEST).exists()


def build_index(spec: IndexSpec) -> str:
    """Build one index unless a finished one is there; returns its folder."""
    if not index_ready(spec.dir):
        start = time.perf_counter()
        _build_with_registry(spec)
        log.info("built %s index %s in %.1fs", spec.kind, spec.dir, time.perf_counter() - start)
    return spec.dir


# --------------------------------------------------------------------------- cell kinds

def _retrieve(cell: CellSpec, workdir: Path, index_dir: str, model: ModelSpec, k: int | None = None):
    """The cell's queries and `model`'s top k (default: the cell's k) from `index_dir`."""
    from core.tasks import load_queries
    from retrievers.base import retrieve_queries
    from retrievers.index_kinds import open_retriever

    queries = load_queries(cell.task_path)
    retriever = open_retriever(index_dir, **model.options)
    rankings = retrieve_queries(retriever, [q.text for q in queries], k or cell.k, model.batch_size)
    return queries, rankings


def _flatten(result: Mapping[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"n": result["n"]}
    for section in ("retrieval", "downstream", "kilt"):
        metrics.update(result.get(section) or {})
    return metrics


def _score(cell: CellSpec, workdir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from core.io import write_jsonl
    from eval.kilt import evaluate_kilt

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
    from core.tasks import guess_rows
    from readers.base import ReaderPassage, load_reader

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
    reader = load_reader(kind, run_dir, device=device, config_overrides=options or None, for_inference=True)
    passages = [[ReaderPassage.from_hit(h) for h in hits[:n_passages]] for hits in rankings]
    answers = [a for a, _ in reader.answer_with_meta([q.text for q in queries], passages, batch_size)]
    return _score(cell, workdir, guess_rows(queries, rankings, answers))


def _rerank_available() -> str | None:
    return _module_missing("retrievers.rerank", "sentence_transformers")


def rerank_cell(cell: CellSpec, workdir: Path) -> dict[str, Any]:
    """A cross-encoder (`run:` a `rag train reranker` run or a CrossEncoder folder) re-ranking the top
    `options.depth` (default 50) of its `retriever` model on this corpus variant; KILT metrics of the top k."""
    reason = _rerank_available()
    if reason:
        raise CellUnavailable(reason)
    from core.tasks import guess_rows
    from retrievers.rerank import load_reranker, rerank_hits

    if not cell.model.run:
        raise RagError(f"model {cell.model.name!r}: a rerank cell needs run: RERANKER_RUN")
    if cell.retriever_model is None or cell.index_dir is None:
        raise RagError(f"model {cell.model.name!r}: a rerank cell needs retriever: MODEL (bm25, dense or generative)")
    options = dict(cell.model.options)
    depth = max(int(options.pop("depth", 50)), cell.k)
    reranker = load_reranker(cell.model.run, device=options.pop("device", None))
    queries, rankings = _retrieve(cell, workdir, cell.index_dir, cell.retriever_model, k=depth)
    ranked = rerank_hits(reranker, [q.text for q in queries], rankings, k=cell.k,
                         batch_size=int(options.pop("batch_size", cell.model.batch_size)))
    return _score(cell, workdir, guess_rows(queries, ranked))


CELL_KINDS.update({
    "bm25": CellKind(retrieval_cell, "bm25", None, "BM25 (bm25s) over the corpus variant; no model"),
    "dense": CellKind(retrieval_cell, "dense", None,
                      "bi-encoder (alias or `rag train retriever --kind dense` run) + Faiss over the variant"),
    "generative": CellKind(retrieval_cell, "trie", _generative_available,
                           "CorpusBrain run folder (`run:`); title trie of the corpus variant"),
    "rerank": CellKind(rerank_cell, None, _rerank_available,
                       "cross-encoder run folder (`run:`; `rag train reranker`) re-ranking the top options.depth "
                       "(default 50) of a `retriever:` model"),
    "reader": CellKind(reader_cell, None, _reader_available,
                       "reader run folder (`reader:`; fid / causal, e.g. CIT) over a `retriever:` model", answers=True),
})


# --------------------------------------------------------------------------- running one cell

def _attempts_path(cell: CellSpec) -> Path:
    return Path(cell.workdir) / "attempts.log"


def _base_row(cell: CellSpec) -> dict[str, Any]:
    return {"cell": cell.key, "spec_hash": cell.spec_hash, "model": cell.model.name, "kind": cell.model.kind,
            "method": cell.model.method, "corpus": cell.corpus, "corpus_label": cell.corpus_label,
            "baseline": cell.baseline, "task": cell.task, "pseudo": cell.pseudo, "task_path": cell.task_path,
            "workdir": cell.workdir, "weights": dict(cell.weights)}


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
    return {**row, "status": STATUS_OK, "metrics": metrics, "seconds": seconds, "index": cell.index_dir,
            "index_manifest": index_fingerprint(cell.index_dir), "attempts": _count_attempts(cell),
            "finished_at": _now()}


def stale_reason(row: Mapping[str, Any] | None, cell: CellSpec) -> str | None:
    """Why a cell's latest `ok` row no longer stands for it (None: it does, the cell is skipped): its spec changed
    (settings, data, or a model's weights), or the index it read was rebuilt or is gone."""
    if row is None:
        return "no result yet"
    if row.get("spec_hash") != cell.spec_hash:
        before = row.get("weights") or {}
        changed = sorted(k for k in set(before) | set(cell.weights) if before.get(k) != cell.weights.get(k))
        if changed and "weights" in row:
            return f"the weights changed ({', '.join(changed)})"
        return "its model settings, data or cut-offs changed"
    if cell.index_dir and row.get("index_manifest") != index_fingerprint(cell.index_dir):
        return "its index changed (manifest.json differs, or the index is gone)"
    return None


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

