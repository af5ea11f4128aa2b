"""`rag experiment cit`: does Corpus-Invariant Tuning make a reader read rather than remember?

Readers are trained on FanOutQA train (passages: top-k from the given index over vital10k) with
λ ∈ {0, ...}, then evaluated on dev against
  (1) vital10k as trained: EM/F1 (and KILT-EM/F1);
  (2) a counterfactual vital10k (eval.transforms.counterfactual_substitute): the answers of the dev
      questions are replaced, in their evidence documents, by other answers of the same type (year,
      number, capitalised name), and the gold answers likewise. EM/F1 against the new answers, and the
      memorisation rate = fraction of predictions that still give the old answer (EM against it).
Only some dev answers occur verbatim in their evidence document, so cloze questions (readers/cloze.py;
an answer span masked in a sentence of a document no train/dev question uses) are added to (2) as a
second, separately reported set, their span substituted in their document the same way. Every number
is reported with the count of examples it rests on.

`--train-on cloze-topics` trains on cloze questions from the documents of some topics instead and
evaluates on (a) a sample of those training questions, as they are and with their answer substituted
in the passage (memorisation = the reader still gives the answer it was trained on), and (b) cloze
questions of held-out topics, likewise.

Retrieval is done once on the original index; for (2) the retrieved passages of changed documents are
rewritten with the same substitutions (the ranking itself is the original one: an approximation, the
substituted spans are a few words of a passage).

Outputs in --out: report.md (tables, examples), results.json, counterfactual/ (corpus.jsonl, qa files,
stats.json: the derived corpus, reusable), runs/lambda-X/ (the reader run folders).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class CITExperimentConfig:
    corpus: str = field(default="", metadata={"help": "corpus folder (vital10k)"})
    data: str = field(default="", metadata={"help": "folder with train.jsonl and dev.jsonl (fanoutqa)"})
    index: str = field(default="", metadata={"help": "index folder over the corpus (dense is best)"})
    out: str = ""
    train_on: str = field(default="fanoutqa", metadata={
        "help": "fanoutqa (train on FanOutQA train, test on dev) | cloze-topics (train on cloze questions of "
                "some topics, test on seen questions and held-out topics)"})
    kind: str = "fid"
    model: str | None = None
    peft: str = field(default="full", metadata={"help": "full | lora | iaa | ... (lora is the sensible choice for causal)"})
    weights: str = field(default="0,1,10", metadata={"help": "comma-separated λ values (0 = plain training)"})
    margin: float = 0.1
    k: int = 3
    max_steps: int = 120
    batch_size: int = 4
    lr: float = 1e-4
    max_passage_tokens: int = 64
    max_answer_tokens: int = 16
    cloze_eval: int = 60
    cloze_train: int = field(default=400, metadata={"help": "cloze-topics: training questions"})
    heldout_topics: str = field(default="", metadata={
        "help": "cloze-topics: comma-separated held-out topics (default: every fourth topic in sorted order)"})
    dev_limit: int = 0
    eval_every: int = 0
    seed: int = 0
    examples: int = 8


SMALL = dict(max_steps=2, batch_size=2, k=2, max_passage_tokens=32, max_answer_tokens=6, cloze_eval=4,
             cloze_train=6, dev_limit=4, examples=2)


def _load(path: Path) -> list[dict[str, Any]]:
    from core.io import read_jsonl
    return read_jsonl(path)


def _examples_with_passages(rows, passages_by_id):
    from readers.train import Example, _answers
    return [Example(str(r["id"]), r["input"], _answers(r), passages_by_id[str(r["id"])], r) for r in rows]


def _rewrite(passages, subs_by_doc):
    from eval.transforms import apply_substitutions
    from readers.base import ReaderPassage
    return [ReaderPassage(p.key, p.title, apply_substitutions(p.text, subs_by_doc[p.doc_id]), p.doc_id, p.score)
            if p.doc_id in subs_by_doc else p for p in passages]


def _old_gold(example):
    gold = copy.deepcopy(example.gold)
    old = gold["meta"]["counterfactual"]["old_answer"]
    for o in gold.get("output") or []:
        if isinstance(o, dict) and "answer" in o:
            o["answer"] = old
    return dataclasses.replace(example, gold=gold, answers=[old])


def _score(reader, examples, k, batch_size=16, memorisation=False) -> tuple[dict[str, Any], list[str]]:
    from readers.train import answer_examples, score_answers
    if not examples:
        return {"n": 0}, []
    preds = answer_examples(reader, examples, batch_size)
    scores = {"n": len(examples), **score_answers(examples, preds, k)}
    if memorisation:
        scores["memorisation"] = score_answers([_old_gold(e) for e in examples], preds, k)["em"]
    return scores, [a for a, _ in preds]


@dataclass
class Plan:
    """What one experiment mode trains on and evaluates: question files, eval sets, substitutions."""
    train_path: Path
    question_files: dict[str, Path]          # name -> KILT file whose questions are retrieved for
    sets: dict[str, tuple[list[dict[str, Any]], bool]]  # set -> (rows, counterfactual?)
    substitutions: dict[str, list[tuple[str, str]]]
    stats: dict[str, Any]


def _eval_sets(corpus_rows, seed: int, groups) -> tuple[dict[str, Any], dict[str, list[tuple[str, str]]], list]:
    """Each (label, counterfactual label, rows) gives two eval sets: the rows as they are, and the rows whose
    answer could be substituted in their evidence documents. Returns (sets, doc id -> substitutions of all
    groups, counterfactual stats per group)."""
    from eval.transforms import counterfactual_substitute, substitution_map
    sets: dict[str, tuple[list[dict[str, Any]], bool]] = {}
    subs: dict[str, list[tuple[str, str]]] = {}
    stats = []
    for label, cf_label, rows in groups:
        _, cf_rows, group_stats = counterfactual_substitute(corpus_rows, rows, seed=seed)
        for doc, pairs in substitution_map(group_stats).items():
            subs.setdefault(doc, []).extend(pairs)
        sets[label], sets[cf_label] = (rows, False), (cf_rows, True)
        stats.append(group_stats)
    return sets, subs, stats


def _public(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k != "substitutions"}


def plan_fanoutqa(cfg: CITExperimentConfig, out: Path, corpus_rows) -> Plan:
    """Train on FanOutQA train; evaluate on dev (original and counterfactual) plus cloze questions."""
    from core.io import write_jsonl
    from eval.transforms import _evidence_ids
    from readers.cloze import cloze_questions

    data = Path(cfg.data)
    train_path, dev_path = data / "train.jsonl", data / "dev.jsonl"
    train_rows, all_dev = _load(train_path), _load(dev_path)
    dev_rows = all_dev[:cfg.dev_limit] if cfg.dev_limit else all_dev
    used = {d for r in train_rows + all_dev for d in _evidence_ids(r)}
    docs = [r for r in corpus_rows if str(r.get("id")) not in used]
    random.Random(cfg.seed).shuffle(docs)
    cloze_rows, cloze_stats = cloze_questions(docs, seed=cfg.seed, max_questions=cfg.cloze_eval)
    sets, subs, (dev_stats, cloze_cf_stats) = _eval_sets(corpus_rows, cfg.seed, [
        ("dev (vital10k)", "dev counterfactual", dev_rows), ("cloze (vital10k)", "cloze counterfactual", cloze_rows)])
    files = {"dev": out / "questions" / "dev.jsonl", "cloze": out / "questions" / "cloze.jsonl"}
    write_jsonl(files["dev"], dev_rows)
    write_jsonl(files["cloze"], cloze_rows)
    return Plan(train_path, files, sets, subs, {
        "counterfactual": dev_stats, "cloze_counterfactual": cloze_cf_stats, "cloze_generation": cloze_stats})


def heldout_topics(cfg: CITExperimentConfig, corpus_rows) -> tuple[list[str], list[str]]:
    """(train topics, held-out topics): --heldout-topics, or every fourth topic in sorted order."""
    from core.errors import RagError
    topics = sorted({str(r.get("domain")) for r in corpus_rows if r.get("domain")})
    if len(topics) < 2:
        raise RagError(f"{cfg.corpus}: a topic split needs documents with at least two `domain` values")
    held = [t.strip() for t in cfg.heldout_topics.split(",") if t.strip()] or topics[1::4]
    unknown = sorted(set(held) - set(topics))
    if unknown:
        raise RagError(f"--heldout-topics: unknown topics {unknown}; the corpus has {topics}")
    return [t for t in topics if t not in held], held


def plan_cloze_topics(cfg: CITExperimentConfig, out: Path, corpus_rows) -> Plan:
    """Train on cloze questions from some topics; evaluate on seen questions and on held-out topics.

    The seen questions with their answer substituted in the passage are the sharpest memorisation test:
    the reader was trained to give the old answer to exactly that question, and reading gives the new one.
    """
    from core.io import write_jsonl
    from readers.cloze import cloze_questions

    train_topics, held = heldout_topics(cfg, corpus_rows)
    docs = list(corpus_rows)
    random.Random(cfg.seed).shuffle(docs)
    train_rows, train_stats = cloze_questions(docs, seed=cfg.seed, max_questions=cfg.cloze_train,
                                              domains=set(train_topics))
    held_rows, held_stats = cloze_questions(docs, seed=cfg.seed, max_questions=cfg.cloze_eval, domains=set(held))
    seen_rows = train_rows[:cfg.cloze_eval]
    sets, subs, (seen_cf_stats, held_cf_stats) = _eval_sets(corpus_rows, cfg.seed, [
        ("seen cloze (train topics)", "seen cloze counterfactual", seen_rows),
        ("held-out topics cloze", "held-out topics counterfactual", held_rows)])
    files = {"train": out / "questions" / "cloze_train.jsonl", "heldout": out / "questions" / "cloze_heldout.jsonl"}
    write_jsonl(files["train"], train_rows)
    write_jsonl(files["heldout"], held_rows)
    return Plan(files["train"], files, sets, subs, {
        "topics": {"train": train_topics, "heldout": held}, "counterfactual": seen_cf_stats,
        "cloze_counterfactual": held_cf_stats, "cloze_generation": {"train": train_stats, "heldout": held_stats}})


PLANS = {"fanoutqa": plan_fanoutqa, "cloze-topics": plan_cloze_topics}


def run_experiment(cfg: CITExperimentConfig, overwrite: bool = False) -> dict[str, Any]:
    from core.corpus import resolve_corpus_path
    from core.errors import RagError
    from core.io import write_json, write_jsonl
    from readers.base import load_reader
    from readers.train import ReaderTrainConfig, retrieve_cached, train_reader

    if cfg.train_on not in PLANS:
        raise RagError(f"--train-on must be one of {sorted(PLANS)}, not {cfg.train_on!r}")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RagError(f"{out} already exists; pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    corpus_rows = _load(resolve_corpus_path(cfg.corpus))
    t0 = time.perf_counter()
    plan = PLANS[cfg.train_on](cfg, out, corpus_rows)
    subs = plan.substitutions
    cf_dir = out / "counterfactual"
    cf_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(cf_dir / "corpus.jsonl",
                (dict(r, text=_rewrite_text(r, subs)) if str(r.get("id")) in subs else r for r in corpus_rows))
    for name, (rows, is_cf) in plan.sets.items():
        if is_cf:
            write_jsonl(cf_dir / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".jsonl"), rows)
    write_json(cf_dir / "stats.json", plan.stats)

    # retrieval once (original index), shared by every run; counterfactual sets reuse it, rewritten
    shared = out / "retrieval"
    train_ex, retriever = retrieve_cached(shared, "train", plan.train_path, cfg.index, cfg.k)
    passages = {e.id: e.passages for e in train_ex}
    for name, path in plan.question_files.items():
        if path != plan.train_path and path.stat().st_size:  # an empty set (no cloze found) is skipped
            examples, retriever = retrieve_cached(shared, name, path, cfg.index, cfg.k, retriever)
            passages.update({e.id: e.passages for e in examples})
    retrieval_s = time.perf_counter() - t0
    sets = {name: ([dataclasses.replace(e, passages=_rewrite(e.passages, subs)) for e in
                    _examples_with_passages(rows, passages)] if is_cf else _examples_with_passages(rows, passages),
                   is_cf) for name, (rows, is_cf) in plan.sets.items()}
    weights = [float(w) for w in cfg.weights.split(",") if w.strip()]
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "counts": {name: len(s[0]) for name, s in sets.items()},
                               **{k: _public(v) if isinstance(v, dict) else v for k, v in plan.stats.items()},
                               "retrieval_s": round(retrieval_s, 1), "readers": {}}
    predictions: dict[str, dict[str, list[str]]] = {}

    # the untrained reader (before): the baseline every trained reader is compared with
    before = load_reader(cfg.kind, cfg.model, device="cpu", config_overrides={
        "max_passage_tokens": cfg.max_passage_tokens, "max_answer_tokens": cfg.max_answer_tokens})
    predictions["before training"], row = {}, {}
    for name, (ex, mem) in sets.items():
        row[name], predictions["before training"][name] = _score(before, ex, cfg.k, memorisation=mem)
    results["readers"]["before training"] = row
    del before

    for weight in weights:
        label = f"lambda={weight:g}"
        run_dir = out / "runs" / f"lambda-{weight:g}"
        (run_dir / "retrieval").mkdir(parents=True, exist_ok=True)
        for f in shared.glob("train.*"):
            shutil.copy(f, run_dir / "retrieval" / f.name)
        tcfg = ReaderTrainConfig(kind=cfg.kind, model=cfg.model, index=cfg.index, train=str(plan.train_path), dev=None,
                                 k=cfg.k, peft=cfg.peft, cit_weight=weight, cit_margin=cfg.margin,
                                 max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                                 eval_every=cfg.eval_every, save_every=0, max_passage_tokens=cfg.max_passage_tokens,
                                 max_answer_tokens=cfg.max_answer_tokens, device="cpu")
        metrics = train_reader(tcfg, run_dir, overwrite=True, retriever=retriever)
        reader = load_reader(None, str(run_dir / "reader"), device="cpu")
        row: dict[str, Any] = {"seconds_per_step": metrics.get("seconds_per_step"),
                               "peak_rss_mb": metrics.get("peak_rss_mb"), "final_train": metrics.get("final_train"),
                               "trainable_params": metrics.get("trainable_params"),
                               "nll_theta_over_ref_last10": _last_mean(run_dir, "nll_ratio", 10)}
        predictions[label] = {}
        for name, (ex, mem) in sets.items():
            row[name], predictions[label][name] = _score(reader, ex, cfg.k, memorisation=mem)
        results["readers"][label] = row
        del reader
        write_json(out / "results.json", results)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    results["examples"] = _example_rows(sets, predictions, cfg.examples)
    write_json(out / "results.json", results)
    (out / "report.md").write_text(format_report(results), encoding="utf-8")
    return results


def _rewrite_text(row: dict[str, Any], subs) -> str:
    from eval.transforms import apply_substitutions
    return apply_substitutions(str(row.get("text", "")), subs[str(row.get("id"))])


def _last_mean(run_dir: Path, metric: str, n: int) -> float | None:
    import csv
    path = run_dir / "curves.csv"
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as fh:
        values = [float(r["value"]) for r in csv.DictReader(fh) if r["metric"] == metric and r["split"] == "train"]
    return round(sum(values[-n:]) / len(values[-n:]), 4) if values else None


def _example_rows(sets, predictions, n: int) -> list[dict[str, Any]]:
    rows = []
    names = [n for n, (_, cf) in sets.items() if cf] + [next(iter(sets))]
    for name in names:
        examples, _ = sets[name]
        for i, e in enumerate(examples[:n]):
            cf = (e.gold.get("meta") or {}).get("counterfactual", {})
            rows.append({"set": name, "question": e.question, "gold": e.answers[0] if e.answers else "",
                         "old_answer": cf.get("old_answer"),
                         "predictions": {label: p[name][i] for label, p in predictions.items()
                                         if name in p and i < len(p[name])}})
    return rows


def format_report(results: dict[str, Any]) -> str:
    lines = ["# CIT experiment", ""]
    cfg = results["config"]
    lines.append(f"reader {cfg['kind']} ({cfg['model'] or 'default'}), k={cfg['k']}, {cfg['max_passage_tokens']} "
                 f"tokens/passage, {cfg['max_steps']} steps x batch {cfg['batch_size']}, lr {cfg['lr']}, "
                 f"margin {cfg['margin']}; total {results.get('total_s')} s")
    lines.append("")
    lines.append("| reader | set | n | EM | F1 | KILT-EM | memorisation |")
    lines.append("|---|---|---|---|---|---|---|")
    for label, row in results["readers"].items():
        for name in results["counts"]:
            s = row.get(name)
            if not isinstance(s, dict) or "n" not in s:
                continue
            mem = f"{s['memorisation']:.3f}" if "memorisation" in s else ""
            lines.append(f"| {label} | {name} | {s['n']} | {s.get('em', 0):.3f} | {s.get('f1', 0):.3f} | "
                         f"{s.get('KILT-em', 0):.3f} | {mem} |")
    lines += ["", "| reader | s/step | peak RSS MB | ℓθ/ℓ0 (last 10 steps) | L_QA | L_CIT |", "|---|---|---|---|---|---|"]
    for label, row in results["readers"].items():
        if "seconds_per_step" not in row:
            continue
        ft = row.get("final_train") or {}
        lines.append(f"| {label} | {row['seconds_per_step']:.2f} | {row['peak_rss_mb']} | "
                     f"{row['nll_theta_over_ref_last10']} | {ft.get('loss_qa', 0):.3f} | {ft.get('loss_cit', 0):.4f} |")
    lines += ["", "Examples:", ""]
    for ex in results.get("examples", []):
        old = f" (old: {ex['old_answer']})" if ex.get("old_answer") else ""
        lines.append(f"- [{ex['set']}] {ex['question']} -> gold {ex['gold']!r}{old}")
        for label, pred in ex["predictions"].items():
            lines.append(f"    - {label}: {pred!r}")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CITExperimentConfig()
    for f in dataclasses.fields(CITExperimentConfig):
        kind: Any = {int: int, float: float}.get(type(f.default), str)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            required=f.name in ("corpus", "data", "index", "out"),
                            help=f"{f.metadata.get('help', '')} (default {getattr(defaults, f.name)})")
    parser.add_argument("--small", action="store_true", help=f"a seconds-long run for tests: {SMALL}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing study folder")


def run(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(CITExperimentConfig)
              if getattr(args, f.name, None) is not None}
    cfg = CITExperimentConfig(**{**(SMALL if args.small else {}), **values})
    results = run_experiment(cfg, overwrite=args.overwrite)
    print(format_report(results))
    return 0
