"""Official KILT evaluation (facebookresearch/KILT), reproduced number for number.

Mirrors kilt/eval_retrieval.py (retrieval: R-precision, precision/recall/success-rate@k over
evidence sets, answer/entity-in-context@k) and kilt/eval_downstream.py (accuracy, EM, F1,
ROUGE-L and the KILT-* scores gated on R-precision == 1). Quirks of the official code are kept
on purpose, because results are only comparable to published KILT numbers if they are; each is
marked "official:" below. Where the official script would crash (an assert, max() of an empty
list, a division by zero in `rouge`) this module raises InputError or scores 0 instead.

Where the official script would silently score 0.0 it refuses instead: an empty gold file, a gold file in
which no row has provenance with the rank keys (unless only answers are scored), provenance that is not a
list of objects, ids that are not strings or integers (null, 1.0, objects, NUL bytes), and a guess file
given as the gold file (the arguments swapped).
"""
from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rouge import Rouge

from core.corpus import clean_id
from core.errors import InputError, RagError
from core.io import iter_jsonl

log = logging.getLogger(__name__)

Record = Mapping[str, Any]
Source = str | Path | Sequence[Record]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20, 100)
KILT_RANK_KEYS: tuple[str, ...] = ("wikipedia_id",)  # official: KILT-* gating is always page-level
_PUNCT = frozenset(string.punctuation)


# ---------------------------------------------------------------- loading and alignment

class _Loaded:
    """Records of one source plus where each came from, so errors can name file and line."""

    def __init__(self, source: Source, what: str, keys: Sequence[str] = ("wikipedia_id",)) -> None:
        self.what = what
        self.path: Path | None = None
        self.lines: list[int | None] = []
        if isinstance(source, (str, Path)):
            self.path = Path(source)
            if self.path.is_dir():
                raise InputError(f"{what}: is a folder; expected a KILT JSONL file", self.path)
            self.records: list[Record] = []
            for lineno, obj in iter_jsonl(self.path):
                self.records.append(obj)
                self.lines.append(lineno)
        else:
            self.records = list(source)
            self.lines = [None] * len(self.records)
        for i, rec in enumerate(self.records):
            if not isinstance(rec, Mapping):
                self.error(i, f"expected a JSON object, got {type(rec).__name__}")
            if "id" not in rec:
                self.error(i, "missing 'id'", field="id")
            self.check_id(i, rec["id"], "id")
            out = rec.get("output", [])
            if not isinstance(out, list) or not all(isinstance(o, Mapping) for o in out):
                self.error(i, "'output' must be a list of objects", field="output")
            for j, output in enumerate(out):
                self.check_provenance(i, j, output.get("provenance"), keys)

    def check_id(self, i: int, value: Any, field: str) -> None:
        try:
            clean_id(value)
        except InputError as exc:
            self.error(i, str(exc), field=field)

    def check_provenance(self, i: int, j: int, prov: Any, keys: Sequence[str]) -> None:
        """Provenance is a list of objects whose rank-key values are ids (official: a string here would be
        read letter by letter and score 0, a number would crash)."""
        where = f"output[{j}].provenance"
        if prov is None:
            return
        if not isinstance(prov, list):
            self.error(i, f"expected a list of objects ({{wikipedia_id, title}}), got {type(prov).__name__}",
                       field=where)
        for m, page in enumerate(prov):
            if not isinstance(page, Mapping):
                self.error(i, f"expected an object ({{wikipedia_id, title}}), got {type(page).__name__}",
                           field=f"{where}[{m}]")
            for key in keys:
                if key in page:
                    self.check_id(i, page[key], f"{where}[{m}].{key}")

    def looks_like_guesses(self) -> bool:
        """What `rag retrieve` / `rag answer` write: one output per row, every provenance entry with a score
        (gold files have none: KILT's own provenance carries `bleu_score`)."""
        pages = [p for rec in self.records for o in _outputs(rec) for p in (_provenance(o) or [])]
        return (bool(pages) and all(len(_outputs(rec)) == 1 for rec in self.records)
                and all(isinstance(p.get("score"), (int, float)) and not isinstance(p.get("score"), bool)
                        for p in pages))

    def name(self) -> str:
        return str(self.path) if self.path is not None else f"the {self.what} records"

    def error(self, i: int, message: str, field: str | None = None) -> None:
        if self.path is None:
            raise InputError(f"{self.what} record {i}: {message}", field=field)
        raise InputError(f"{self.what}: {message}", self.path, self.lines[i], field)


