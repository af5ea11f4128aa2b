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

Arms and seeds: `--weights` lists λ per arm (a repeated value is a second arm of its own, e.g. `0,0,1,10`: the
repeated 0 measures the noise floor), `--seeds` the seeds every arm is trained with. `--epochs N` sets the steps
to N passes over the training questions (the memorising regime: many epochs over few questions), and
`--peft lora --peft-targets all-linear` adapts every linear layer. The CIT likelihood is `--cit-proxy` (span:
masked salient spans, the default for decoder-only readers) with the hinge margin `--margin` (absolute) and
`--margin-relative` (r: the penalty fires once ℓθ < (1 - r)·ℓ0 - m).

`results.json` holds `arms`: per arm `name`, `cit_weight`, `seeds`, `n` (questions of the in-domain set),
`metrics` (per metric `mean` over seeds, `n`, `per_seed`, and `ci95`: a bootstrap over questions of the
per-question scores averaged over seeds, eval/stats.py), `cit_active_fraction` (fraction of training steps with
the penalty active, i.e. L_CIT > 0; 0 for λ = 0, where nothing of CIT is computed), the span and passage
likelihood ratios ℓθ/ℓ0 of the final reader on the training passages (scored after training for every arm,
λ = 0 included, against the untrained reader), and `vs_first_arm`: per metric the paired-bootstrap difference
from the first arm (`diff`, `ci95`, `n`). Only arms with the same questions are compared.

`--smoke` is the issue-16 check (under 15 minutes on 2 CPU cores with Gemma-3-270M): the cloze-topic split,
LoRA on all linear layers, many epochs over 16 questions, the span proxy, λ ∈ {0, 10}, one seed (SMOKE).
Without `--index` a BM25 index over the corpus is built into `--out/index`.

Outputs in --out: report.md (tables, examples), results.json, counterfactual/ (corpus.jsonl, qa files,
stats.json: the derived corpus, reusable), runs/ARM/seed-S/ (the reader run folders).
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
    index: str = field(default="", metadata={"help": "index folder over the corpus (dense is best; none: a BM25 "
                                                     "index is built into OUT/index)"})
    out: str = ""
    train_on: str = field(default="fanoutqa", metadata={
        "help": "fanoutqa (train on FanOutQA train, test on dev) | cloze-topics (train on cloze questions of "
                "some topics, test on seen questions and held-out topics)"})
    kind: str = "fid"
    model: str | None = None
    peft: str = field(default="full", metadata={"help": "full | lora | iaa | ... (lora is the sensible choice for causal)"})
    peft_targets: str = field(default="", metadata={"help": "lora: module names or all-linear (empty: query/value)"})
    weights: str = field(default="0,1,10", metadata={"help": "comma-separated λ per arm (0 = plain training; a "
                                                            "repeated value is another arm)"})
    seeds: str = field(default="", metadata={"help": "comma-separated seeds of every arm (empty: --seed)"})
    epochs: int = field(default=0, metadata={"help": "passes over the training questions (0: --max-steps decides)"})
    cit_proxy: str = field(default="auto", metadata={"help": "span | passage | auto (span for causal, passage for fid)"})
    margin: float = field(default=0.0, metadata={"help": "absolute hinge margin m (nats per token)"})
    margin_relative: float = field(default=0.0, metadata={"help": "relative margin r: the penalty fires once "
                                                                   "ℓθ < (1 - r)·ℓ0 - m"})
    before: int = field(default=1, metadata={"help": "1: also evaluate the untrained reader; 0: skip it"})
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
# issue 16's check: the memorising regime (8 epochs over 16 cloze questions, LoRA on every linear layer, lr 1e-3),
# the span proxy, λ ∈ {0, 10}, one seed; under 15 minutes with Gemma-3-270M on 2 CPU cores
SMOKE = dict(train_on="cloze-topics", kind="causal", peft="lora", peft_targets="all-linear", cit_proxy="span",
             weights="0,10", seeds="0", epochs=8, batch_size=4, lr=1e-3, k=1, max_passage_tokens=64,
             max_answer_tokens=8, cloze_train=16, cloze_eval=16, margin=0.0, margin_relative=0.0, examples=4)


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


