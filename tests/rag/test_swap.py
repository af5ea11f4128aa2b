"""Corpus-swap harness: Ray (2 local workers) gives the same rows as running cells one by one; a failing cell
is retried then reported while the others finish; a rerun skips finished cells; table, CRP and plots."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from core.errors import RagError  # noqa: E402
from rag import swap as cs  # noqa: E402
from tests.conftest import SMALL_DOCS, SMALL_QUERIES, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray with 2 CPUs for the whole module; run_swap joins it instead of starting its own."""
    from core.ray_runtime import ray_session
    with ray_session(num_cpus=2) as ray:
        yield ray


def _data(root: Path) -> tuple[Path, Path]:
    corpus = write_jsonl(root / "data" / "original" / "corpus.jsonl", SMALL_DOCS)
    task = write_jsonl(root / "data" / "dev.jsonl", SMALL_QUERIES)
    return corpus, task


def _config(root: Path, models: dict | None = None, corpora: dict | None = None) -> cs.SwapConfig:
    corpus, task = _data(root)
    return cs.swap_config_from_dict({
        "name": "tiny", "k": 5, "ks": [1, 5], "metrics": ["Rprec", "recall@5"], "max_retries": 1, "workers": 2,
        "data_dir": str(root / "swapdata"),
        "corpora": corpora or {
            "original": {"path": str(corpus.parent)},
            "perturb": {"derive": {"from": "original", "transform": "perturb", "seed": 0}, "baseline": "original"},
            "missing": {"derive": {"from": "original", "transform": "no-such-transform"}, "optional": True,
                        "baseline": "original"},
        },
        "tasks": {"dev": {"path": str(task), "corpus": "original"}},
        "models": models or {"bm25": {"kind": "bm25", "method": "none"},
                             "minilm": {"kind": "dense", "encoder": "minilm", "method": "untuned"}},
    })


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _essence(rows: list[dict]) -> list[tuple]:
    return [(r["cell"], r["status"], r["metrics"]) for r in rows]


def test_ray_matches_one_by_one_and_rerun_skips(tmp_path: Path, ray_local):
    config = _config(tmp_path)
    local = cs.run_swap(config, tmp_path / "local", workers=0)
    distributed = cs.run_swap(config, tmp_path / "ray", workers=2)
    assert _essence(distributed) == _essence(local)
    by_cell = {r["cell"]: r for r in distributed}
    assert len(by_cell) == 6  # 2 models x (original, perturb, missing) x 1 task
    assert {r["status"] for r in distributed if r["corpus"] != "missing"} == {"ok"}
    assert {r["status"] for r in distributed if r["corpus"] == "missing"} == {"unavailable"}
    assert "no-such-transform" in by_cell["bm25|missing|dev"]["reason"]
    assert by_cell["bm25|original|dev"]["metrics"]["n"] == 3
    assert by_cell["minilm|perturb|dev"]["metrics"]["n"] == 3
    assert by_cell["bm25|original|dev"]["metrics"]["recall@5"] == 1.0
    # one index per (corpus, kind, encoder), shared by the cells
    assert len(list((tmp_path / "ray" / "indexes").glob("*/*/manifest.json"))) == 4
    # results.jsonl holds one row a cell; table, plots and summary are written
    assert len(_lines(tmp_path / "ray" / cs.RESULTS)) == 6
    table = (tmp_path / "ray" / cs.TABLE).read_text(encoding="utf-8")
    assert "Original vs swapped" in table and "unavailable" in table
    assert (tmp_path / "ray" / cs.PLOTS / "crp-Rprec.png").stat().st_size > 0
    assert (tmp_path / "ray" / cs.PLOTS / "metric-recall-5.png").stat().st_size > 0
    # rerun: finished cells are skipped (unavailable ones are looked at again, cheaply)
    again = cs.run_swap(config, tmp_path / "ray", workers=2)
    assert _essence(again) == _essence(distributed)
    rows = _lines(tmp_path / "ray" / cs.RESULTS)
    assert sum(r["status"] == "ok" for r in rows) == 4 and len(rows) == 8


