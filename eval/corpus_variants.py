"""Corpus variants for corpus-swap studies: reusable transforms from one corpus (and its task files) to another.

Every transform has the same shape, so the `rag data derive` CLI and the corpus-swap harness call them alike:

    transform(corpus, out_dir, *, tasks=(), seed=0, **options) -> manifest dict

* `corpus`: a corpus folder (with corpus.jsonl) or file in any format `core.corpus` reads;
* `tasks`: KILT task files tied to that corpus, a list of paths (each keeps its file stem as name) or a
  mapping name -> path; each transform rewrites them for the new corpus (filtered, updated or copied);
* `out_dir`: written atomically (nothing appears there unless the transform finishes), holding one
  folder per *part* and `derive.json`, the manifest, which is also returned:

      {"transform", "options", "source": {"corpus", "checksum", "tasks"},
       "parts": {PART: {"dir": relative folder, "corpus": "corpus.jsonl", "tasks": {name: file},
                        "pseudo": bool, "docs": n, ...}},
       "stats": {...}}

  Single-corpus transforms have one part, `default`, in `out_dir` itself; `topic-holdout` has two.

Transforms here (registered in VARIANT_TRANSFORMS):

* `topic-holdout`: split a corpus by topic (the `domain` field; vital10k has 12 topics) into a held-in and
  a held-out corpus with no document in both; each question goes to the part that holds all of its gold
  documents (questions whose gold spans both parts, or is missing, are dropped and counted). Train on the
  held-in part's task files, evaluate on the held-out part's.
* `new-domain`: a second corpus (e.g. FOLDOC) with pseudo-queries made from its definitions: the first
  definition sentence of an entry, the entry's term (title and aliases) masked, must retrieve that entry.
  These are NOT real user questions: every row has meta.pseudo = true and the part has "pseudo": true,
  and the swap table marks them.
* `perturb`: a corpus "version" change that keeps every fact, without paraphrasing: document order in the
  file shuffled, paragraph order within documents shuffled, sentences (after each paragraph's lead
  sentence) shuffled, sentences regrouped into paragraphs at other boundaries. Document ids, titles and all
  other fields are kept, so the task files stay valid unchanged; the multiset of sentences of every
  document is the same (checked for every document; a document whose rewrite would not split back into the
  same sentences keeps one sentence per paragraph instead). A good model should not move under it.
* `subsample`: the gold documents of the task files plus a fixed random sample of the others (used to keep
  demos small; the tasks are copied unchanged, every gold document is kept).

`counterfactual` (answers swapped for other entities of the same type) lives in eval/transforms.py, the registry of every transform.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.corpus import Corpus, file_checksum, resolve_corpus_path
from core.errors import RagError
from core.io import atomic_dir, iter_jsonl, read_json, write_json, write_jsonl

__all__ = [
    "DERIVE_MANIFEST", "DEFAULT_PART", "VARIANT_TRANSFORMS", "derive", "topic_holdout", "new_domain", "perturb",
    "subsample", "derive_from_rows", "JsonlRows", "streams_rows", "split_sentences", "split_paragraphs", "gold_doc_ids", "read_derive_manifest", "resolve_part",
]

DERIVE_MANIFEST = "derive.json"
DEFAULT_PART = "default"
CORPUS_FILE = "corpus.jsonl"

TaskArg = Sequence[str | Path] | Mapping[str, str | Path] | None


# --------------------------------------------------------------------------- shared helpers

def _rng(seed: int, *keys: Any) -> random.Random:
    """A generator that depends only on the seed and the keys (not on iteration order)."""
    digest = hashlib.sha1(":".join(str(k) for k in (seed, *keys)).encode("utf-8")).hexdigest()
    return random.Random(int(digest[:16], 16))


def _task_map(tasks: TaskArg) -> dict[str, Path]:
    """Task files by name: a mapping as given, or each path by its file stem (stems must differ)."""
    if not tasks:
        return {}
    if isinstance(tasks, Mapping):
        return {str(name): Path(path) for name, path in tasks.items()}
    named: dict[str, Path] = {}
    for path in tasks:
        path = Path(path)
        if path.stem in named:
            raise RagError(f"two task files named {path.stem!r} ({named[path.stem]}, {path}); "
                           "pass them as a mapping name -> path")
        named[path.stem] = path
    return named


def _open_docs(corpus: str | Path) -> tuple[Path, Corpus]:
    """The corpus validated (bad rows, duplicate ids, empty: InputError) and disk-backed (`Corpus.load`: 12 bytes a
    document; `corpus.get(id)` and `corpus.documents[row]` read one line). The transforms stream it with `_rows`
    and never hold a list of its documents; each streaming pass parses the file again."""
    path = resolve_corpus_path(corpus)
    return path, Corpus.load(path)


def _rows(corpus: Corpus) -> Iterator[dict[str, Any]]:
    """The documents as rows of the toolkit's JSONL (whatever format the file is in), streamed in file order."""
    return (doc.to_json() for doc in corpus)