SET_KEYS = {"dev (vital10k)": "dev", "dev counterfactual": "dev_cf", "cloze (vital10k)": "cloze",
            "cloze counterfactual": "cloze_cf", "seen cloze (train topics)": "seen",
            "seen cloze counterfactual": "seen_cf", "held-out topics cloze": "heldout",
            "held-out topics counterfactual": "heldout_cf"}


def _set_key(name: str) -> str:
    return SET_KEYS.get(name) or "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _per_question(examples, preds: list[str], memorisation: bool) -> dict[str, list[float]]:
    """Per-question EM (against any gold answer) and, for a counterfactual set, memorisation (the old answer)."""
    from eval.kilt import normalize_answer
    norm = [normalize_answer(p) for p in preds]
    out = {"em": [float(any(n == normalize_answer(a) for a in e.answers)) for e, n in zip(examples, norm)]}
    if memorisation:
        out["memorisation"] = [float(n == normalize_answer(e.gold["meta"]["counterfactual"]["old_answer"]))
                               for e, n in zip(examples, norm)]
    return out


def _arms(weights: list[float]) -> list[tuple[str, str, float]]:
    """(name, folder, λ) per arm; a repeated λ is an arm of its own ("lambda=0 (repeat 2)")."""
    seen: dict[float, int] = {}
    arms = []
    for w in weights:
        seen[w] = seen.get(w, 0) + 1
        name, folder = f"lambda={w:g}", f"lambda-{w:g}"
        if seen[w] > 1:
            name, folder = f"{name} (repeat {seen[w]})", f"{folder}-repeat{seen[w]}"
        arms.append((name, folder, w))
    return arms


def _parse_list(text: str, kind, flag: str) -> list:
    from core.errors import RagError
    try:
        values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise RagError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise RagError(f"{flag}: no value given")
    return values


def check_config(cfg: CITExperimentConfig) -> tuple[list[float], list[int]]:
    """(λ per arm, seeds), or a one-line RagError for any bad value, before any work."""
    import math

    from core.errors import RagError
    from readers.cit import CITConfig

    if cfg.train_on not in PLANS:
        raise RagError(f"--train-on must be one of {sorted(PLANS)}, not {cfg.train_on!r}")
    if cfg.train_on == "fanoutqa" and not cfg.data:
        raise RagError("--train-on fanoutqa needs --data (a folder with train.jsonl and dev.jsonl)")
    if not cfg.corpus or not cfg.out:
        raise RagError("rag experiment cit needs --corpus and --out")
    weights = _parse_list(cfg.weights, float, "--weights")
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise RagError(f"--weights: every λ must be a finite number >= 0, got {w:g}")
        CITConfig(w, cfg.margin, cfg.margin_relative)
    seeds = _parse_list(cfg.seeds, int, "--seeds") if cfg.seeds else [cfg.seed]
    if cfg.cit_proxy not in ("auto", "span", "passage"):
        raise RagError(f"--cit-proxy must be auto, span or passage, not {cfg.cit_proxy!r}")
    for name in ("epochs", "max_steps", "batch_size", "k", "max_passage_tokens", "max_answer_tokens"):
        if getattr(cfg, name) < (0 if name == "epochs" else 1):
            raise RagError(f"--{name.replace('_', '-')}: must be at least {0 if name == 'epochs' else 1}")
    return weights, seeds


def likelihood_references(reader, passages) -> dict[str, dict[str, float]]:
    """ℓ per proxy (span, passage) and passage key under `reader` (scored in chunks of 4, without a graph)."""
    import torch
    if "span" not in getattr(reader, "proxies", ()):
        return {}
    out: dict[str, dict[str, float]] = {}
    saved = reader.config.cit_proxy
    try:
        for proxy in ("span", "passage"):
            reader.config.cit_proxy = proxy
            values: dict[str, float] = {}
            with torch.no_grad():
                for start in range(0, len(passages), 4):
                    chunk = passages[start:start + 4]
                    values.update({p.key: float(v) for p, v in zip(chunk, reader.passage_nll(chunk).tolist())})
            out[proxy] = values
    finally:
        reader.config.cit_proxy = saved
    return out