def test_failing_cell_is_retried_then_reported_and_resumes(tmp_path: Path, ray_local):
    corpus, task = _data(tmp_path)
    broken = tmp_path / "broken"
    write_jsonl(broken / "corpus.jsonl", SMALL_DOCS)
    good_task = task.read_text(encoding="utf-8")
    (broken / "dev.jsonl").write_text(good_task + "{not json\n", encoding="utf-8")
    corpora = {"original": {"path": str(corpus.parent)}, "broken": {"path": str(broken), "baseline": "original"},
               "perturb": {"derive": {"from": "original", "transform": "perturb"}, "baseline": "original"}}
    config = _config(tmp_path, models={"bm25": {"kind": "bm25"}}, corpora=corpora)
    out = tmp_path / "out"
    rows = {r["cell"]: r for r in cs.run_swap(config, out, workers=2)}
    failed = rows["bm25|broken|dev"]
    assert failed["status"] == "failed" and failed["attempts"] == 2  # first try + max_retries=1
    assert "malformed JSON" in failed["error"]
    assert rows["bm25|original|dev"]["status"] == rows["bm25|perturb|dev"]["status"] == "ok"
    assert (out / "cells" / "bm25--broken--dev" / "error.txt").exists()
    assert "failed" in (out / cs.TABLE).read_text(encoding="utf-8")

    (broken / "dev.jsonl").write_text(good_task, encoding="utf-8")  # fix the data, rerun: only that cell runs
    rows = {r["cell"]: r for r in cs.run_swap(config, out, workers=2)}
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert rows["bm25|broken|dev"]["metrics"] == rows["bm25|original|dev"]["metrics"]
    written = [r["cell"] for r in _lines(out / cs.RESULTS)]
    assert written.count("bm25|original|dev") == written.count("bm25|perturb|dev") == 1
    assert written.count("bm25|broken|dev") == 2


def test_local_retry_counts_attempts(tmp_path: Path, monkeypatch):
    calls = []

    def flaky(cell, workdir):
        calls.append(cell.key)
        if len(calls) == 1:
            raise RuntimeError("transient")
        return {"n": 1, "Rprec": 0.5}

    monkeypatch.setitem(cs.CELL_KINDS, "flaky", cs.CellKind(flaky))
    config = _config(tmp_path, models={"f": {"kind": "flaky"}}, corpora={"original": {"path": str(tmp_path / "data" / "original")}})
    (row,) = cs.run_swap(config, tmp_path / "out", workers=0)
    assert row["status"] == "ok" and row["attempts"] == 2 and calls == ["f|original|dev"] * 2


def test_unavailable_kinds_are_reported_not_faked(tmp_path: Path, monkeypatch):
    import dataclasses
    monkeypatch.setitem(cs.CELL_KINDS, "generative", dataclasses.replace(
        cs.CELL_KINDS["generative"], available=lambda: "retrievers.generative is not in this build"))
    monkeypatch.setitem(cs.CELL_KINDS, "reader", dataclasses.replace(
        cs.CELL_KINDS["reader"], available=lambda: "readers.base has no load_reader"))
    config = _config(tmp_path, models={"bm25": {"kind": "bm25"},
                                       "reader": {"kind": "reader", "reader": "x", "retriever": "bm25", "method": "cit"},
                                       "gen": {"kind": "generative", "run": "y"}},
                     corpora={"original": {"path": str(tmp_path / "data" / "original")}})
    rows = {r["model"]: r for r in cs.run_swap(config, tmp_path / "out", workers=0)}
    assert rows["bm25"]["status"] == "ok"
    assert rows["reader"]["status"] == rows["gen"]["status"] == "unavailable"
    assert "load_reader" in rows["reader"]["reason"] and rows["reader"]["metrics"] == {}
    assert "not in this build" in rows["gen"]["reason"]
    assert not list((tmp_path / "out" / "indexes" / "original").glob("trie-*"))  # nothing built for them


def test_config_errors(tmp_path: Path):
    with pytest.raises(RagError, match="unknown kind"):
        _config(tmp_path, models={"m": {"kind": "nope"}})
    with pytest.raises(RagError, match="cycle"):
        _config(tmp_path, corpora={"a": {"derive": {"from": "b", "transform": "perturb"}},
                                   "b": {"derive": {"from": "a", "transform": "perturb"}},
                                   "original": {"path": str(tmp_path / "data" / "original")}})
    with pytest.raises(RagError, match="unknown option"):
        _config(tmp_path, models={"m": {"kind": "bm25", "encodr": "x"}})
    # a transform that is not in this build stops the config when it is read (unless the corpus is optional)
    with pytest.raises(RagError, match="corpora.cf.derive.transform: unknown transform 'no-such': not in this build"):
        _config(tmp_path, corpora={"original": {"path": str(tmp_path / "data" / "original")},
                                   "cf": {"derive": {"from": "original", "transform": "no-such"}}})