class JsonlRows:
    """The rows of a JSONL file as a re-iterable: each `iter()` streams the file again (nothing is kept)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (row for _, row in iter_jsonl(self.path))


def streams_rows(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a row-level transform that takes any re-iterable of corpus rows (it iterates it more than once and
    never indexes it) and may return the new corpus rows as an iterator: `derive_from_rows` and `rag data derive`
    then stream the file through it instead of reading it into a list."""
    fn.__dict__["streams_rows"] = True
    return fn


def is_streaming(fn: Any) -> bool:
    return bool(getattr(fn, "streams_rows", False))


def _read_task(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path)]


def gold_doc_ids(row: Mapping[str, Any]) -> set[str]:
    """Every provenance wikipedia_id of every output of one KILT row."""
    return {str(p["wikipedia_id"]).strip() for o in row.get("output") or [] for p in o.get("provenance") or []
            if isinstance(p, Mapping) and p.get("wikipedia_id") is not None}


def _source_info(corpus_path: Path, tasks: Mapping[str, Path]) -> dict[str, Any]:
    return {"corpus": str(corpus_path), "checksum": file_checksum(corpus_path),
            "tasks": {name: str(path) for name, path in tasks.items()}}


def _write_part(root: Path, rel: str, docs: Iterable[dict[str, Any]], tasks: Mapping[str, list[dict[str, Any]]],
                **info: Any) -> dict[str, Any]:
    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    n = write_jsonl(folder / CORPUS_FILE, docs)
    task_files = {}
    for name, rows in tasks.items():
        write_jsonl(folder / f"{name}.jsonl", rows)
        task_files[name] = f"{name}.jsonl"
    return {"dir": rel, "corpus": CORPUS_FILE, "tasks": task_files, "docs": n,
            "questions": {name: len(rows) for name, rows in tasks.items()}, "pseudo": False, **info}


def _finish(staging: Path, transform: str, options: dict[str, Any], source: dict[str, Any],
            parts: dict[str, dict[str, Any]], stats: dict[str, Any]) -> dict[str, Any]:
    manifest = {"transform": transform, "options": options, "source": source, "parts": parts, "stats": stats}
    write_json(staging / DERIVE_MANIFEST, manifest)
    return manifest


def read_derive_manifest(folder: str | Path) -> dict[str, Any]:
    return read_json(Path(folder) / DERIVE_MANIFEST)


