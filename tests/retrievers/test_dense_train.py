"""Dense retriever tuning on a toy corpus with a tiny random encoder (no downloads, seconds per test)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.corpus import Corpus
from core.errors import InputError, RagError
from rag.cli import main
from retrievers.dense_train import DenseTrainConfig, build_model, fit_dense, load_dense_run, train_dense
from retrievers.encoders import DenseEncoder, load_encoder
from retrievers.training_pairs import dedupe_batch, mine_bm25_negatives, pseudo_query_pairs, question_pairs
from tests.retrievers.dense_fixtures import build_tiny_st, toy_questions, write_jsonl, write_toy_data

TEXTS = ["what is the lion known for?", "Tokyo: The tokyo is a famous subject of cities.", "golf"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("toy")
    paths = write_toy_data(folder)
    paths["encoder"] = build_tiny_st(folder / "tiny-st")
    return paths


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_HOME", str(tmp_path / "rag-home"))  # the cached BM25 index for hard negatives


def make_config(toy, **kw) -> DenseTrainConfig:
    values = dict(corpus=str(toy["corpus"]), train=str(toy["train"]), dev=str(toy["dev"]), encoder=str(toy["encoder"]),
                  peft="iaa", max_steps=6, batch_size=6, lr=1e-2, eval_every=0, save_every=0, log_every=1,
                  eval_docs=0, max_seq_length=48, device="cpu")
    values.update(kw)
    return DenseTrainConfig(**values)


def in_batch_loss(encoder: DenseEncoder, toy) -> float:
    """Softmax cross-entropy of every training question against all positives (one fixed batch)."""
    corpus = Corpus.load(toy["corpus"])
    pairs, _ = question_pairs(toy["train"], corpus)
    docs = [f"{corpus.get(p.positive_id).title}: {corpus.get(p.positive_id).text}" for p in pairs]
    q = torch.from_numpy(encoder.encode_query([p.query for p in pairs]))
    d = torch.from_numpy(encoder.encode_passage(docs))
    return float(torch.nn.functional.cross_entropy(20 * q @ d.T, torch.arange(len(pairs))))


def test_training_reduces_loss(toy, tmp_path):
    before = in_batch_loss(load_encoder(str(toy["encoder"]), device="cpu"), toy)
    metrics = train_dense(make_config(toy, max_steps=30, lr=2e-2, pseudo_queries=12), tmp_path / "run")
    after = in_batch_loss(load_encoder(str(tmp_path / "run"), device="cpu"), toy)
    assert after < before - 0.1, (before, after)
    assert metrics["final_train"]["loss"] > 0 and metrics["pseudo_queries"] == 12
    assert metrics["hard_negatives"]["bm25"] + metrics["hard_negatives"]["random"] == metrics["train_pairs"]


EXPECTED_TRAINABLE = {
    "iaa": lambda n: ".peft_adapter." in n,
    "adapter": lambda n: ".peft_adapter." in n and ".chain." not in n,
    "lora": lambda n: ".lora_" in n,
    "prefix": lambda n: "prompt_encoder" in n,
    "bitfit": lambda n: n.endswith(".bias"),
    "full": lambda n: True,
}


@pytest.mark.parametrize("method", sorted(EXPECTED_TRAINABLE))
def test_only_intended_parameters_train(toy, method):
    model, st, base_params, _ = build_model(make_config(toy, peft=method), [], "cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and all(EXPECTED_TRAINABLE[method](n) for n in trainable), trainable[:5]
    if method == "full":
        assert not frozen
    else:
        assert frozen and sum(p.numel() for p in model.parameters() if p.requires_grad) < base_params
    if method == "adapter":  # the ablation has no chain at all
        assert not any(".chain." in n for n, _ in model.named_parameters())


def test_moe_adds_heads_and_router_to_trainable(toy):
    model, *_ = build_model(make_config(toy, moe_experts=3), ["Animals", "Cities", "Sports"], "cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".peft_adapter." in n or n.startswith(("experts.", "router.")) for n in trainable)
    assert any(n.startswith("experts.2.") for n in trainable) and any(n.startswith("router.") for n in trainable)


def test_run_folder_and_reload_reproduces_embeddings(toy, tmp_path):
    out = tmp_path / "run"
    metrics, model = fit_dense(make_config(toy, eval_every=3, save_every=3), out)
    names = sorted(p.name for p in out.iterdir())
    for name in ("config.json", "metrics.json", "curves.csv", "curves-train.png", "curves-dev.png", "dense_run.json",
                 "peft", "checkpoints"):
        assert name in names, name
    assert sorted(p.name for p in (out / "peft").iterdir()) == ["peft_config.json", "peft_weights.safetensors"]
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))
    meta = json.loads((out / "dense_run.json").read_text())
    assert meta["base_model"] == str(toy["encoder"]) and meta["peft"] == "iaa" and meta["moe"] is None
    saved = load_file(str(out / "peft" / "peft_weights.safetensors"))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}  # only what was trained
    m = json.loads((out / "metrics.json").read_text())
    for key in ("trainable_params", "total_params", "trainable_fraction", "seconds_per_step", "peak_rss_mb"):
        assert m[key] is not None, key
    assert set(m["dev"]) == {"Rprec", "recall@5", "recall@20"} and m["trainable_pct_of_encoder"] < 100
    dev_rows = [r for r in (out / "curves.csv").read_text().splitlines() if ",dev," in r]
    assert {r.split(",")[0] for r in dev_rows} == {"0", "3", "6"}  # untuned, every 3 steps and at the end
    assert metrics["dev_step0"] and metrics["dev_step0"] != metrics["dev"]

    trained = DenseEncoder(model, "trained").encode_passage(TEXTS)
    reloaded = load_encoder(str(out), device="cpu")
    np.testing.assert_array_equal(reloaded.encode_passage(TEXTS), trained)
    np.testing.assert_array_equal(reloaded.encode_query(TEXTS), DenseEncoder(model, "t").encode_query(TEXTS))
    base = load_encoder(str(toy["encoder"]), device="cpu").encode_passage(TEXTS)
    assert not np.allclose(base, trained, atol=1e-5)
    meta["base_fingerprint"] = [v + 0.5 for v in meta["base_fingerprint"]]  # as if the base model had changed
    (out / "dense_run.json").write_text(json.dumps(meta))
    with pytest.raises(RagError, match="embeds differently"):
        load_dense_run(out)


def test_moe_run_reloads_and_index_uses_passage_domains(toy, tmp_path):
    out = tmp_path / "moe"
    _, model = fit_dense(make_config(toy, moe_experts=3, max_steps=8, lr=5e-2), out)
    assert (out / "moe.safetensors").exists()
    reloaded = load_dense_run(out)
    domains = ["Animals", "Cities", None]
    np.testing.assert_array_equal(reloaded.encode(TEXTS, domains=domains), model.encode(TEXTS, domains=domains))
    idx = tmp_path / "index"
    assert main(["index", "build", "--kind", "dense", "--corpus", str(toy["corpus"]), "--encoder", str(out),
                 "--out", str(idx), "--keep-embeddings"]) == 0
    emb = np.concatenate([np.load(p) for p in sorted((idx / "embeddings").glob("shard-*.npy"))])
    rows = [json.loads(line) for line in (idx / "passages.jsonl").read_text().splitlines()]
    texts = [f"{r['title']}: {r['text']}" for r in rows]
    by_domain = reloaded.encode(texts, domains=[r["domain"] for r in rows])
    np.testing.assert_allclose(emb, by_domain, atol=1e-6)
    assert not np.allclose(emb, reloaded.encode(texts), atol=1e-4)  # the router alone would embed differently


def test_cli_train_index_retrieve(toy, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "retriever", "--kind", "dense", "--corpus", str(toy["corpus"]), "--train", str(toy["train"]),
                 "--dev", str(toy["dev"]), "--encoder", str(toy["encoder"]), "--peft", "lora", "--rank", "4",
                 "--pseudo-queries", "6", "--hard-negatives", "bm25", "--max-steps", "4", "--batch-size", "4",
                 "--eval-every", "2", "--save-every", "2", "--seed", "1", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["config"]["lr"] == 5e-4  # the method's default
    idx = tmp_path / "index"
    assert main(["index", "build", "--kind", "dense", "--corpus", str(toy["corpus"]), "--encoder", str(run),
                 "--out", str(idx)]) == 0
    guesses = tmp_path / "guesses.jsonl"
    assert main(["retrieve", "--index", str(idx), "--queries", str(toy["dev"]), "--k", "5", "--out", str(guesses)]) == 0
    rows = [json.loads(line) for line in guesses.read_text().splitlines()]
    assert len(rows) == len(toy_questions("dev")) and all(len(r["output"][0]["provenance"]) == 5 for r in rows)
    # the index remembers the run folder as its encoder; another encoder is refused
    assert main(["retrieve", "--index", str(idx), "--queries", str(toy["dev"]), "--out", str(guesses),
                 "--encoder", str(toy["encoder"])]) == 2


def test_skipped_examples_are_counted_and_none_left_is_an_error(toy, tmp_path, capsys):
    rows = toy_questions("train")
    bad = [{**r, "id": r["id"] + "-x", "output": [{"answer": "?", "provenance": [{"wikipedia_id": "nope"}]}]}
           for r in rows[:5]]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows + bad)
    metrics = train_dense(make_config(toy, train=str(mixed), max_steps=2, dev=None), tmp_path / "run")
    report = metrics["train_file"]
    assert (report["examples"], report["used"], report["skipped_no_gold_in_corpus"]) == (len(rows) + 5, len(rows), 5)
    only_bad = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(InputError, match="all 5 examples were skipped"):
        question_pairs(only_bad, Corpus.load(toy["corpus"]))
    assert main(["train", "retriever", "--kind", "dense", "--corpus", str(toy["corpus"]), "--train", str(only_bad),
                 "--encoder", str(toy["encoder"]), "--out", str(tmp_path / "r2")]) == 2
    assert "none of their gold pages" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()  # nothing is written for input that cannot train


@pytest.mark.parametrize("flags, message", [
    (["--peft", "qlora"], "unknown PEFT method 'qlora'; allowed: ['adapter', 'bitfit', 'full', 'iaa', 'lora', 'prefix']"),
    (["--peft", "iaa", "--rank", "64"], "exceeds the model's hidden size 32; it must be between 1 and 32"),
    (["--peft", "bitfit", "--rank", "4"], "has no rank"),
    (["--moe-experts", "2"], "use 3 (one expert per domain) or 1"),
])
def test_bad_method_rank_or_experts_name_allowed_values(toy, tmp_path, capsys, flags, message):
    code = main(["train", "retriever", "--kind", "dense", "--corpus", str(toy["corpus"]), "--train", str(toy["train"]),
                 "--encoder", str(toy["encoder"]), "--max-steps", "1", "--out", str(tmp_path / "r"), *flags])
    assert code == 2
    assert message in capsys.readouterr().err


def test_same_seed_same_result(toy, tmp_path):
    for name in ("a", "b"):
        train_dense(make_config(toy, peft="lora", pseudo_queries=6, seed=3), tmp_path / name)
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "curves.csv").read_text() == (tmp_path / "b" / "curves.csv").read_text()


@pytest.mark.parametrize("peft", ["iaa", "lora"])
def test_resume_continues_and_refuses_a_different_config(toy, tmp_path, peft):
    """A finished run continued to more steps replaces the model/ and adapter/ folders it wrote itself."""
    out = tmp_path / "run"
    train_dense(make_config(toy, max_steps=4, save_every=2, peft=peft), out)
    metrics = train_dense(make_config(toy, max_steps=6, save_every=2, peft=peft), out, resume=True)
    assert metrics["resumed_from"] == 4 and metrics["steps"] == 6
    assert (out / "dense_run.json").is_file() and ((out / "model").is_dir() == (peft == "lora"))
    with pytest.raises(RagError, match=r"--resume refused.*rank: run has None, asked 8"):
        train_dense(make_config(toy, max_steps=8, rank=8, peft=peft), out, resume=True)


def test_pseudo_queries_and_hard_negatives(toy, tmp_path):
    from retrievers.bm25 import build_bm25_index

    corpus = Corpus.load(toy["corpus"])
    pseudo = pseudo_query_pairs(corpus, 10, seed=0)
    assert len(pseudo) == 10 and len({p.positive_id for p in pseudo}) == 10
    for p in pseudo:
        assert p.query in corpus.get(p.positive_id).text and p.query not in p.positive_text
        assert p.domain == corpus.get(p.positive_id).domain
    assert pseudo == pseudo_query_pairs(corpus, 10, seed=0) and pseudo != pseudo_query_pairs(corpus, 10, seed=1)
    build_bm25_index(toy["corpus"], tmp_path / "bm25")
    pairs, _ = question_pairs(toy["train"], corpus)
    mined, stats = mine_bm25_negatives(pairs + pseudo, tmp_path / "bm25", corpus)
    assert stats["bm25"] == len(mined) and all(p.negative_id not in p.gold_ids for p in mined)
    # a question whose gold page another example has as positive is dropped from that batch
    dup = [mined[0], mined[0], mined[1]]
    assert dedupe_batch(dup, [0, 1, 2]) in ([0, 2], [0])


def test_peft_options_reach_the_method_and_the_saved_run(toy, tmp_path):
    """--peft-options placement=houlsby gives two adapters a layer, saved in the run's PEFT config and reloaded."""
    import json

    plain, _, _, _ = build_model(make_config(toy), [], "cpu")
    houlsby, _, _, _ = build_model(make_config(toy, peft_options="placement=houlsby"), [], "cpu")
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(houlsby) > 1.9 * count(plain)
    out = tmp_path / "run"
    train_dense(make_config(toy, max_steps=2, peft_options="placement=houlsby,init=small"), out)
    saved = json.loads(next(out.rglob("peft_config.json")).read_text())
    assert "houlsby" in json.dumps(saved) and "small" in json.dumps(saved), saved