def test_results_file_survives_a_torn_row(tmp_path: Path):
    path = tmp_path / "results.jsonl"
    cs.append_row(path, {"cell": "a", "status": "failed"})
    cs.append_row(path, {"cell": "a", "status": "ok"})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"cell": "b", "stat')  # a crash mid-write
    assert cs.read_results(path) == {"a": {"cell": "a", "status": "ok"}}


def test_table_crp_and_plots(tmp_path: Path):
    def row(model, corpus, value, baseline=None, status="ok", pseudo=False, task="dev"):
        return {"cell": f"{model}|{corpus}|{task}", "model": model, "method": "m", "kind": "bm25", "corpus": corpus,
                "corpus_label": corpus, "baseline": baseline, "task": task, "pseudo": pseudo, "status": status,
                "metrics": {"n": 3, "Rprec": value} if status == "ok" else {}, "seconds": 1.0,
                "reason": "not in this build" if status != "ok" else None}

    rows = [row("a", "orig", 0.5), row("a", "swap", 0.25, "orig"), row("a", "fold", 0.75, "orig", pseudo=True, task="pseudo"),
            row("a", "cf", None, "orig", status="unavailable")]
    crp = {c["corpus"]: c["crp"]["Rprec"] for c in cs.corpus_relative(rows, ["Rprec"])}
    assert crp == {"swap": 0.5, "fold": 1.5, "cf": None}
    table = cs.format_swap_table(rows, ["Rprec"])
    assert "0.5000 → 0.2500 (0.50)" in table and "pseudo†" in table and "pseudo-queries" in table
    assert "unavailable: not in this build" in table
    paths = cs.write_plots(rows, tmp_path / "plots", ["Rprec"])
    assert {p.name for p in paths} == {"metric-Rprec.png", "crp-Rprec.png"}


def test_cli_is_wired():
    from rag.cli import build_parser
    args = build_parser().parse_args(["eval", "corpus-swap", "--config", "c.yaml", "--out", "o", "--workers", "0"])
    assert args.workers == 0 and args.func.__name__ == "run_corpus_swap"


def test_shipped_configs_parse():
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("swap-demo.yaml", "swap-full.yaml"):
        config = cs.load_swap_config(root / name)
        assert config.models and config.corpora


def test_counterfactual_from_eval_transforms_is_paired(tmp_path: Path):
    pytest.importorskip("eval.transforms")
    config = _config(tmp_path, models={"bm25": {"kind": "bm25"}}, corpora={
        "original": {"path": str(tmp_path / "data" / "original")},
        "counterfactual": {"derive": {"from": "original", "transform": "counterfactual"}, "baseline": "original"}})
    rows = {r["corpus"]: r for r in cs.run_swap(config, tmp_path / "out", workers=0)}
    cf = rows["counterfactual"]
    assert cf["status"] == "ok" and 0 < cf["metrics"]["n"] < rows["original"]["metrics"]["n"]
    # CRP compares the same questions: the baseline is rescored on the questions the transform kept
    assert cf["paired_n"] == cf["metrics"]["n"] and cf["baseline_metrics"]["n"] == cf["metrics"]["n"]
    assert "paired" in (tmp_path / "out" / cs.TABLE).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- content fingerprints: stale cells rerun