def _key(rec: Record) -> str:
    """official: ids are compared as str(id).strip(), so 7 and " 7" match."""
    return str(rec["id"]).strip()


def _align(gold: _Loaded, guess: _Loaded) -> list[Record]:
    """Guesses in gold order (official validate_input); extra guesses are ignored."""
    seen: set[str] = set()
    for i, rec in enumerate(gold.records):
        if _key(rec) in seen:
            gold.error(i, f"duplicate id {_key(rec)!r}", field="id")
        seen.add(_key(rec))
    by_id: dict[str, Record] = {}
    for i, rec in enumerate(guess.records):
        if _key(rec) in by_id:
            guess.error(i, f"duplicate id {_key(rec)!r}", field="id")
        by_id[_key(rec)] = rec
    missing = [_key(rec) for rec in gold.records if _key(rec) not in by_id]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise InputError(f"no guess for {len(missing)} gold id(s): {shown}", guess.path)
    return [by_id[_key(rec)] for rec in gold.records]


def _outputs(rec: Record) -> list[Record]:
    return list(rec.get("output") or [])


def _provenance(output: Record) -> list[Record] | None:
    """None when the output carries no provenance (answer-only outputs)."""
    prov = output.get("provenance")
    return None if prov is None else list(prov)


def _retrieval_output(guess: Record) -> Record:
    """The guess output ranked for retrieval.

    official: downstream scoring reads output[0] of a one-output guess; eval_retrieval's
    filter_answers keeps the one output that has provenance. Both agree on valid input.
    """
    outs = _outputs(guess)
    if len(outs) == 1:
        return outs[0]
    with_prov = [o for o in outs if "provenance" in o]
    if len(with_prov) == 1:
        return with_prov[0]
    if not outs:
        return {}
    raise InputError(f"guess {_key(guess)!r}: expected exactly one output with provenance, "
                     f"got {len(with_prov)}", field="output")


def _guess_answer(guess: Record) -> str:
    """Stripped answer string; a missing or None answer counts as empty (scores 0)."""
    answers = [o for o in _outputs(guess) if o.get("answer") is not None]
    if len(answers) > 1:
        raise InputError(f"guess {_key(guess)!r}: expected exactly one answer, got {len(answers)}",
                         field="output")
    return str(answers[0]["answer"]).strip() if answers else ""


# ---------------------------------------------------------------- text metrics (eval_downstream)

def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower, drop punctuation, drop a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _gold_answers(gold: Record) -> set[str]:
    """official get_gold_answers: stripped, non-empty answers of all gold outputs."""
    return {str(o["answer"]).strip() for o in _outputs(gold)
            if o.get("answer") and str(o["answer"]).strip()}


def _gold_titles(gold: Record) -> set[str]:
    """official get_gold_titles: stripped, non-empty provenance titles of all gold outputs."""
    return {str(p["title"]).strip() for o in _outputs(gold) for p in (_provenance(o) or [])
            if p.get("title") and str(p["title"]).strip()}


def _exact_match(prediction: str, truth: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(truth))


def _f1(prediction: str, truth: str) -> float:
    """official _f1_score: token F1 after normalisation; 0 when nothing overlaps."""
    pred, true = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(true)).values())
    if same == 0:
        return 0
    precision, recall = same / len(pred), same / len(true)
    return (2 * precision * recall) / (precision + recall)


def _rougel(prediction: str, truth: str) -> float:
    """official _rougel_score: `rouge` ROUGE-L F, unnormalised text, 0.0 when rouge rejects it.

    official catches only ValueError ("Hypothesis is empty."); ZeroDivisionError (text made of
    dots and spaces only) would crash it, and is scored 0.0 here.
    """
    try:
        return Rouge().get_scores(prediction, truth, avg=True)["rouge-l"]["f"]
    except (ValueError, ZeroDivisionError):
        return 0.0


# ---------------------------------------------------------------- ranking (eval_retrieval)

def _ids_per_output(outputs: Iterable[Record], rank_keys: Sequence[str]) -> list[list[str]]:
    """official _get_ids_list: one deduplicated id list per output.

    An id is the "+"-join of the stripped rank-key values; provenance lacking any rank key is
    skipped; outputs without provenance give an empty list.
    """
    lists = []
    for output in outputs:
        ids = ["+".join(str(p[k]).strip() for k in rank_keys)
               for p in (_provenance(output) or []) if all(k in p for k in rank_keys)]
        lists.append(list(dict.fromkeys(ids)))
    return lists


