"""CorpusBrain's self-supervised pre-training pairs (ISS, LPS, HIP) and the fine-tuning targets.

`rag data pretrain-pairs --corpus CORPUS --out PAIRS.jsonl [--tasks iss,lps,hip]` writes them for inspection;
`rag train retriever --kind generative --stage pretrain` builds them the same way (or reads that file
with ``--pairs``).

Rules (as in the official release, utils/preprocess_corpus.py; see DESIGN.md):

* From each document keep the paragraphs (``\\n\\n``-separated) with more than 10 words: the *units*.
* LPS (lead paragraph selection): unit 1, and units 1-3 joined (when the document has 3).
* ISS (inner sentence selection): units 4-6 joined, units 7-9 joined (when present), and a random
  sample of up to 11 of the units 2..n. (The release draws all of these in one function; we label
  the lead ones LPS and the rest ISS so ``--tasks`` can pick them.) Identical sources are kept once.
* Target of an ISS/LPS source: the document's title, followed by k anchor titles drawn from the
  document's anchors, k = 0..4 with weights 70/20/5/3/2, written ``Title |A1 |A2``. The draw is made
  for each source separately, among the distinct linked titles (the release samples the anchor list,
  repeats included, then de-duplicates).
* HIP (hyperlink identifier prediction): up to 3 anchors per document (distinct (title, unit) pairs,
  drawn at random); source = the anchor's unit with its neighbours (units i-1, i, i+1, clipped at
  the document's ends; the release also skips anchors of the lead paragraph and of the last one,
  which would leave a one-paragraph corpus with no HIP at all); target = the linked document's title.
  With ``max_source_words`` the source is cut to that many words centred on the anchor, so a short
  encoder window still contains it.
* Only titles of the corpus are used as anchor targets (the trie can generate nothing else; the
  release's corpus is all of Wikipedia, so every link is in it): ``--all-anchor-targets`` keeps
  the others. The document's own title is never an anchor target.

Corpora of short documents (vital10k: one lead paragraph each): a document with fewer than
``min_paragraphs`` (3) kept paragraphs is split into sentences and its units are *sentence windows*
instead: consecutive sentences merged until the window has more than 10 words (a short tail joins
the window before it). The rules above then apply to the windows unchanged (unit 1 = the first
window, 1-3 = the first three ...). ``--sentence-windows always|never`` forces either mode.

Corpora without hyperlinks (no document has ``anchors``) get anchors from exact, case-sensitive
matches of other documents' titles in the text: titles of two or more words, or single words that
are capitalised and at least 4 characters long (a one-word match is skipped at the start of a
sentence and next to another capitalised word, where it is part of a longer name). The matcher
indexes titles by their first word
(token n-gram lookup, longest match first, no overlaps), so it is linear in the text length.
``--match-titles always|never`` forces it on or off; real anchors (enwiki-mini, KILT) are used as given.

Everything is seeded per document (``seed`` + document id), so pairs do not depend on corpus order.
"""
from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.config import opt
from core.corpus import Corpus, Document
from core.errors import InputError, RagError

logger = logging.getLogger(__name__)