def _fake_run(folder: Path, weights: bytes) -> Path:
    """A fake model / run folder: a weights file plus files that are not weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "metrics.json").write_text("{}", encoding="utf-8")
    return folder


def _retrain(weights_file: Path, content: bytes) -> None:
    """What training further into the same run folder does: new bytes in the same file, written later."""
    before = weights_file.stat().st_mtime_ns
    weights_file.write_bytes(content)
    os.utime(weights_file, ns=(before + 2_000_000_000, before + 2_000_000_000))


def test_gemma_alias_fingerprints_the_causal_lm_not_the_bi_encoder(tmp_path: Path, monkeypatch):
    """`gemma-3-270m` in a swap cell is the reader/generative LM; the bi-encoder alias of the same name (for
    dense training) must not be derived or fingerprinted in its place."""
    import core.gemma
    import core.models

    lm = _fake_run(tmp_path / "gemma", b"\x02" * 64)
    monkeypatch.setattr(core.gemma, "gemma_path", lambda: str(lm))

    def no_bi_encoder() -> str:
        raise AssertionError("the bi-encoder alias was resolved")
    monkeypatch.setitem(core.models.MODEL_ALIASES, "gemma-3-270m", no_bi_encoder)
    assert cs.weights_fingerprint("gemma-3-270m") == cs.weights_fingerprint(str(lm))


def test_weights_fingerprint_covers_weights_only(tmp_path: Path):
    run = _fake_run(tmp_path / "run", b"\x00" * 64)
    first = cs.weights_fingerprint(str(run))
    assert first.startswith("sha256:") and cs.weights_fingerprint(str(run)) == first
    (run / "metrics.json").write_text('{"dev": 1}', encoding="utf-8")          # logs and metrics: not weights
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    (run / "checkpoints" / "step-10" / "weights.safetensors").write_bytes(b"ckpt")  # intermediate states: not read
    assert cs.weights_fingerprint(str(run)) == first
    _retrain(run / "model.safetensors", b"\x01" * 64)                          # same size, other bytes
    assert cs.weights_fingerprint(str(run)) != first
    (run / "peft").mkdir()
    (run / "peft" / "adapter.safetensors").write_bytes(b"adapter")             # weights in a subfolder count
    assert len({first, cs.weights_fingerprint(str(run))}) == 2
    assert cs.weights_fingerprint("some-org/some-model") == "name:some-org/some-model"
    assert cs.weights_fingerprint(None) is None


def test_retrained_model_makes_its_cells_stale(tmp_path: Path, monkeypatch):
    """Train further into the same run folder: the rerun recomputes the cell (and says so) instead of reporting the
    old weights' score; unchanged weights: the cell is skipped."""
    calls = []

    def fake(cell, workdir):
        calls.append(cell.key)
        weights = (Path(cell.model.run) / "model.safetensors").read_bytes()
        return {"n": 3, "Rprec": weights.count(b"\x01") / len(weights), "recall@5": 1.0}

    monkeypatch.setitem(cs.CELL_KINDS, "fake", cs.CellKind(fake))
    run = _fake_run(tmp_path / "runs" / "dense", b"\x01\x00\x00\x00" * 4)
    config = _config(tmp_path, models={"m": {"kind": "fake", "run": str(run)}},
                     corpora={"original": {"path": str(tmp_path / "data" / "original")}})
    out = tmp_path / "out"
    (row,) = cs.run_swap(config, out, workers=0)
    assert row["status"] == "ok" and row["metrics"]["Rprec"] == 0.25 and len(calls) == 1

    (row,) = cs.run_swap(config, out, workers=0)                    # nothing changed: skipped
    assert len(calls) == 1 and row["metrics"]["Rprec"] == 0.25
    summary = json.loads((out / cs.SUMMARY).read_text(encoding="utf-8"))
    assert summary["reuse"]["reused"] == 1 and summary["reuse"]["stale"] == 0

    _retrain(run / "model.safetensors", b"\x01\x01\x00\x00" * 4)    # --resume to more steps, same folder
    (row,) = cs.run_swap(config, out, workers=0)
    assert len(calls) == 2 and row["metrics"]["Rprec"] == 0.5       # the new weights' score, not the old one
    summary = json.loads((out / cs.SUMMARY).read_text(encoding="utf-8"))
    assert summary["reuse"]["stale"] == 1 and summary["reuse"]["reused"] == 0
    assert "the weights changed (model.run)" in summary["reuse"]["stale_cells"]["m|original|dev"]
    assert "1 stale and recomputed" in (out / cs.TABLE).read_text(encoding="utf-8")

    (row,) = cs.run_swap(config, out, workers=0)                    # and then it is current again
    assert len(calls) == 2