def _rprecision(guess_ids: list[str], gold: Record, rank_keys: Sequence[str]) -> float:
    """official rprecision/_computeRprec: max over gold outputs of hits in guess_ids[:R] / R."""
    scores = []
    for gold_ids in _ids_per_output(_outputs(gold), rank_keys):
        r = len(gold_ids)
        scores.append(sum(g in gold_ids for g in guess_ids[:r]) / r if r > 0 else 0)
    return max(scores, default=0.0)


def _rank(guess_ids: list[str], gold: Record, rank_keys: Sequence[str]) -> tuple[list[Any], int]:
    """official get_rank: each distinct gold evidence set is one point in the ranking.

    A set's point sits at the position of its last retrieved page and is True only once all
    its pages are retrieved; other pages are False. official quirks kept: gold provenance
    missing a rank key joins the keys it has; an empty provenance list is an evidence set that
    can never be hit; a page in several sets adds one point per set. No guessed ids: no sets.
    """
    if not guess_ids:
        return [], 0
    evidence_sets: list[set[str]] = []
    for output in _outputs(gold):
        prov = _provenance(output)
        if prov is None:
            continue
        e_set = {"+".join(str(p[k]).strip() for k in rank_keys if k in p) for p in prov}
        if e_set not in evidence_sets:
            evidence_sets.append(e_set)
    n_sets = len(evidence_sets)
    rank: list[Any] = []
    for gid in guess_ids:
        found = False
        for idx, e_set in enumerate(evidence_sets):
            if gid in e_set:
                found = True
                marker = f"evidence_set:{idx}"  # a string: 0/1 would compare equal to False/True
                if marker in rank:
                    rank.remove(marker)
                e_set.remove(gid)
                rank.append(True if not e_set else marker)
        if not found:
            rank.append(False)
    return rank, n_sets


def _context_flags(output: Record, answers: set[str], titles: set[str]) -> list[tuple[bool, bool, bool]]:
    """Per guessed provenance (raw order, duplicates kept): answer / title / both in its text.

    official _answer_in_context_at_k & co.: only the provenance `text` is read, normalised
    like answers; items without text (or with text None) never match.
    """
    norm_answers = [normalize_answer(a) for a in answers]
    norm_titles = [normalize_answer(t) for t in titles]
    flags = []
    for p in _provenance(output) or []:
        if p.get("text") is None:
            flags.append((False, False, False))
            continue
        text = normalize_answer(str(p["text"]))
        has_answer = any(a in text for a in norm_answers)
        has_title = any(t in text for t in norm_titles)
        flags.append((has_answer, has_title, has_answer and has_title))
    return flags


def _retrieval_scores(guess: Record, gold: Record, ks: Sequence[int],
                      rank_keys: Sequence[str]) -> dict[str, float]:
    """official get_ranking_metrics for one example."""
    output = _retrieval_output(guess)
    guess_ids = _ids_per_output([output], rank_keys)[0]
    titles = _gold_titles(gold)
    scores: dict[str, float] = {
        "Rprec": _rprecision(guess_ids, gold, rank_keys),
        "entity_in_input": int(any(normalize_answer(t) in normalize_answer(str(gold.get("input") or ""))
                                   for t in titles)),
    }
    rank, n_sets = _rank(guess_ids, gold, rank_keys)
    flags = _context_flags(output, _gold_answers(gold), titles)
    for k in ks:
        top, hits = rank[:k], rank[:k].count(True)
        scores[f"precision@{k}"] = hits / k if n_sets else 0
        scores[f"answer_in_context@{k}"] = int(any(f[0] for f in flags[:k]))
        scores[f"answer_and_ent_in_context@{k}"] = int(any(f[2] for f in flags[:k]))
        scores[f"entity_in_context@{k}"] = int(any(f[1] for f in flags[:k]))
        if k > 1:  # official: no recall@1 / success_rate@1
            scores[f"recall@{k}"] = hits / n_sets if n_sets else 0
            scores[f"success_rate@{k}"] = int(True in top) if n_sets else 0
    return scores


# ---------------------------------------------------------------- public API

def _norm_ks(ks: Iterable[int]) -> list[int]:
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise InputError(f"ks must be positive integers, got {list(ks)!r}")
    return out