def _ratios(final: dict[str, dict[str, float]], ref: dict[str, dict[str, float]]) -> dict[str, Any]:
    import math
    out: dict[str, Any] = {}
    for proxy, values in final.items():
        pairs = [(v, ref[proxy][k]) for k, v in values.items()
                 if k in ref.get(proxy, {}) and math.isfinite(v) and math.isfinite(ref[proxy][k]) and ref[proxy][k] > 0]
        out[f"{proxy}_nll_ratio"] = {"mean": round(sum(v / r for v, r in pairs) / len(pairs), 4) if pairs else None,
                                     "n": len(pairs)}
    return out


def _active_fraction(run_dir: Path) -> tuple[float, int]:
    """(fraction of logged training steps with L_CIT > 0, steps logged); (0, 0) when CIT was off."""
    import csv
    path = run_dir / "curves.csv"
    if not path.exists():
        return 0.0, 0
    with open(path, encoding="utf-8") as fh:
        values = [float(r["value"]) for r in csv.DictReader(fh) if r["metric"] == "loss_cit" and r["split"] == "train"]
    return (sum(v > 0 for v in values) / len(values), len(values)) if values else (0.0, 0)


def summarise_arms(arm_runs: list[dict[str, Any]], primary: str) -> list[dict[str, Any]]:
    """The `arms` of results.json from each arm's per-seed, per-question scores (see the module doc)."""
    import numpy as np

    from eval.stats import mean_ci, paired_bootstrap

    def averaged(arm, key):
        per_seed = [run["scores"][key] for run in arm["runs"] if key in run["scores"]]
        return list(np.mean(np.asarray(per_seed, dtype=float), axis=0)) if per_seed else []

    out = []
    first = arm_runs[0] if arm_runs else None
    for arm in arm_runs:
        keys = list(arm["runs"][0]["scores"])
        metrics: dict[str, Any] = {}
        for key in keys:
            values = averaged(arm, key)
            if not values:
                continue
            ci = mean_ci(values)
            metrics[key] = {"mean": round(float(np.mean(values)), 4), "n": len(values),
                            "per_seed": [round(float(np.mean(r["scores"][key])), 4) for r in arm["runs"]],
                            "ci95": [round(ci["ci_low"], 4), round(ci["ci_high"], 4)]}
        for key in ("span_nll_ratio", "passage_nll_ratio"):
            seeds_values = [r["ratios"][key]["mean"] for r in arm["runs"] if r["ratios"].get(key, {}).get("mean")
                            is not None]
            if seeds_values:
                metrics[key] = {"mean": round(float(np.mean(seeds_values)), 4),
                                "n": arm["runs"][0]["ratios"][key]["n"], "per_seed": seeds_values}
        active = [r["cit_active_fraction"] for r in arm["runs"]]
        row: dict[str, Any] = {
            "name": arm["name"], "cit_weight": arm["weight"], "seeds": [r["seed"] for r in arm["runs"]],
            "n": metrics.get(f"em_{primary}", {}).get("n", 0), "metrics": metrics,
            "cit_active_fraction": round(float(np.mean(active)), 4),
            "cit_active_fraction_per_seed": [round(a, 4) for a in active],
            "steps": arm["runs"][0]["steps"],
            "seconds_per_step": round(float(np.mean([r["seconds_per_step"] or 0 for r in arm["runs"]])), 2),
            "peak_rss_mb": max(r["peak_rss_mb"] or 0 for r in arm["runs"])}
        if first is not None and arm is not first:
            diffs = {}
            for key in keys:
                a, b = averaged(first, key), averaged(arm, key)
                if a and len(a) == len(b):
                    d = paired_bootstrap(a, b)
                    diffs[key] = {"diff": round(d["diff"], 4), "ci95": [round(d["ci_low"], 4), round(d["ci_high"], 4)],
                                  "n": d["n"]}
            row["vs_first_arm"] = {"reference": first["name"], **diffs}
        out.append(row)
    return out