def test_rebuilt_index_makes_its_cells_stale(tmp_path: Path):
    config = _config(tmp_path, models={"bm25": {"kind": "bm25"}},
                     corpora={"original": {"path": str(tmp_path / "data" / "original")}})
    out = tmp_path / "out"
    (first,) = cs.run_swap(config, out, workers=0)
    assert first["status"] == "ok" and first["index_manifest"].startswith("sha256:")
    cs.run_swap(config, out, workers=0)
    assert len(_lines(out / cs.RESULTS)) == 1                        # unchanged: skipped
    manifest = Path(first["index"]) / "manifest.json"
    data = json.loads(manifest.read_text(encoding="utf-8"))
    data["created"] = "2000-01-01T00:00:00Z"                         # the index was rebuilt in place
    manifest.write_text(json.dumps(data), encoding="utf-8")
    (again,) = cs.run_swap(config, out, workers=0)
    assert len(_lines(out / cs.RESULTS)) == 2 and again["metrics"] == first["metrics"]
    summary = json.loads((out / cs.SUMMARY).read_text(encoding="utf-8"))
    assert summary["reuse"]["stale"] == 1 and "index changed" in summary["reuse"]["stale_cells"]["bm25|original|dev"]


def test_retrained_encoder_gets_a_new_index(tmp_path: Path):
    """The index is named by the encoder's weights, so a retrained encoder never reads the old encoder's index."""
    run = _fake_run(tmp_path / "runs" / "enc", b"w" * 32)
    config = _config(tmp_path, models={"dense": {"kind": "dense", "encoder": str(run)}},
                     corpora={"original": {"path": str(tmp_path / "data" / "original")}})
    before = cs.plan_swap(config, tmp_path / "out").cells[0]
    _retrain(run / "model.safetensors", b"v" * 32)
    after = cs.plan_swap(config, tmp_path / "out").cells[0]
    assert before.index_dir != after.index_dir and before.spec_hash != after.spec_hash
    assert before.weights != after.weights and set(after.weights) == {"model.encoder"}


def test_rerank_cells_rerank_their_retrievers_ranking(tmp_path: Path):
    from retrievers.rerank import load_base_cross_encoder
    from tests.retrievers.test_rerank import _tiny_cross_encoder_base

    ce_dir = tmp_path / "ce"
    load_base_cross_encoder(str(_tiny_cross_encoder_base(tmp_path / "tiny")), max_length=32).save_pretrained(str(ce_dir))
    config = _config(tmp_path, models={"bm25": {"kind": "bm25"},
                                       "ce": {"kind": "rerank", "run": str(ce_dir), "retriever": "bm25",
                                              "options": {"depth": 5}}},
                     corpora={"original": {"path": str(tmp_path / "data" / "original")}})
    rows = {r["model"]: r for r in cs.run_swap(config, tmp_path / "out", workers=0)}
    assert rows["ce"]["status"] == "ok", rows["ce"]
    assert rows["ce"]["metrics"]["n"] == rows["bm25"]["metrics"]["n"] and "Rprec" in rows["ce"]["metrics"]
    # the re-ranked guesses hold the same candidates as BM25's top 5, in the cross-encoder's order
    reranked = _lines(Path(rows["ce"]["workdir"]) / "guesses.jsonl")
    first_stage = _lines(Path(rows["bm25"]["workdir"]) / "guesses.jsonl")
    for ce_row, bm25_row in zip(reranked, first_stage):
        ce_ids = [p["wikipedia_id"] for p in ce_row["output"][0]["provenance"]]
        assert sorted(ce_ids) == sorted(p["wikipedia_id"] for p in bm25_row["output"][0]["provenance"])
        scores = [p["score"] for p in ce_row["output"][0]["provenance"]]
        assert scores == sorted(scores, reverse=True)
    with pytest.raises(RagError, match="a rerank model needs run"):
        _config(tmp_path, models={"bm25": {"kind": "bm25"}, "ce": {"kind": "rerank", "retriever": "bm25"}})
    with pytest.raises(RagError, match="a rerank model needs retriever"):
        _config(tmp_path, models={"ce": {"kind": "rerank", "run": str(ce_dir)}})
    with pytest.raises(RagError, match="options.depth"):
        _config(tmp_path, models={"bm25": {"kind": "bm25"},
                                  "ce": {"kind": "rerank", "run": str(ce_dir), "retriever": "bm25",
                                         "options": {"depth": 0}}})