def _norm_rank_keys(rank_keys: str | Sequence[str]) -> tuple[str, ...]:
    """A sequence, or a comma-separated string as the official --rank_keys flag takes."""
    keys = tuple(k.strip() for k in (rank_keys.split(",") if isinstance(rank_keys, str) else rank_keys))
    if not keys or not all(keys):
        raise InputError(f"rank_keys must name at least one provenance field, got {rank_keys!r}")
    return keys


def evaluate_kilt(guesses: Source, gold: Source, ks: Iterable[int] = DEFAULT_KS,
                  rank_keys: str | Sequence[str] = ("wikipedia_id",),
                  kilt_rank_keys: str | Sequence[str] = KILT_RANK_KEYS) -> dict[str, Any]:
    """Score KILT guesses against gold; each is a JSONL path or a list of records.

    Returns {"n", "retrieval", ["downstream", "kilt"]}: retrieval as official compute() with
    `ks` and `rank_keys`; downstream and KILT-* (official _calculate_metrics) only when some
    guess carries an answer. Every metric is averaged over all gold examples.
    `kilt_rank_keys` is the R-precision gate for KILT-* (official: wikipedia_id, whatever
    `rank_keys` is).
    """
    ks_list, keys = _norm_ks(ks), _norm_rank_keys(rank_keys)
    gate_keys = _norm_rank_keys(kilt_rank_keys)
    id_keys = tuple(dict.fromkeys((*keys, *gate_keys)))
    gold_src, guess_src = _Loaded(gold, "gold", id_keys), _Loaded(guesses, "guesses", id_keys)
    _check_roles(guess_src, gold_src)
    if not gold_src.records:
        raise InputError("gold: no records, nothing to evaluate", gold_src.path)
    gold_recs = gold_src.records
    guess_recs = _align(gold_src, guess_src)
    n = len(gold_recs)
    with_answers = any(o.get("answer") is not None for g in guess_recs for o in _outputs(g))
    usable = sum(1 for rec in gold_recs if any(_ids_per_output(_outputs(rec), keys)))
    result: dict[str, Any] = {"n": n}
    if usable == 0 and not with_answers:
        raise InputError(f"gold: no row has provenance with {'+'.join(keys)}, so every retrieval metric would be "
                         f"0; give a gold file with output[].provenance (the guesses are {guess_src.name()})",
                         gold_src.path)
    if usable == 0:
        log.warning("%s: no gold row has provenance with %s: retrieval and KILT-* metrics are not reported, "
                    "only answer metrics", gold_src.name(), "+".join(keys))
    elif usable < n:
        log.warning("%s: %d of %d gold rows have no provenance with %s; they count as misses in every "
                    "retrieval metric (official KILT)", gold_src.name(), n - usable, n, "+".join(keys))
    if usable:
        result["retrieval"] = _retrieval_means(guess_recs, gold_recs, ks_list, keys)


    if with_answers:
        down = {"accuracy": 0.0, "em": 0.0, "f1": 0.0, "rougel": 0.0}
        kilt = {"KILT-accuracy": 0.0, "KILT-em": 0.0, "KILT-f1": 0.0, "KILT-rougel": 0.0}
        for guess, gold_rec in zip(guess_recs, gold_recs):
            local = _downstream_scores(guess, gold_rec)
            if local is None:
                continue
            for name, value in local.items():
                down[name] += value
            guess_ids = _ids_per_output([_retrieval_output(guess)], gate_keys)[0]
            if _rprecision(guess_ids, gold_rec, gate_keys) == 1:
                for name, value in local.items():
                    kilt[f"KILT-{name}"] += value
        result["downstream"] = _mean(down, n)
        if usable:
            result["kilt"] = _mean(kilt, n)
    return result


def _retrieval_means(guess_recs: Sequence[Record], gold_recs: Sequence[Record], ks_list: Sequence[int],
                     keys: Sequence[str]) -> dict[str, float]:
    retrieval: dict[str, float] = {"Rprec": 0.0, "entity_in_input": 0.0}
    for k in ks_list:  # official key order
        for name in ("precision", "answer_in_context", "answer_and_ent_in_context", "entity_in_context"):
            retrieval[f"{name}@{k}"] = 0.0
        if k > 1:
            retrieval[f"recall@{k}"] = 0.0
            retrieval[f"success_rate@{k}"] = 0.0
    for guess, gold_rec in zip(guess_recs, gold_recs):
        for name, value in _retrieval_scores(guess, gold_rec, ks_list, keys).items():
            retrieval[name] += value
    return _mean(retrieval, len(gold_recs))