def resolve_part(folder: str | Path, part: str | None = None) -> dict[str, Any]:
    """{"corpus": Path, "tasks": {name: Path}, "pseudo": bool, "part": name} of one part of a derived folder.

    Folders written by these transforms carry derive.json; any other folder (e.g. another transform's output,
    or a hand-made corpus) is read as corpus.jsonl plus every other `*.jsonl` beside it as a task file.
    """
    folder = Path(folder)
    if (folder / DERIVE_MANIFEST).exists():
        manifest = read_derive_manifest(folder)
        parts = manifest.get("parts") or {}
        if part is None:
            if len(parts) != 1:
                raise RagError(f"{folder} holds parts {sorted(parts)}; say which one (part: NAME)")
            part = next(iter(parts))
        if part not in parts:
            raise RagError(f"{folder} has no part {part!r}; it has {sorted(parts)}")
        info = parts[part]
        base = folder / info.get("dir", ".")
        return {"part": part, "corpus": base / info.get("corpus", CORPUS_FILE),
                "tasks": {name: base / rel for name, rel in (info.get("tasks") or {}).items()},
                "pseudo": bool(info.get("pseudo", False)), "transform": manifest.get("transform")}
    base = folder / part if part else folder
    corpus = resolve_corpus_path(base)
    tasks = {p.stem: p for p in sorted(base.glob("*.jsonl")) if p.name != CORPUS_FILE and not p.name.startswith(".")}
    return {"part": part or DEFAULT_PART, "corpus": corpus, "tasks": tasks, "pseudo": False, "transform": None}


# --------------------------------------------------------------------------- sentences and paragraphs

_PARAGRAPH = re.compile(r"\n\s*\n")
# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by space and a capital,
# a digit or an opening quote/bracket. Abbreviations may split too; what matters is that the split is
# deterministic and that rejoining pieces with a space splits back into the same pieces (checked).
_SENTENCE = re.compile(r"(?<=[.!?])([\"')\]]?)\s+(?=[\"'(\[]?[A-Z0-9])")


def split_paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in _PARAGRAPH.split(text) if p.strip()]


def split_sentences(text: str) -> list[str]:
    """The sentences of a text, paragraph by paragraph (whitespace inside a sentence collapsed)."""
    sentences = []
    for paragraph in split_paragraphs(text):
        pieces = _SENTENCE.split(paragraph)
        # re.split keeps the captured closer: glue it back to the sentence it ends.
        current = pieces[0]
        for i in range(1, len(pieces), 2):
            sentences.append((current + pieces[i]).strip())
            current = pieces[i + 1]
        sentences.append(current.strip())
    return [s for s in sentences if s]


# --------------------------------------------------------------------------- subsample

def _inputs(corpus: str | Path, tasks: TaskArg) -> dict[str, Path]:
    """The files a transform reads: never to be replaced by its output (core.io refuses them)."""
    named = {"corpus": Path(corpus)}
    for name, path in _task_map(tasks).items():
        named[f"task {name}"] = Path(path)
    return named