def _build_index(cfg: CITExperimentConfig, out: Path) -> str:
    """--index, or a BM25 index over the corpus built once into OUT/index."""
    if cfg.index:
        return cfg.index
    from core.corpus import resolve_corpus_path
    from retrievers import build_index
    target = out / "index"
    if not (target / "manifest.json").exists():
        build_index("bm25", resolve_corpus_path(cfg.corpus), target, overwrite=True)
    return str(target)


def run_experiment(cfg: CITExperimentConfig, overwrite: bool = False) -> dict[str, Any]:
    import math

    from core.corpus import resolve_corpus_path
    from core.errors import RagError
    from core.io import write_json, write_jsonl
    from readers.base import load_reader
    from readers.train import ReaderTrainConfig, retrieve_cached, train_reader

    weights, seeds = check_config(cfg)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RagError(f"{out} already exists; pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    corpus_rows = _load(resolve_corpus_path(cfg.corpus))
    t0, cpu0 = time.perf_counter(), time.process_time()
    index = _build_index(cfg, out)
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
    train_ex, retriever = retrieve_cached(shared, "train", plan.train_path, index, cfg.k)
    train_ex = [e for e in train_ex if e.answers]
    passages = {e.id: e.passages for e in train_ex}
    for name, path in plan.question_files.items():
        if path != plan.train_path and path.stat().st_size:  # an empty set (no cloze found) is skipped
            examples, retriever = retrieve_cached(shared, name, path, index, cfg.k, retriever)
            passages.update({e.id: e.passages for e in examples})
    retrieval_s = time.perf_counter() - t0
    sets = {name: ([dataclasses.replace(e, passages=_rewrite(e.passages, subs)) for e in
                    _examples_with_passages(rows, passages)] if is_cf else _examples_with_passages(rows, passages),
                   is_cf) for name, (rows, is_cf) in plan.sets.items()}
    steps = cfg.epochs * max(1, math.ceil(len(train_ex) / min(cfg.batch_size, max(len(train_ex), 1)))) \
        if cfg.epochs else cfg.max_steps
    train_passages = list({p.key: p for e in train_ex for p in e.passages}.values())
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "counts": {name: len(s[0]) for name, s in sets.items()},
                               **{k: _public(v) if isinstance(v, dict) else v for k, v in plan.stats.items()},
                               "train_questions": len(train_ex), "train_passages": len(train_passages),
                               "steps": steps, "seeds": seeds, "retrieval_s": round(retrieval_s, 1), "readers": {}}
    predictions: dict[str, dict[str, list[str]]] = {}
    overrides = {"max_passage_tokens": cfg.max_passage_tokens, "max_answer_tokens": cfg.max_answer_tokens}

    # the untrained reader: the baseline every trained reader is compared with, and ℓ0 of the likelihood ratios
    before = load_reader(cfg.kind, cfg.model, device="cpu", config_overrides=overrides)
    reference = likelihood_references(before, train_passages)
    if cfg.before:
        predictions["before training"], before_row = {}, {}
        for name, (ex, mem) in sets.items():
            before_row[name], predictions["before training"][name] = _score(before, ex, cfg.k, memorisation=mem)
        results["readers"]["before training"] = before_row
    del before

    arm_runs: list[dict[str, Any]] = []
    for arm_name, folder, weight in _arms(weights):
        arm: dict[str, Any] = {"name": arm_name, "weight": weight, "runs": []}
        arm_runs.append(arm)
        for seed in seeds:
            label = arm_name if len(seeds) == 1 else f"{arm_name} (seed {seed})"
            run_dir = out / "runs" / folder / f"seed-{seed}"
            (run_dir / "retrieval").mkdir(parents=True, exist_ok=True)
            for f in shared.glob("train.*"):
                shutil.copy(f, run_dir / "retrieval" / f.name)
            tcfg = ReaderTrainConfig(kind=cfg.kind, model=cfg.model, index=index, train=str(plan.train_path),
                                     dev=None, k=cfg.k, peft=cfg.peft, peft_targets=cfg.peft_targets,
                                     cit_weight=weight, cit_margin=cfg.margin, cit_margin_relative=cfg.margin_relative,
                                     cit_proxy=cfg.cit_proxy, max_steps=steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                     seed=seed, eval_every=cfg.eval_every, save_every=0,
                                     max_passage_tokens=cfg.max_passage_tokens,
                                     max_answer_tokens=cfg.max_answer_tokens, device="cpu")
            t_arm = time.perf_counter()
            metrics = train_reader(tcfg, run_dir, overwrite=True, retriever=retriever)
            train_s = time.perf_counter() - t_arm
            reader = load_reader(None, str(run_dir / "reader"), device="cpu")
            active, logged = _active_fraction(run_dir)
            row: dict[str, Any] = {"seconds_per_step": metrics.get("seconds_per_step"), "train_s": round(train_s, 1),
                   "peak_rss_mb": metrics.get("peak_rss_mb"), "final_train": metrics.get("final_train"),
                   "trainable_params": metrics.get("trainable_params"),
                   "cit_skipped_passages": metrics.get("cit_skipped_passages"),
                   "nll_theta_over_ref_last10": _last_mean(run_dir, "nll_ratio", 10)}
            predictions[label] = {}
            scores: dict[str, list[float]] = {}
            for name, (ex, mem) in sets.items():
                row[name], preds = _score(reader, ex, cfg.k, memorisation=mem)
                predictions[label][name] = preds
                for metric, values in _per_question(ex, preds, mem).items():
                    scores[f"{metric}_{_set_key(name)}"] = values
            ratios = _ratios(likelihood_references(reader, train_passages), reference)
            row.update(ratios)
            results["readers"][label] = row
            arm["runs"].append({"seed": seed, "scores": scores, "ratios": ratios, "cit_active_fraction": active,
                                "steps": logged or steps, "seconds_per_step": metrics.get("seconds_per_step"),
                                "peak_rss_mb": metrics.get("peak_rss_mb")})
            del reader
            results["arms"] = summarise_arms(arm_runs, _set_key(next(iter(sets))))
            write_json(out / "results.json", results)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    results["cpu_s"] = round(time.process_time() - cpu0, 1)  # this process's CPU time: wall time on a shared machine
    results["examples"] = _example_rows(sets, predictions, cfg.examples)
    results["arms"] = summarise_arms(arm_runs, _set_key(next(iter(sets))))
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
                 f"margin {cfg['margin']}; total {results.get('total_s')} s wall, {results.get('cpu_s')} s CPU")
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
    if results.get("arms"):
        lines += ["", "Arms (mean over seeds; ci95: bootstrap over questions; Δ: paired bootstrap against the first "
                  "arm):", "", "| arm | λ | seeds | metric | n | mean | ci95 | Δ vs first arm [ci95] |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm in results["arms"]:
            diffs = arm.get("vs_first_arm", {})
            for key, m in arm["metrics"].items():
                ci, d = m.get("ci95"), diffs.get(key)
                shown_ci = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
                shown_d = f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else ""
                lines.append(f"| {arm['name']} | {arm['cit_weight']:g} | {arm['seeds']} | {key} | {m['n']} | "
                             f"{m['mean']:.3f} | {shown_ci} | {shown_d} |")
        lines += ["", "| arm | steps | penalty active (fraction of steps) | s/step | peak RSS MB |", "|---|---|---|---|---|"]
        for arm in results["arms"]:
            lines.append(f"| {arm['name']} | {arm['steps']} | {arm['cit_active_fraction']:.3f} | "
                         f"{arm['seconds_per_step']} | {arm['peak_rss_mb']} |")
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
                            required=f.name in ("corpus", "out"),
                            help=f"{f.metadata.get('help', '')} (default {getattr(defaults, f.name)})")
    parser.add_argument("--small", action="store_true", help=f"a seconds-long run for tests: {SMALL}")
    parser.add_argument("--smoke", action="store_true",
                        help=f"issue 16's check, under 15 minutes on 2 CPU cores with Gemma-3-270M: {SMOKE} "
                             "(flags given win; default: off)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing study folder")


def run(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(CITExperimentConfig)
              if getattr(args, f.name, None) is not None}
    preset = {**(SMOKE if getattr(args, "smoke", False) else {}), **(SMALL if args.small else {})}
    cfg = CITExperimentConfig(**{**preset, **values})
    results = run_experiment(cfg, overwrite=args.overwrite)
    print(format_report(results))
    return 0
