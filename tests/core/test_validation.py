"""Validation before work: config rules (flags and --config files alike), devices, offline hub ids, ids and
text of corpora and task files, KILT gold/guess files, non-finite training losses, causal-LM checks."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pytest
import torch

from core.config import build_config, check_value, field_rules, load_config_file, opt
from core.corpus import Corpus, clean_id, validate_corpus
from core.errors import InputError, RagError
from core.tasks import load_queries
from core.training import RunFolder, TrainConfig, TrainLoop
from core.training.loop import EpochSampler, pick_device
from eval.kilt import evaluate_kilt
from tests.conftest import write_jsonl


def missing_gpu() -> str:
    """A CUDA device this machine does not have, whatever it has."""
    return f"cuda:{torch.cuda.device_count()}"


# ---------------------------------------------------------------- config rules

@dataclass
class Toy:
    words: int = opt(100, "words", min=1)
    stride: int = opt(80, "stride", min=1, at_most="words")
    rate: float = opt(0.1, "rate", gt=0, finite=True)
    share: float = opt(0.5, "share", min=0, max=1)
    mode: str = opt("a", "mode", choices=("a", "b"))
    limit: int | None = opt(None, "limit", min=1)


@pytest.mark.parametrize("value, message", [(0, "at least 1"), (-5, "at least 1")])
def test_check_value_bounds(value, message):
    with pytest.raises(ValueError, match=message):
        check_value(value, {"min": 1})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.01, 0.0])
def test_check_value_refuses_nan_inf_and_out_of_range_rates(value):
    with pytest.raises(ValueError):
        check_value(value, {"gt": 0, "finite": True})


def test_build_config_holds_every_layer_to_the_rules():
    assert build_config(Toy, {"words": 50}, {"stride": 25}).stride == 25
    for bad, field in (({"words": 0}, "--words"), ({"rate": float("nan")}, "--rate"), ({"share": 1.5}, "--share"),
                       ({"mode": "c"}, "--mode"), ({"limit": 0}, "--limit")):
        with pytest.raises(RagError, match=field):
            build_config(Toy, bad)
    with pytest.raises(RagError, match="--stride.*at most --words = 50"):
        build_config(Toy, {"words": 50})  # stride's default 80 no longer fits


def test_build_config_coerces_numbers_like_the_flags_and_refuses_the_rest():
    config = build_config(Toy, {"rate": "1e-4", "words": "700"})  # YAML 1.1 reads 1e-4 as a string
    assert config.rate == 1e-4 and config.words == 700
    for bad in ({"words": 1.0}, {"words": True}, {"words": "ten"}, {"rate": "fast"}, {"rate": [1]}):
        with pytest.raises(RagError, match="expected"):
            build_config(Toy, bad)


def test_subclass_keeps_the_rules_of_the_fields_it_only_redefaults():
    from readers.train import ReaderTrainConfig

    assert field_rules(ReaderTrainConfig, "max_steps")["min"] == 1  # `max_steps: int = 200` in the subclass
    with pytest.raises(RagError, match="--max-steps"):
        build_config(ReaderTrainConfig, {"max_steps": 0})
    with pytest.raises(RagError, match="--k "):
        ReaderTrainConfig(k=0)


@pytest.mark.parametrize("values, flag", [
    ({"max_steps": -5}, "--max-steps"), ({"batch_size": 0}, "--batch-size"), ({"lr": -0.01}, "--lr"),
    ({"lr": float("nan")}, "--lr"), ({"lr": 0.0}, "--lr"), ({"warmup_steps": -1}, "--warmup-steps"),
    ({"eval_every": -1}, "--eval-every"), ({"save_every": -1}, "--save-every"), ({"log_every": -1}, "--log-every"),
    ({"grad_clip": -1.0}, "--grad-clip"), ({"seed": -1}, "--seed"),
])
def test_train_config_refuses_bad_values_however_it_is_made(values, flag):
    with pytest.raises(RagError, match=flag):
        TrainConfig(**values)
    with pytest.raises(RagError, match=flag):
        build_config(TrainConfig, values)


def test_trainer_configs_carry_their_ranges():
    from retrievers.bm25 import BM25Config
    from retrievers.dense_build import DenseBuildConfig
    from retrievers.dense_train import DenseTrainConfig
    from retrievers.generative.train import GenerativeTrainConfig

    for cls, values in ((BM25Config, {"words_per_passage": 0}), (BM25Config, {"stride": 0}),
                        (BM25Config, {"b": 2.0}), (DenseBuildConfig, {"shard_size": 0}),
                        (DenseBuildConfig, {"batch_size": 0}), (DenseBuildConfig, {"nprobe": 0}),
                        (DenseBuildConfig, {"ef_search": 0}), (DenseBuildConfig, {"stride": 120}),
                        (DenseBuildConfig, {"passage_precision": "int4"}), (DenseTrainConfig, {"scale": 0.0}),
                        (DenseTrainConfig, {"peft": "qlora"}), (DenseTrainConfig, {"hard_negatives": "random"}),
                        (GenerativeTrainConfig, {"train_fraction": 0.0}), (GenerativeTrainConfig, {"eval_beams": 0}),
                        (GenerativeTrainConfig, {"stage": "both"})):
        with pytest.raises(RagError):
            build_config(cls, values)


def test_config_file_missing_folder_or_unparsable(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config_file(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="is a folder"):
        load_config_file(tmp_path)
    deep = tmp_path / "deep.json"
    deep.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", encoding="utf-8")
    with pytest.raises(InputError, match="cannot parse config"):
        load_config_file(deep)


# ---------------------------------------------------------------- devices and models

def test_missing_gpu_is_refused_before_any_model_loads():
    with pytest.raises(RagError, match="device cuda:"):
        pick_device(missing_gpu())
    with pytest.raises(RagError, match="--device"):
        TrainConfig(device=missing_gpu())
    with pytest.raises(RagError, match="not a torch device"):
        pick_device("gpu7")
    assert pick_device("cpu") == torch.device("cpu")


def test_offline_hub_id_that_is_not_cached_is_one_line(tmp_path, monkeypatch):
    from core.models import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RagError, match="hub is offline"):
        resolve_model("someone/no-such-model")
    assert resolve_model("minilm")  # aliases and folders are unaffected


# ---------------------------------------------------------------- corpus ids, anchors and text

@pytest.mark.parametrize("row, field, message", [
    ({"id": 1.0, "title": "A", "text": "x"}, "id", "string or an integer"),
    ({"id": None, "title": "A", "text": "x"}, "id", "missing"),
    ({"id": {"a": 1}, "title": "A", "text": "x"}, "id", "an object"),
    ({"id": True, "title": "A", "text": "x"}, "id", "string or an integer"),
    ({"id": "a\u0000b", "title": "A", "text": "x"}, "id", "control character"),
    ({"id": "a", "title": "A", "text": "bad \ud800 text"}, "text", "lone surrogate"),
    ({"id": "a", "title": "A", "text": "x", "anchors": [{"text": "\udc00", "title": "B"}]}, "anchors[0].text",
     "lone surrogate"),
    ({"id": "a", "title": "A", "text": "x", "anchors": [1, 2]}, "anchors[0]", "expected an object"),
    ({"id": "a", "title": "A", "text": "x", "anchors": [{"title": 5}]}, "anchors[0].title", "expected a string"),
    ({"id": "a", "title": "A", "text": "x", "anchors": [{"title": "B", "start": "abc"}]}, "anchors[0].start",
     "non-negative integer"),
    ({"wikipedia_id": "7", "wikipedia_title": "K", "text": ["K", "body"], "anchors": "B"}, "anchors",
     "expected a list"),
])
def test_bad_ids_anchors_and_text_name_file_line_and_field(tmp_path, row, field, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"id": "ok", "title": "OK", "text": "fine"}) + "\n" + json.dumps(row) + "\n",
                    encoding="utf-8")
    for load in (validate_corpus, Corpus.load):
        with pytest.raises(InputError, match=message) as err:
            load(path)
        assert err.value.path == path and err.value.line == 2 and err.value.field == field


def test_good_ids_and_anchors_still_load(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"id": 7, "title": "Seven", "text": "x", "anchors": [{"text": "e", "title": "Eight", "paragraph": 0,
                                                              "start": 0, "end": 1}]},
        {"id": " 8 ", "title": "Eight", "text": "y \ud83d\ude00"},  # a surrogate *pair* is one valid character
    ])
    assert [d.id for d in Corpus.load(path)] == ["7", "8"]
    assert clean_id(12) == "12"


# ---------------------------------------------------------------- task files

@pytest.mark.parametrize("qid, message", [(1.0, "string or an integer"), (None, "missing"),
                                          ("q\u0000", "control character"), ({"x": 1}, "an object")])
def test_query_ids_are_checked(tmp_path, qid, message):
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": qid, "input": "question?"}])
    with pytest.raises(InputError, match=message) as err:
        load_queries(path)
    assert err.value.line == 1 and err.value.field == "id"


def test_queries_that_are_a_folder_or_hold_a_lone_surrogate(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        load_queries(tmp_path)
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "input": "bad \ud800"}])
    with pytest.raises(InputError, match="lone surrogate") as err:
        load_queries(path)
    assert err.value.field == "input"


# ---------------------------------------------------------------- KILT gold and guesses

def _gold(qid="q", pages=("A",), answer=None):
    out = {"provenance": [{"wikipedia_id": p, "title": p} for p in pages]}
    if answer is not None:
        out["answer"] = answer
    return {"id": qid, "input": "question", "output": [out]}


def _guess(qid="q", pages=("A",), answer=None):
    out = {"provenance": [{"wikipedia_id": p, "title": p, "score": 1.0, "text": "t"} for p in pages]}
    if answer is not None:
        out["answer"] = answer
    return {"id": qid, "input": "question", "output": [out]}


def test_empty_gold_is_an_error(tmp_path):
    gold = tmp_path / "gold.jsonl"
    gold.write_text("", encoding="utf-8")
    with pytest.raises(InputError, match="no records"):
        evaluate_kilt([_guess()], gold)


def test_gold_without_usable_provenance_is_an_error_for_retrieval(tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"id": "q", "input": "x", "output": [{"answer": "A"}]}])
    with pytest.raises(InputError, match="no row has provenance with wikipedia_id"):
        evaluate_kilt([_guess()], gold)
    with pytest.raises(InputError, match="no row has provenance with title"):
        evaluate_kilt([_guess()], [{"id": "q", "output": [{"provenance": [{"wikipedia_id": "A"}]}]}],
                      rank_keys="title")


def test_gold_without_provenance_still_scores_answers_with_a_warning(caplog):
    gold = [{"id": "q", "input": "x", "output": [{"answer": "Paris"}]}]
    with caplog.at_level(logging.WARNING, logger="eval.kilt"):
        res = evaluate_kilt([{"id": "q", "output": [{"answer": "Paris"}]}], gold)
    assert res["downstream"]["em"] == 1.0 and "retrieval" not in res and "kilt" not in res
    assert "retrieval and KILT-* metrics are not reported" in caplog.text


def test_partly_usable_gold_warns(caplog):
    gold = [_gold("a"), {"id": "b", "input": "x", "output": [{"answer": "y"}]}]
    with caplog.at_level(logging.WARNING, logger="eval.kilt"):
        res = evaluate_kilt([_guess("a"), _guess("b")], gold, ks=(1,))
    assert res["retrieval"]["Rprec"] == 0.5 and "1 of 2 gold rows" in caplog.text


@pytest.mark.parametrize("provenance, field", [
    ("A", "output[0].provenance"),
    ([1, 2], "output[0].provenance[0]"),
    ([{"wikipedia_id": None}], "output[0].provenance[0].wikipedia_id"),
    ([{"wikipedia_id": 1.0}], "output[0].provenance[0].wikipedia_id"),
    ([{"wikipedia_id": "A\u0000"}], "output[0].provenance[0].wikipedia_id"),
])
@pytest.mark.parametrize("side", ["gold", "guesses"])
def test_bad_provenance_names_file_line_and_field(tmp_path, provenance, field, side):
    bad = {"id": "q", "input": "x", "output": [{"provenance": provenance}]}
    gold = write_jsonl(tmp_path / "gold.jsonl", [_gold("p"), bad if side == "gold" else _gold("q")])
    guess = write_jsonl(tmp_path / "guess.jsonl", [_guess("p"), bad if side == "guesses" else _guess("q")])
    with pytest.raises(InputError) as err:
        evaluate_kilt(guess, gold)
    assert err.value.path == (gold if side == "gold" else guess) and err.value.line == 2 and err.value.field == field


@pytest.mark.parametrize("qid, message", [(None, "missing"), (1.5, "string or an integer"),
                                          ("q\u0000", "control character"), ([1], "a list")])
def test_bad_record_ids_are_refused(qid, message):
    with pytest.raises(InputError, match=message):
        evaluate_kilt([_guess()], [{**_gold(), "id": qid}])


def test_float_and_int_ids_no_longer_silently_differ():
    with pytest.raises(InputError, match="string or an integer"):
        evaluate_kilt([_guess(1.0)], [_gold(1)])
    assert evaluate_kilt([_guess(" 1")], [_gold(1)], ks=(1,))["retrieval"]["Rprec"] == 1.0


def test_swapped_arguments_are_recognised(tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", [_gold("q1", answer="A"), _gold("q2", ("B", "C"), answer="B")])
    guess = write_jsonl(tmp_path / "guess.jsonl", [_guess("q1", ("A", "Z")), _guess("q2", ("C", "Z"))])
    assert evaluate_kilt(guess, gold, ks=(1,))["retrieval"]["Rprec"] == 0.75
    with pytest.raises(RagError, match="the arguments look swapped: rag eval kilt GUESS GOLD"):
        evaluate_kilt(gold, guess)
    with pytest.raises(RagError, match="holds guesses"):
        evaluate_kilt(guess, guess)


# ---------------------------------------------------------------- training

@dataclass
class ToyConfig(TrainConfig):
    hidden: int = 4


def _loop(out, config, nan_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    sampler = EpochSampler(len(x), config.batch_size, config.seed)
    calls = {"n": 0}

    def loss_fn(idx):
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        if nan_at is not None and calls["n"] >= nan_at:
            loss = loss * float("nan")
        return loss, {}

    return TrainLoop(RunFolder(out, config, "toy"), model, config, sampler.indices, loss_fn), model


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    config = ToyConfig(max_steps=10, batch_size=4, lr=1e-2, save_every=2, eval_every=0, log_every=1)
    loop, model = _loop(tmp_path / "run", config, nan_at=5)
    with pytest.raises(RagError, match=r"diverged at step 5: the loss is nan.*checkpoint-4"):
        loop.fit()
    assert not (tmp_path / "run" / "metrics.json").exists()  # not saved as a success
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step made no update
    assert "nan" in (tmp_path / "run" / "curves.csv").read_text()


def test_huge_learning_rate_diverges_with_a_clear_error(tmp_path):
    config = ToyConfig(max_steps=50, batch_size=4, lr=1e30, grad_clip=0.0, save_every=0, eval_every=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    sampler = EpochSampler(len(x), config.batch_size, config.seed)
    loop = TrainLoop(RunFolder(tmp_path / "run", config, "toy"), model, config, sampler.indices,
                     lambda idx: (torch.nn.functional.mse_loss(model(x[idx]), y[idx]), {}))
    with pytest.raises(RagError, match="diverged at step .*no checkpoint had been saved yet"):
        loop.fit()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_log_every_zero_logs_first_and_last_steps_only(tmp_path):
    config = ToyConfig(max_steps=4, batch_size=4, lr=1e-2, save_every=0, eval_every=0, log_every=0)
    loop, _ = _loop(tmp_path / "run", config)
    loop.fit()
    steps = {line.split(",")[0] for line in (tmp_path / "run" / "curves.csv").read_text().splitlines()[1:]}
    assert steps == {"1", "4"}


# ---------------------------------------------------------------- causal readers

def test_a_bert_encoder_is_not_a_causal_reader(tmp_path):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from readers.causal import check_causal_lm, load_causal

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                         vocab_size=50)).save_pretrained(bert)
    with pytest.raises(RagError, match="no causal-LM head"):
        load_causal(str(bert))  # refused before the tokenizer or the weights are loaded
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    check_causal_lm("gpt2", str(gpt2))
    from transformers import BertLMHeadModel
    lm_head = tmp_path / "bert-lm"
    BertLMHeadModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                               vocab_size=50)).save_pretrained(lm_head)
    with pytest.raises(RagError, match="without is_decoder"):
        check_causal_lm("bert-lm", str(lm_head))
