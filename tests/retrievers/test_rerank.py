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


def _tiny_cross_encoder_base(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from core.models import resolve_model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rerank")
    data = write_toy_data(folder)
    data["base"] = _tiny_cross_encoder_base(folder / "tiny-bert")
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
    assert set(metrics["dev"]) == {"bm25", "reranked"} and "dev_step0" in metrics
    pairs = [["what is the lion known for?", "Lion: The lion is a famous subject of animals."],
             ["what is the lion known for?", "Paris: The paris is a famous subject of cities."]]
    ours = load_reranker(out).predict(pairs, convert_to_numpy=True)
    code = ("import json, sys; from sentence_transformers import CrossEncoder; "
            f"print(json.dumps(CrossEncoder({str(out)!r}).predict({pairs!r}).tolist()))")
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


def test_bad_options_fail_before_work(toy, tmp_path):
    with pytest.raises(RagError, match="unknown PEFT method"):
        train_reranker(_config(toy, peft="qlora"), tmp_path / "x")
    with pytest.raises(RagError, match="--loss"):
        train_reranker(_config(toy, loss="pairwise"), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


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