def _check_roles(guess: _Loaded, gold: _Loaded) -> None:
    """Refuse a guess file given as the gold file (`rag eval kilt GOLD GUESS`), which would score near 0."""
    if not gold.looks_like_guesses():
        return
    if not guess.looks_like_guesses():
        raise RagError(f"the arguments look swapped: rag eval kilt GUESS GOLD ({gold.name()} holds guesses: one "
                       f"output per row, provenance with scores; {guess.name()} looks like the gold file)")
    raise RagError(f"{gold.name()} is given as the gold file but holds guesses (one output per row, provenance "
                   "with scores, as rag retrieve and rag answer write): rag eval kilt GUESS GOLD")


def _downstream_scores(guess: Record, gold: Record) -> dict[str, float] | None:
    """official _calculate_metrics for one example; None for an empty answer (scores 0).

    Accuracy is a strict match of the stripped strings; EM, F1 and ROUGE-L take the max over
    the gold answers. A gold example with no answers scores 0 (official: crashes).
    """
    answer = _guess_answer(guess)
    if not answer:
        return None
    truths = _gold_answers(gold)
    if not truths:
        return {"accuracy": 0, "em": 0, "f1": 0, "rougel": 0}
    return {
        "accuracy": int(answer in truths),
        "em": max(_exact_match(answer, t) for t in truths),
        "f1": max(_f1(answer, t) for t in truths),
        "rougel": max(_rougel(answer, t) for t in truths),
    }


def _mean(sums: dict[str, float], n: int) -> dict[str, float]:
    return {name: (value / n if n else 0.0) for name, value in sums.items()}


def evaluate_kilt_files(guess_path: str | Path, gold_path: str | Path, **kw: Any) -> dict[str, Any]:
    """Same as evaluate_kilt, named for callers that always pass files."""
    return evaluate_kilt(guess_path, gold_path, **kw)


COMPACT_PREFIXES = ("Rprec", "precision@1", "recall@", "success_rate@", "em", "f1", "accuracy", "KILT-em", "KILT-f1")


def format_kilt_table(result: Mapping[str, Any], full: bool = True) -> str:
    """Plain-text two-column table (metric, value to 4 decimals), one section per group.

    `full=False` keeps the headline metrics (R-precision, precision@1, recall and success rate at each k,
    EM/F1/accuracy and KILT-EM/F1 where answers were scored) and drops the context and entity diagnostics.
    """
    rows: list[tuple[str, str]] = []
    if "n" in result:
        rows.append(("n", str(result["n"])))
    for section in ("retrieval", "downstream", "kilt"):
        for name, value in (result.get(section) or {}).items():
            if full or name == "precision@1" or (name.startswith(COMPACT_PREFIXES) and not name.startswith("precision")):
                rows.append((f"{section}/{name}", f"{value:.4f}"))
    width = max([len("metric")] + [len(name) for name, _ in rows])
    vwidth = max([len("value")] + [len(v) for _, v in rows])
    lines = [f"{'metric':<{width}}  {'value':>{vwidth}}", f"{'-' * width}  {'-' * vwidth}"]
    lines += [f"{name:<{width}}  {value:>{vwidth}}" for name, value in rows]
    return "\n".join(lines)


def per_question(guesses: Source, gold: Source, metrics: Sequence[str] = ("Rprec",),
                 ks: Iterable[int] = (5,)) -> dict[str, dict[str, float]]:
    """Retrieval metrics of each gold question (KILT's definitions), keyed by gold id in gold order: what a
    paired comparison of two systems needs. A gold question without a guess scores as an empty ranking."""
    from core.io import read_jsonl

    gold_rows = read_jsonl(gold) if isinstance(gold, (str, Path)) else list(gold)
    guess_rows = read_jsonl(guesses) if isinstance(guesses, (str, Path)) else list(guesses)
    by_id = {str(g.get("id")).strip(): g for g in guess_rows}
    out: dict[str, dict[str, float]] = {}
    for row in gold_rows:
        qid = str(row.get("id")).strip()
        guess = by_id.get(qid, {"id": row.get("id"), "output": [{"provenance": []}]})
        scores = evaluate_kilt([guess], [row], ks=ks)["retrieval"]
        out[qid] = {m: float(scores[m]) for m in metrics}
    return out