TASKS = ("iss", "lps", "hip")
ANCHOR_WEIGHTS = (70, 20, 5, 3, 2)  # k = 0..4 anchor titles after the document title
TARGET_SEPARATOR = " |"             # "Title |A1 |A2" (pre-training, as the release writes it)
FINETUNE_SEPARATOR = " | "          # gold titles of a KILT example (DESIGN.md)
_WORD = re.compile(r"\w+(?:['’.\-]\w+)*|[^\w\s]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


@dataclass
class PretrainConfig:
    tasks: tuple[str, ...] = opt(TASKS, "pre-training tasks, comma-separated: iss, lps, hip")
    min_words: int = opt(10, "a paragraph / window must have MORE than this many words")
    max_random: int = opt(11, "ISS: random units sampled from units 2..n")
    anchor_weights: tuple[int, ...] = opt(ANCHOR_WEIGHTS, "weights of 0..4 anchor titles appended to ISS/LPS targets")
    hip_per_doc: int = opt(3, "HIP: anchors used per document")
    sentence_windows: str = opt("auto", "auto | always | never")
    min_paragraphs: int = opt(3, "auto: fewer kept paragraphs -> sentence windows")
    match_titles: str = opt("auto", "auto (only when no document has anchors) | always | never")
    all_anchor_targets: bool = opt(False, "keep anchor targets that are not corpus titles")
    max_source_words: int | None = opt(None, "cut sources to this many words (HIP: centred on the anchor)")
    seed: int = opt(0, "seeds the sampling of units and anchors")

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = parse_tasks(self.tasks)
        self.tasks = tuple(self.tasks)
        self.anchor_weights = tuple(self.anchor_weights)
        if self.sentence_windows not in ("auto", "always", "never"):
            raise RagError(f"sentence_windows must be auto, always or never, not {self.sentence_windows!r}")
        if self.match_titles not in ("auto", "always", "never"):
            raise RagError(f"match_titles must be auto, always or never, not {self.match_titles!r}")
        if self.max_source_words is not None and self.max_source_words <= 0:
            self.max_source_words = None


def parse_tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
    items = [t.strip().lower() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [t for t in items if t not in TASKS]
    if unknown or not items:
        raise RagError(f"unknown pre-training task(s) {unknown or tasks!r}; choose from {', '.join(TASKS)}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class Pair:
    """One seq2seq example: ``source`` text -> ``titles`` (the target, first title first)."""
    task: str
    source: str
    titles: tuple[str, ...]
    doc_id: str = ""

    @property
    def target(self) -> str:
        sep = FINETUNE_SEPARATOR if self.task == "kilt" else TARGET_SEPARATOR
        return sep.join(self.titles)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "source": self.source, "target": self.target, "titles": list(self.titles),
                "doc_id": self.doc_id}

    @classmethod
    def from_json(cls, row: dict[str, Any], path: str | Path | None = None, line: int | None = None) -> Pair:
        titles = row.get("titles")
        if titles is None and isinstance(row.get("target"), str):
            titles = [t.strip() for t in re.split(r"\s\|\s?", row["target"]) if t.strip()]
        if not isinstance(row.get("source"), str) or not row["source"].strip():
            raise InputError("missing or empty", path, line, "source")
        if not titles or not all(isinstance(t, str) and t for t in titles):
            raise InputError("missing target titles", path, line, "titles")
        return cls(str(row.get("task", "")), row["source"], tuple(titles), str(row.get("doc_id", "")))


# ---------------------------------------------------------------------------------------------- units

@dataclass(frozen=True)
class Unit:
    """A kept paragraph, or a sentence window: where it lies in the raw paragraph list."""
    paragraph: int
    start: int
    end: int
    text: str


def words(text: str) -> int:
    return len(text.split())


def paragraphs_of(doc: Document) -> list[str]:
    return doc.text.split("\n\n")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def sentence_windows(paragraph: str, index: int, min_words: int) -> list[Unit]:
    """Consecutive sentences merged until each window has more than ``min_words`` words."""
    out: list[list[int]] = []
    cur: list[int] | None = None
    for a, b in sentence_spans(paragraph):
        if cur is None:
            cur = [a, b]
        else:
            cur[1] = b
        if words(paragraph[cur[0]:cur[1]]) > min_words:
            out.append(cur)
            cur = None
    if cur is not None:
        if out:
            out[-1][1] = cur[1]  # a short tail joins the previous window
        else:
            out.append(cur)
    return [Unit(index, a, b, paragraph[a:b].strip()) for a, b in out if words(paragraph[a:b]) > min_words]


def document_units(doc: Document, config: PretrainConfig) -> tuple[list[Unit], bool]:
    """The units of a document, and whether they are sentence windows."""
    paras = paragraphs_of(doc)
    kept = [Unit(i, 0, len(p), p.strip()) for i, p in enumerate(paras) if words(p) > config.min_words]
    use_windows = config.sentence_windows == "always" or (
        config.sentence_windows == "auto" and len(kept) < config.min_paragraphs)
    if not use_windows:
        return kept, False
    units: list[Unit] = []
    for u in kept:
        units.extend(sentence_windows(paras[u.paragraph], u.paragraph, config.min_words))
    return units, True


def unit_of(units: Sequence[Unit], paragraph: int, start: int) -> int:
    """Index of the unit holding character ``start`` of raw paragraph ``paragraph``, or -1."""
    for i, u in enumerate(units):
        if u.paragraph == paragraph and u.start <= max(start, 0) < max(u.end, u.start + 1):
            return i
    return -1


def join(units: Sequence[Unit]) -> str:
    return " ".join(u.text for u in units)


def clip_words(text: str, max_words: int | None, centre: int | None = None) -> str:
    """At most ``max_words`` words: the first ones, or a window around character offset ``centre``."""
    if not max_words:
        return text
    toks = [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]
    if len(toks) <= max_words:
        return text
    if centre is None:
        lo = 0
    else:
        at = max(0, sum(1 for s, _ in toks if s <= centre) - 1)
        lo = min(max(0, at - max_words // 2), len(toks) - max_words)
    return " ".join(t for _, t in toks[lo:lo + max_words])


# ---------------------------------------------------------------------------------------------- title matching

def word_spans(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]


def matchable(title: str) -> bool:
    toks = [w for _, _, w in word_spans(title)]
    if len(toks) >= 2:
        return True
    return len(toks) == 1 and len(toks[0]) >= 4 and toks[0][0].isupper()


class TitleMatcher:
    """Exact, case-sensitive matches of corpus titles in text, longest first, without overlaps.

    Titles are split into word tokens and indexed by their first token; scanning a text looks up
    each token once and tries only the titles starting with it (longest first).
    """

    def __init__(self, titles: Iterable[str]) -> None:
        self.by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for title in dict.fromkeys(titles):
            if not matchable(title):
                continue
            toks = tuple(w for _, _, w in word_spans(title))
            self.by_first.setdefault(toks[0], []).append((toks, title))
        for cands in self.by_first.values():
            cands.sort(key=lambda c: -len(c[0]))

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_first.values())

    def find(self, text: str, exclude: str | None = None) -> list[tuple[int, int, str]]:
        """``(start, end, title)`` of each match, in text order."""
        spans = word_spans(text)
        toks = [w for _, _, w in spans]
        out, i = [], 0
        while i < len(toks):
            hit = None
            for cand, title in self.by_first.get(toks[i], ()):
                n = len(cand)
                if title != exclude and tuple(toks[i:i + n]) == cand and (n > 1 or self._lone_word(toks, i)):
                    hit = (n, title)
                    break
            if hit is None:
                i += 1
                continue
            n, title = hit
            out.append((spans[i][0], spans[i + n - 1][1], title))
            i += n
        return out

    @staticmethod
    def _lone_word(toks: Sequence[str], i: int) -> bool:
        """A one-word title counts only where it is not capitalised just for starting a sentence and is
        not part of a longer capitalised name ("River" in "Amazon River", "Republic" in "Czech Republic")."""
        prev = toks[i - 1] if i > 0 else None
        if prev is None or prev in (".", "!", "?", ":", ";", '"', "(", "“"):
            return False
        nxt = toks[i + 1] if i + 1 < len(toks) else ""
        return not (prev[:1].isupper() or nxt[:1].isupper())

    def anchors(self, doc: Document) -> list[dict[str, Any]]:
        """Anchors in the corpus's format ({text, title, paragraph, start, end}) for a document."""
        found = []
        for p, para in enumerate(paragraphs_of(doc)):
            for start, end, title in self.find(para, exclude=doc.title):
                found.append({"text": para[start:end], "title": title, "paragraph": p, "start": start, "end": end})
        return found


# ---------------------------------------------------------------------------------------------- pairs

@dataclass
class PairStats:
    docs: int = 0
    docs_without_units: int = 0
    docs_sentence_windows: int = 0
    units: int = 0
    anchors_given: int = 0
    anchors_matched: int = 0
    anchors_usable: int = 0
    title_matching: bool = False
    pairs: dict[str, int] = field(default_factory=dict)
    targets_with_anchor_titles: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _anchor_titles(anchors: Sequence[dict[str, Any]], own: str, titles: set[str] | None) -> list[str]:
    out = []
    for a in anchors:
        t = a.get("title") or a.get("wikipedia_title")
        if isinstance(t, str) and t and t != own and (titles is None or t in titles):
            out.append(t)
    return list(dict.fromkeys(out))


def document_pairs(doc: Document, config: PretrainConfig, titles: set[str] | None,
                   matcher: TitleMatcher | None = None, stats: PairStats | None = None) -> list[Pair]:
    """ISS / LPS / HIP pairs of one document (see the module doc for the rules)."""
    stats = stats if stats is not None else PairStats()
    rng = random.Random(f"{config.seed}:{doc.id}")
    units, windows = document_units(doc, config)
    stats.docs += 1
    stats.units += len(units)
    stats.docs_sentence_windows += int(windows)
    if not units:
        stats.docs_without_units += 1
        return []
    if matcher is not None:
        anchors = matcher.anchors(doc)
        stats.anchors_matched += len(anchors)
    else:
        anchors = [a for a in doc.anchors if isinstance(a, dict)]
        stats.anchors_given += len(anchors)
    linkable = _anchor_titles(anchors, doc.title, titles)
    pairs: list[Pair] = []
    seen: set[str] = set()
    n = len(units)

    def add(task: str, text: str) -> None:
        text = clip_words(text, config.max_source_words)
        k = rng.choices(range(len(config.anchor_weights)), weights=config.anchor_weights, k=1)[0]
        extra = rng.sample(linkable, k=min(k, len(linkable))) if k else []
        if task not in config.tasks or not text or text in seen:
            return
        seen.add(text)
        stats.targets_with_anchor_titles += int(bool(extra))
        pairs.append(Pair(task, text, (doc.title, *extra), doc.id))

    # The random draws happen whatever --tasks selects, so a task's pairs do not depend on the others.
    sample = rng.sample(range(1, n), k=min(config.max_random, n - 1)) if n > 1 else []
    add("lps", units[0].text)
    if n >= 3:
        add("lps", join(units[0:3]))
    if n >= 6:
        add("iss", join(units[3:6]))
    if n >= 9:
        add("iss", join(units[6:9]))
    for i in sample:
        add("iss", units[i].text)

    if "hip" in config.tasks and config.hip_per_doc > 0:
        candidates = []
        for a in anchors:
            t = a.get("title") or a.get("wikipedia_title")
            if not isinstance(t, str) or t == doc.title or (titles is not None and t not in titles):
                continue
            i = unit_of(units, int(a.get("paragraph", a.get("paragraph_id", -1)) or 0), int(a.get("start", 0) or 0))
            if i >= 0:
                candidates.append((t, i, a))
        stats.anchors_usable += len(candidates)
        rng.shuffle(candidates)
        taken: set[tuple[str, int]] = set()
        for t, i, a in candidates:
            if len(taken) >= config.hip_per_doc:
                break
            if (t, i) in taken:
                continue
            taken.add((t, i))
            lo, hi = max(0, i - 1), min(n, i + 2)
            text = join(units[lo:hi])
            # character offset of the anchor inside the joined source (for centring the word window)
            centre = sum(len(u.text) + 1 for u in units[lo:i]) + max(0, int(a.get("start", 0) or 0) - units[i].start)
            pairs.append(Pair("hip", clip_words(text, config.max_source_words, centre), (t,), doc.id))
    for p in pairs:
        stats.pairs[p.task] = stats.pairs.get(p.task, 0) + 1
    return pairs


def build_pairs(corpus: Corpus, config: PretrainConfig | None = None,
                limit_docs: int | None = None) -> tuple[list[Pair], PairStats]:
    """Pre-training pairs of a corpus (documents in corpus order, pairs of a document together)."""
    config = config or PretrainConfig()
    titles = None if config.all_anchor_targets else {d.title for d in corpus.documents}
    has_anchors = any(d.anchors for d in corpus.documents)
    use_matcher = config.match_titles == "always" or (config.match_titles == "auto" and not has_anchors)
    matcher = TitleMatcher(d.title for d in corpus.documents) if use_matcher else None
    stats = PairStats(title_matching=use_matcher)
    docs = corpus.documents if not limit_docs else corpus.documents[:limit_docs]
    pairs: list[Pair] = []
    for doc in docs:
        pairs.extend(document_pairs(doc, config, titles, matcher, stats))
    stats.pairs = dict(sorted(Counter(p.task for p in pairs).items()))
    if not pairs:
        raise RagError(f"no pre-training pairs: no document of {corpus.path} has a paragraph of more than "
                       f"{config.min_words} words (or the tasks {list(config.tasks)} found nothing)")
    return pairs, stats


def write_pairs(path: str | Path, pairs: Iterable[Pair]) -> int:
    from core.io import write_jsonl
    return write_jsonl(path, (p.to_json() for p in pairs))


def read_pairs(path: str | Path) -> list[Pair]:
    from core.io import iter_jsonl
    pairs = [Pair.from_json(row, path, line) for line, row in iter_jsonl(path)]
    if not pairs:
        raise InputError("no pairs", path)
    return pairs


# ---------------------------------------------------------------------------------------------- fine-tuning

@dataclass
class FinetuneReport:
    path: str
    examples: int = 0
    used: int = 0
    skipped_no_gold_in_corpus: int = 0
    gold_titles_not_in_corpus: int = 0
    multi_title_targets: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped_ids"] = self.skipped_ids[:10]
        return data

    def summary(self) -> str:
        return (f"{self.path}: {self.used} of {self.examples} examples used; {self.skipped_no_gold_in_corpus} "
                f"skipped (no gold title in the corpus); {self.gold_titles_not_in_corpus} gold titles dropped "
                f"(not in the corpus)")


def finetune_pairs(path: str | Path, corpus: Corpus, require: bool = True) -> tuple[list[Pair], FinetuneReport]:
    """KILT examples -> (input, gold titles joined with ' | ').

    A gold page is found by its ``wikipedia_id`` in the corpus, else by its ``title``. Gold pages not
    in the corpus are dropped (counted); an example left with none is skipped (counted).
    """
    from core.io import iter_jsonl

    by_id = {d.id: d.title for d in corpus.documents}
    titles = {d.title for d in corpus.documents}
    report = FinetuneReport(str(path))
    pairs: list[Pair] = []
    for line, row in iter_jsonl(path):
        text = row.get("input")
        if not isinstance(text, str) or not text.strip():
            raise InputError("missing or empty", path, line, "input")
        report.examples += 1
        gold: list[str] = []
        missing = 0
        for output in row.get("output") or []:
            for prov in (output.get("provenance") or []) if isinstance(output, dict) else []:
                if not isinstance(prov, dict):
                    continue
                wid = prov.get("wikipedia_id")
                title = by_id.get(str(wid).strip()) if wid is not None else None
                if title is None and prov.get("title") in titles:
                    title = prov["title"]
                if title is None:
                    missing += 1
                elif title not in gold:
                    gold.append(title)
        report.gold_titles_not_in_corpus += missing
        qid = str(row.get("id", line))
        if not gold:
            report.skipped_no_gold_in_corpus += 1
            report.skipped_ids.append(qid)
            continue
        report.multi_title_targets += int(len(gold) > 1)
        pairs.append(Pair("kilt", text.strip(), tuple(gold), qid))
    report.used = len(pairs)
    if require and not pairs:
        raise InputError(f"no usable examples: all {report.examples} were skipped because none of their gold "
                         f"pages is in the corpus", path)
    return pairs, report
