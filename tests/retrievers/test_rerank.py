"""The re-ranking stage: ordering, input errors, training on a tiny cross-encoder, and folders that plain
sentence-transformers loads (full tuning) or the toolkit rebuilds exactly (PEFT)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError, RagError
from retrievers.rerank import RerankerTrainConfig, load_reranker, read_guess_candidates, rerank, train_reranker
from tests.retrievers.dense_fixtures import write_jsonl, write_toy_data


class KeywordCE:
    """A deterministic fake cross-encoder: the score counts question words found in the passage."""

    def predict(self, pairs, **_):
        return np.array([sum(w in p.lower() for w in q.lower().split()) for q, p in pairs], dtype=np.float32)


def test_rerank_orders_by_score_keeps_ties_stable_and_cuts_at_k():
    cands = [[{"wikipedia_id": "a", "title": "A", "text": "nothing here"},
              {"wikipedia_id": "b", "title": "B", "text": "red fox"},
              {"wikipedia_id": "c", "title": "C", "text": "a red fox jumps"},
              {"wikipedia_id": "d", "title": "D", "text": "nothing either"}]]
    ranked = rerank(KeywordCE(), ["red fox jumps"], cands)
    assert [h["wikipedia_id"] for h in ranked[0]] == ["c", "b", "a", "d"]  # a before d: first-stage order on a tie
    assert [h["wikipedia_id"] for h in rerank(KeywordCE(), ["red fox jumps"], cands, k=2)[0]] == ["c", "b"]
    assert rerank(KeywordCE(), ["q"], [[]]) == [[]]
    with pytest.raises(RagError, match="at least 1"):
        rerank(KeywordCE(), ["q"], cands, k=0)


@pytest.mark.parametrize("row, field", [
    ({"id": "1", "input": "q"}, "output"),
    ({"id": "1", "input": "q", "output": [{"provenance": "a"}]}, "output[0].provenance"),
    ({"id": "1", "input": "q", "output": [{"provenance": [{"wikipedia_id": "a"}]}]}, "text"),
])
def test_guess_files_without_candidates_are_refused(tmp_path, row, field):
    path = write_jsonl(tmp_path / "g.jsonl", [row])
    with pytest.raises(InputError, match=field.replace("[", r"\[").replace("]", r"\]")):
        read_guess_candidates(path)


def _tiny_cross_encoder_base(out: Path, dropout: float = 0.1) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from core.models import resolve_model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rerank")
    data = write_toy_data(folder)
    data["base"] = _tiny_cross_encoder_base(folder / "tiny-bert")
    data["base_no_dropout"] = _tiny_cross_encoder_base(folder / "tiny-bert-no-dropout", dropout=0.0)
    return data


def _config(toy, **kw):
    base = dict(corpus=str(toy["corpus"]), train=str(toy["train"]), dev=str(toy["dev"]), base=str(toy["base"]),
                max_steps=40, batch_size=8, lr=3e-3, negatives=3, negative_depth=10, rerank_depth=10,
                max_length=64, words_per_passage=30, log_every=5, device="cpu")
    base.update(kw)
    return RerankerTrainConfig(**base)


def test_training_lowers_the_loss_and_saves_a_folder_plain_sentence_transformers_loads(toy, tmp_path):
    out = tmp_path / "run"
    metrics = train_reranker(_config(toy), out)
    assert metrics["train_loss"]["last"] < metrics["train_loss"]["first"]
    assert set(metrics["dev"]) == {"bm25", "reranked"} and set(metrics["dev_step0"]) == {"bm25", "reranked"}
    assert metrics["dev"]["bm25"] == metrics["dev_step0"]["bm25"]  # BM25's own order does not train
    curves = (out / "curves.csv").read_text().splitlines()
    assert any(line.startswith("0,dev,Rprec,") for line in curves)  # the untrained head, at step 0
    assert any(line.startswith("40,dev,Rprec,") for line in curves)  # and the end
    pairs = [["what is the lion known for?", "Lion: The lion is a famous subject of animals."],
             ["what is the lion known for?", "Paris: The paris is a famous subject of cities."]]
    ours = load_reranker(out).predict(pairs, convert_to_numpy=True)
    code = ("import json, sys; from sentence_transformers import CrossEncoder; "
            f"print(json.dumps(CrossEncoder({str(out / 'model')!r}).predict({pairs!r}).tolist()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rag" not in proc.stdout
    np.testing.assert_allclose(json.loads(proc.stdout.strip().splitlines()[-1]), ours, atol=1e-5)


def test_lora_run_reloads_to_the_same_scores(toy, tmp_path):
    out = tmp_path / "lora"
    train_reranker(_config(toy, peft="lora", max_steps=10, loss="listnet", batch_size=4), out)
    assert (out / "peft").is_dir() and (out / "head.safetensors").is_file()
    pairs = [["what is the tiger known for?", "Tiger: The tiger is a famous subject of animals."]]
    first = load_reranker(out).predict(pairs, convert_to_numpy=True)
    second = load_reranker(out).predict(pairs, convert_to_numpy=True)
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_bf16_checkpointing_and_accumulation_run_and_refusals_come_first(toy, tmp_path):
    plain = train_reranker(_config(toy, max_steps=4, dev=None), tmp_path / "plain")
    knobs = train_reranker(_config(toy, max_steps=4, dev=None, bf16=True, gradient_checkpointing=True,
                                   gradient_accumulation_steps=2, batch_size=4), tmp_path / "knobs")
    assert abs(knobs["train_loss"]["first"] - plain["train_loss"]["first"]) < 0.05  # bf16 autocast, half batches
    with pytest.raises(RagError, match="--loss mnrl on --workers"):
        train_reranker(_config(toy, workers=2, loss="mnrl"), tmp_path / "w")
    with pytest.raises(RagError, match="--fp16 needs a CUDA GPU"):
        train_reranker(_config(toy, fp16=True), tmp_path / "f")
    assert not (tmp_path / "w").exists() and not (tmp_path / "f").exists()


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(toy, tmp_path):
    """Checkpoints every 2 steps (safetensors + JSON, no pickle); a run stopped after step 4 and resumed to 6
    ends on the same curve and the same model as one run of 6 steps. Tensorboard events go to the run folder."""
    kw = dict(base=str(toy["base_no_dropout"]), log_every=1, dev=None, save_every=2)
    whole = train_reranker(_config(toy, max_steps=6, report_to="tensorboard", **kw), tmp_path / "whole")
    train_reranker(_config(toy, max_steps=4, **kw), tmp_path / "part")
    assert (tmp_path / "part" / "checkpoints" / "checkpoint-4" / "trainable.safetensors").is_file()
    resumed = train_reranker(_config(toy, max_steps=6, **kw), tmp_path / "part", resume=True)
    assert resumed["resumed_from"] == 4
    np.testing.assert_allclose(list(resumed["train_loss"]["by_step"].values()),
                               list(whole["train_loss"]["by_step"].values()), atol=1e-5)
    pairs = [["what is the lion known for?", "Lion: The lion is a famous subject of animals."]]
    np.testing.assert_allclose(load_reranker(tmp_path / "part").predict(pairs, convert_to_numpy=True),
                               load_reranker(tmp_path / "whole").predict(pairs, convert_to_numpy=True), atol=1e-5)
    assert list((tmp_path / "whole" / "tensorboard").glob("events.out.tfevents.*"))
    assert not list((tmp_path / "part").rglob("*.pt")) and not list((tmp_path / "part").rglob("*.pkl"))
    with pytest.raises(RagError, match="already holds a run"):
        train_reranker(_config(toy, max_steps=6, **kw), tmp_path / "part")


@pytest.mark.parametrize("loss", ["listnet", "bce"])
def test_two_ray_workers_train_like_one_worker_of_twice_the_batch(toy, tmp_path, loss, monkeypatch):
    """Listwise and pointwise losses average over the batch, so 2 Ray Train workers x 2 questions must follow
    1 worker x 4 (dropout off; each worker scores its own share of every batch, DDP averages the gradients).
    Within one epoch (18 toy questions): at an epoch's end the last, partial batch is shared out differently.
    With listnet, worker 1 dies after step 3: the group restarts from the step-2 checkpoint on the same curve."""
    from core.training.ray_train import FAULT_ENV

    if loss == "listnet":
        monkeypatch.setenv(FAULT_ENV, "1:3")  # inherited by the local Ray that train_reranker starts
    kw = dict(base=str(toy["base_no_dropout"]), max_steps=4, log_every=1, loss=loss, dev=None, save_every=2)
    one = train_reranker(_config(toy, batch_size=4 if loss == "listnet" else 8, **kw), tmp_path / "one")
    two = train_reranker(_config(toy, batch_size=2 if loss == "listnet" else 4, workers=2, **kw), tmp_path / "two")
    assert (tmp_path / "two" / ".fault-injected-1-3").exists() == (loss == "listnet")
    assert two["resumed_from"] == (2 if loss == "listnet" else 0)
    a, b = one["train_loss"]["by_step"], two["train_loss"]["by_step"]
    assert len(a) == 4 and a.keys() == b.keys() and two["workers"] == 2
    assert two["examples_per_step"] == one["examples_per_step"]
    np.testing.assert_allclose(list(b.values()), list(a.values()), atol=1e-4)
    pairs = [["what is the lion known for?", "Lion: The lion is a famous subject of animals."],
             ["what is the lion known for?", "Paris: The paris is a famous subject of cities."]]
    np.testing.assert_allclose(load_reranker(tmp_path / "two").predict(pairs, convert_to_numpy=True),
                               load_reranker(tmp_path / "one").predict(pairs, convert_to_numpy=True), atol=1e-4)


def test_bad_options_fail_before_work(toy, tmp_path):
    with pytest.raises(RagError, match="unknown PEFT method"):
        train_reranker(_config(toy, peft="qlora"), tmp_path / "x")
    with pytest.raises(RagError, match="--loss"):
        train_reranker(_config(toy, loss="pairwise"), tmp_path / "y")
    with pytest.raises(InputError, match="corpus file not found"):
        train_reranker(_config(toy, corpus=str(tmp_path / "nope.jsonl"), workers=2), tmp_path / "z")
    with pytest.raises(RagError, match="--dev .*: no such file"):
        train_reranker(_config(toy, dev=str(tmp_path / "nope.jsonl"), workers=2), tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_rag_rerank_cli_reorders_a_guess_file_and_refuses_to_overwrite_its_input(toy, tmp_path, capsys):
    from rag.cli import main

    run = tmp_path / "run"
    train_reranker(_config(toy, max_steps=5), run)
    prov = [{"wikipedia_id": f"d{i}", "title": t, "text": f"The {t.lower()} is a famous subject."}
            for i, t in enumerate(["Paris", "Lion", "Tiger"])]
    guess = write_jsonl(tmp_path / "guess.jsonl", [{"id": "q1", "input": "what is the lion known for?",
                                                    "output": [{"provenance": prov}]}])
    out = tmp_path / "reranked.jsonl"
    assert main(["rerank", "--run", str(guess), "--model", str(run), "--out", str(out), "--k", "2"]) == 0
    row = json.loads(out.read_text().splitlines()[0])
    ranked = row["output"][0]["provenance"]
    assert len(ranked) == 2 and {h["wikipedia_id"] for h in ranked} <= {"d0", "d1", "d2"}
    assert ranked[0]["score"] >= ranked[1]["score"]
    assert main(["rerank", "--run", str(guess), "--model", str(run), "--out", str(guess)]) == 2
    assert main(["rerank", "--run", str(guess), "--model", str(run), "--out", str(out)]) == 2  # exists
    assert "exists" in capsys.readouterr().err


def test_an_encoder_without_a_scoring_head_gets_a_mean_pooled_one_and_a_trained_cross_encoder_keeps_its_own(toy, tmp_path):
    from retrievers.rerank import load_base_cross_encoder

    ce = load_base_cross_encoder(str(toy["base"]), max_length=32)
    assert [type(m).__name__ for m in ce] == ["Transformer", "Pooling", "Dense"]
    assert ce[1].get_config_dict()["pooling_mode"] == "mean" and ce.num_labels == 1
    ce.save_pretrained(str(tmp_path / "ce"))
    # a saved folder whose encoder is a sequence classifier (here: made from the tiny base) is used as it is
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    cfg = BertConfig.from_pretrained(str(toy["base"]), num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "seqcls")
    AutoTokenizer.from_pretrained(str(toy["base"])).save_pretrained(tmp_path / "seqcls")
    trained = load_base_cross_encoder(str(tmp_path / "seqcls"), max_length=32)
    assert len(trained) == 1 and type(trained[0].model).__name__ == "BertForSequenceClassification"


def test_rerank_hits_reorders_retriever_output_and_keeps_each_hit(tmp_path):
    from retrievers.base import Hit
    from retrievers.rerank import rerank_hits

    hits = [[Hit("a", "A", 9.0, "nothing here", pid=3), Hit("c", "C", 1.0, "a red fox jumps", pid=7),
             Hit("b", "B", 5.0, "red fox", pid=5)]]
    out = rerank_hits(KeywordCE(), ["red fox jumps"], hits, k=2)
    assert [h.doc_id for h in out[0]] == ["c", "b"]
    assert out[0][0].pid == 7 and out[0][0].text == "a red fox jumps" and out[0][0].score == 3.0


def test_rag_answer_refuses_a_rerank_folder_that_is_not_one_before_reading(toy, tmp_path, capsys):
    from rag.cli import main
    from retrievers.bm25 import build_bm25_index
    from retrievers.index_kinds import index_config

    index = tmp_path / "bm25"
    build_bm25_index(toy["corpus"], index, index_config("bm25", {"words_per_passage": 30, "stride": 30}))
    empty = tmp_path / "not-a-reranker"
    empty.mkdir()
    out = tmp_path / "answers.jsonl"
    assert main(["answer", "--index", str(index), "--queries", str(toy["dev"]), "--out", str(out),
                 "--rerank", str(empty)]) == 2
    assert "neither a re-ranker run" in capsys.readouterr().err and not out.exists()