def subsample(corpus: str | Path, out_dir: str | Path, *, tasks: TaskArg = None, seed: int = 0,
              sample: int = 2000, keep_gold: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """The tasks' gold documents plus `sample` other documents drawn at random (file order kept).

    Streamed: the sample is drawn as positions among the non-gold documents (the same draw as from a list of
    their ids), then one pass writes the documents kept; memory holds the gold ids and the sample, not the corpus.
    """
    named = _task_map(tasks)
    corpus_path, docs = _open_docs(corpus)
    rows = {name: _read_task(path) for name, path in named.items()}
    gold = {d for task_rows in rows.values() for r in task_rows for d in gold_doc_ids(r)} if keep_gold else set()
    n_others = len(docs) - sum(doc_id in docs for doc_id in gold)
    chosen = set(random.Random(seed).sample(range(n_others), min(max(int(sample), 0), n_others)))
    asked = {d for task_rows in rows.values() for r in task_rows for d in gold_doc_ids(r)}
    written: set[str] = set()  # the kept documents that some question names

    def kept() -> Iterator[dict[str, Any]]:
        other = 0
        for d in _rows(docs):
            if d["id"] in gold:
                keep = True
            else:
                keep, other = other in chosen, other + 1
            if keep:
                if d["id"] in asked:
                    written.add(d["id"])
                yield d

    options = {"sample": sample, "keep_gold": keep_gold, "seed": seed}
    with atomic_dir(out_dir, overwrite, inputs=_inputs(corpus, tasks)) as staging:
        part = _write_part(staging, ".", kept(), rows)
        missing = {name: sum(not gold_doc_ids(r) <= written for r in task_rows) for name, task_rows in rows.items()}
        stats = {"docs_in": len(docs), "docs_out": part["docs"], "gold_docs": len(gold & written),
                 "questions_with_missing_gold": missing}
        manifest = _finish(staging, "subsample", options, _source_info(corpus_path, named), {DEFAULT_PART: part}, stats)
    return manifest


# --------------------------------------------------------------------------- topic-holdout

def topic_holdout(corpus: str | Path, out_dir: str | Path, *, tasks: TaskArg = None, seed: int = 0,
                  held_out: Sequence[str] | str | None = None, fraction: float = 0.25, field: str = "domain",
                  overwrite: bool = False) -> dict[str, Any]:
    """Split by topic into parts `held-in` and `held-out`; no document is in both.

    held_out: the topics to hold out (a list, or a comma-separated string); by default
    ceil(fraction * number of topics) topics drawn with `seed`. Documents without the field count as
    topic "" (held in unless "" is named). Questions follow their gold documents.
    """
    named = _task_map(tasks)
    corpus_path, docs = _open_docs(corpus)

    def topic_of(row: Mapping[str, Any]) -> str:
        return str(row.get(field) or "")

    topics = sorted({topic_of(d) for d in _rows(docs)})
    if isinstance(held_out, str):
        held_out = [t.strip() for t in held_out.split(",") if t.strip()]
    if held_out:
        unknown = sorted(set(held_out) - set(topics))
        if unknown:
            raise RagError(f"topic-holdout: unknown topics {unknown}; the corpus has {topics}")
        out_topics = sorted(set(held_out))
    else:
        if not 0 < fraction < 1:
            raise RagError(f"topic-holdout: fraction must be in (0, 1), got {fraction}")
        shuffled = topics[:]
        random.Random(seed).shuffle(shuffled)
        out_topics = sorted(shuffled[:max(1, math.ceil(fraction * len(topics)))])
    if len(out_topics) >= len(topics):
        raise RagError("topic-holdout: every topic is held out; keep at least one in")
    held = set(out_topics)

    def part_of(row: Mapping[str, Any]) -> str:
        return "held-out" if topic_of(row) in held else "held-in"

    split_rows: dict[str, dict[str, list[dict[str, Any]]]] = {"held-in": {}, "held-out": {}}
    dropped: dict[str, dict[str, int]] = {}
    for name, path in named.items():
        kept: dict[str, list[dict[str, Any]]] = {"held-in": [], "held-out": []}
        counts = {"mixed_topics": 0, "gold_not_in_corpus": 0, "no_gold": 0}
        for row in _read_task(path):
            gold = gold_doc_ids(row)
            if not gold:
                counts["no_gold"] += 1
                continue
            if not all(d in docs for d in gold):
                counts["gold_not_in_corpus"] += 1
                continue
            sides = {part_of(docs.get(d).to_json()) for d in gold}
            if len(sides) > 1:
                counts["mixed_topics"] += 1
                continue
            kept[sides.pop()].append(row)
        for part in kept:
            split_rows[part][name] = kept[part]
        dropped[name] = counts

    options = {"held_out": out_topics, "fraction": fraction, "field": field, "seed": seed}
    with atomic_dir(out_dir, overwrite, inputs=_inputs(corpus, tasks)) as staging:
        parts = {}
        for part in ("held-in", "held-out"):  # one streaming pass per part
            seen: set[str] = set()

            def part_docs(part: str = part, seen: set[str] = seen) -> Iterator[dict[str, Any]]:
                for d in _rows(docs):
                    if part_of(d) == part:
                        seen.add(topic_of(d))
                        yield d

            parts[part] = _write_part(staging, part, part_docs(), split_rows[part])
            parts[part]["topics"] = sorted(seen)  # last key, where _write_part(..., topics=...) put it
        stats = {"topics": topics, "held_out_topics": out_topics, "dropped_questions": dropped,
                 "docs": {p: parts[p]["docs"] for p in parts}}
        manifest = _finish(staging, "topic-holdout", options, _source_info(corpus_path, named), parts, stats)
    return manifest


# --------------------------------------------------------------------------- new-domain (pseudo-queries)

_LEADING_TAGS = re.compile(r"^\s*(?:\d+\.\s*)?(?:<[^<>]*>\s*)+")
_PRONUNCIATION = re.compile(r"^\s*/[^/\s][^/]{0,60}/\s*")   # FOLDOC/Jargon: /dog'wosh/
_MASK_TOKEN = "[TERM]"


def _definition_sentence(text: str) -> str:
    """The first sentence of the first paragraph, without FOLDOC's leading `<category>` labels."""
    paragraphs = split_paragraphs(text)
    if not paragraphs:
        return ""
    sentences = split_sentences(_PRONUNCIATION.sub("", _LEADING_TAGS.sub("", paragraphs[0])))
    return sentences[0] if sentences else ""


def _mask_terms(sentence: str, terms: Iterable[str], mask: str) -> str:
    for term in sorted({t.strip() for t in terms if t and t.strip()}, key=len, reverse=True):
        pattern = re.compile(r"(?<!\w)" + re.escape(term) + r"(?!\w)", re.IGNORECASE)
        sentence = pattern.sub(mask, sentence)
    return sentence


def new_domain(corpus: str | Path, out_dir: str | Path, *, tasks: TaskArg = None, seed: int = 0,
               n_queries: int = 200, min_words: int = 6, max_query_words: int = 40, max_docs: int | None = None,
               task_name: str = "pseudo", mask: str = _MASK_TOKEN, overwrite: bool = False) -> dict[str, Any]:
    """A second corpus with pseudo-queries: a masked definition sentence -> the entry it came from.

    n_queries entries are drawn with `seed` among those whose definition sentence has at least min_words
    words once masked; max_docs (optional) keeps the gold entries plus a random sample of the others.
    Task files given in `tasks` belong to the first corpus and are not carried over.
    """
    del tasks  # another domain: the first corpus's questions do not apply
    corpus_path, docs = _open_docs(corpus)

    def pseudo_query(doc: Mapping[str, Any]) -> tuple[str, bool] | None:
        sentence = _definition_sentence(doc["text"])
        terms = [doc["title"], *(doc.get("aliases") or [])]
        query = _mask_terms(sentence, terms, mask)
        words = query.split()
        content = [w for w in words if mask not in w]
        if len(content) >= min_words:
            return " ".join(words[:max_query_words]), query != sentence
        return None

    # Streamed: the rows of the candidates (8 bytes each), drawn from as a list of them would be; the picked
    # documents are read back by row and their queries made again.
    candidates = array("q", (row for row, doc in enumerate(_rows(docs)) if pseudo_query(doc) is not None))
    if not candidates:
        raise RagError(f"new-domain: no document of {corpus_path} has a definition sentence of {min_words}+ words")
    picked = []
    for j in random.Random(seed).sample(range(len(candidates)), min(int(n_queries), len(candidates))):
        doc = docs.documents[candidates[j]].to_json()
        picked.append((doc, *(pseudo_query(doc) or ("", False))))
    picked.sort(key=lambda c: c[0]["id"])
    rows = [{"id": f"pseudo-{doc['id']}", "input": query,
             "output": [{"answer": doc["title"], "provenance": [{"wikipedia_id": doc["id"], "title": doc["title"]}]}],
             "meta": {"pseudo": True, "kind": "masked definition sentence", "term_masked": masked,
                      "domain": doc.get("domain")}}
            for doc, query, masked in picked]
    gold = {doc["id"] for doc, _, _ in picked}
    n_others = len(docs) - len(gold)
    chosen = (set(random.Random(seed + 1).sample(range(n_others), max(0, min(int(max_docs) - len(gold), n_others))))
              if max_docs is not None else set())

    def kept() -> Iterator[dict[str, Any]]:
        other = 0
        for d in _rows(docs):
            if max_docs is None or d["id"] in gold:
                yield d
            else:
                if other in chosen:
                    yield d
                other += 1
    options = {"n_queries": n_queries, "min_words": min_words, "max_query_words": max_query_words,
               "max_docs": max_docs, "task_name": task_name, "mask": mask, "seed": seed}
    with atomic_dir(out_dir, overwrite, inputs=_inputs(corpus, None)) as staging:
        part = _write_part(staging, ".", kept(), {task_name: rows}, pseudo=True,
                           note="pseudo-queries: masked definition sentences, not real questions")
        stats = {"docs_in": len(docs), "docs_out": part["docs"], "candidates": len(candidates), "queries": len(rows),
                 "queries_with_term_masked": sum(r["meta"]["term_masked"] for r in rows)}
        manifest = _finish(staging, "new-domain", options, _source_info(corpus_path, {}), {DEFAULT_PART: part}, stats)
    return manifest


# --------------------------------------------------------------------------- perturb

def _perturb_text(text: str, rng: random.Random, paragraph_order: bool, sentence_order: bool,
                  regroup: bool) -> str:
    paragraphs = [split_sentences(p) for p in split_paragraphs(text)]
    if paragraph_order and len(paragraphs) > 1:
        rng.shuffle(paragraphs)
    if sentence_order:
        for sentences in paragraphs:
            rest = sentences[1:]  # the lead sentence names the subject: keep it first
            rng.shuffle(rest)
            sentences[1:] = rest
    if regroup:
        flat = [s for p in paragraphs for s in p]
        groups = rng.randint(1, min(len(flat), len(paragraphs) + 1)) if flat else 0
        cuts = sorted(rng.sample(range(1, len(flat)), groups - 1)) if groups > 1 else []
        bounds = [0, *cuts, len(flat)]
        paragraphs = [flat[a:b] for a, b in zip(bounds, bounds[1:])]
    return "\n\n".join(" ".join(p) for p in paragraphs if p)


def perturb(corpus: str | Path, out_dir: str | Path, *, tasks: TaskArg = None, seed: int = 0,
            doc_order: bool = True, paragraph_order: bool = True, sentence_order: bool = True,
            regroup: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Reorder without rewriting: same documents, ids and sentences; task files copied unchanged.

    Streamed: with doc_order, the shuffle is drawn over row numbers (4 bytes a document; the same permutation as
    shuffling the list of documents) and the documents are read back by row in that order, one at a time.
    """
    named = _task_map(tasks)
    corpus_path, docs = _open_docs(corpus)
    counts = Counter(changed=0, fallback=0)

    def perturbed(doc: dict[str, Any]) -> dict[str, Any]:
        before = Counter(split_sentences(doc["text"]))
        text = _perturb_text(doc["text"], _rng(seed, doc["id"]), paragraph_order, sentence_order, regroup)
        if Counter(split_sentences(text)) != before:
            # Rejoined pieces that the splitter would cut elsewhere: one sentence per paragraph always splits back.
            counts["fallback"] += 1
            text = "\n\n".join(s for p in split_paragraphs(text) for s in split_sentences(p))
            if Counter(split_sentences(text)) != before:
                text = doc["text"]
        counts["changed"] += text != doc["text"]
        return {**doc, "text": text}

    if doc_order:
        order = array("I" if len(docs) < 2**32 else "q", range(len(docs)))  # 4 bytes a document
        random.Random(seed).shuffle(order)  # type: ignore[arg-type]  # any mutable sequence: the list's permutation
        out_docs: Iterable[dict[str, Any]] = (perturbed(docs.documents[row].to_json()) for row in order)
    else:
        out_docs = (perturbed(doc) for doc in _rows(docs))
    options = {"doc_order": doc_order, "paragraph_order": paragraph_order, "sentence_order": sentence_order,
               "regroup": regroup, "seed": seed}
    with atomic_dir(out_dir, overwrite, inputs=_inputs(corpus, tasks)) as staging:
        part = _write_part(staging, ".", out_docs, {})
        for name, path in named.items():  # ids kept: gold provenance stays valid as is
            shutil.copyfile(path, staging / f"{name}.jsonl")
            part["tasks"][name] = f"{name}.jsonl"
            part["questions"][name] = sum(1 for _ in iter_jsonl(path))
        stats = {"docs": part["docs"], "docs_text_changed": counts["changed"],
                 "one_sentence_per_paragraph_fallback": counts["fallback"]}
        manifest = _finish(staging, "perturb", options, _source_info(corpus_path, named), {DEFAULT_PART: part}, stats)
    return manifest


# --------------------------------------------------------------------------- row-level transforms

def derive_from_rows(transform: str, fn: Callable[..., Any], corpus: str | Path, out_dir: str | Path, *,
                     tasks: TaskArg = None, seed: int = 0, overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """Run a row-level transform `fn(corpus_rows, qa_rows, seed=..., **options) -> (corpus_rows, qa_rows | None,
    stats)` (the shape of eval/transforms.py's row-level transforms, e.g. counterfactual) with this module's file layout.

    The corpus is streamed through transforms marked with `streams_rows` (no list of its rows).
    The task files are passed as one list of rows; the rows it returns go back to the task they came from
    (by id), so a transform that keeps only the questions it changed yields smaller task files. None: the
    task files are copied unchanged.
    """
    from core.io import read_jsonl

    named = _task_map(tasks)
    corpus_path = resolve_corpus_path(corpus)
    # A transform marked `streams_rows` reads the file as it goes (and may hand back an iterator); others get a list.
    corpus_rows: Iterable[dict[str, Any]] = JsonlRows(corpus_path) if is_streaming(fn) else read_jsonl(corpus_path)
    owner: dict[str, str] = {}
    qa_rows: list[dict[str, Any]] = []
    for name, path in named.items():
        for row in _read_task(path):
            owner.setdefault(str(row.get("id")), name)
            qa_rows.append(row)
    new_corpus, new_qa, stats = fn(corpus_rows, qa_rows, seed=seed, **options)
    split: dict[str, list[dict[str, Any]]] = {name: [] for name in named}
    if new_qa is None:
        split = {name: _read_task(path) for name, path in named.items()}
    else:
        for row in new_qa:
            name = owner.get(str(row.get("id")))
            if name is None:
                raise RagError(f"{transform}: returned a question {row.get('id')!r} that is in no task file")
            split[name].append(row)
    with atomic_dir(out_dir, overwrite, inputs=_inputs(corpus, tasks)) as staging:
        part = _write_part(staging, ".", new_corpus, split)
        write_json(staging / "stats.json", stats)
        short = {k: v for k, v in stats.items() if not (isinstance(v, (list, dict)) and len(v) > 50)}
        manifest = _finish(staging, transform, {"seed": seed, **options}, _source_info(corpus_path, named),
                           {DEFAULT_PART: part}, short)
    return manifest


# --------------------------------------------------------------------------- registry

Transform = Callable[..., dict[str, Any]]

VARIANT_TRANSFORMS: dict[str, Transform] = {
    "topic-holdout": topic_holdout,
    "new-domain": new_domain,
    "perturb": perturb,
    "subsample": subsample,
}


def derive(name: str, corpus: str | Path, out_dir: str | Path, *, tasks: TaskArg = None,
           **options: Any) -> dict[str, Any]:
    """Run the transform `name` (these, or any registered in eval.transforms.TRANSFORMS)."""
    transform = VARIANT_TRANSFORMS.get(name)
    if transform is None:
        raise RagError(f"unknown corpus transform {name!r}; known: {', '.join(sorted(VARIANT_TRANSFORMS))}")
    return transform(corpus, out_dir, tasks=tasks, **options)


def describe(manifest: Mapping[str, Any]) -> str:
    """One line per part, for the CLI."""
    lines = [f"{manifest['transform']}: {json.dumps(manifest.get('stats', {}), default=str)[:300]}"]
    for part, info in manifest.get("parts", {}).items():
        label = " (pseudo-queries)" if info.get("pseudo") else ""
        lines.append(f"  {part}: {info['docs']} docs in {info['dir']}/{info['corpus']}, tasks {info['questions']}{label}")
    return "\n".join(lines)
