"""A user's mistake is one `rag: error:` line (exit 2), or argparse's own `error:` line for a flag out of range,
found before any work: no traceback, nothing written at --out."""
from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import torch

from rag.cli import main
from tests.conftest import SMALL_DOCS, SMALL_QUERIES, write_jsonl


def one_error_line(capsys) -> str:
    """The one `rag: error:` line of stderr (progress bars before it aside), with no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert lines and lines[-1].startswith("rag: error: ") and err.count("rag: error") == 1, err
    assert "Traceback" not in err, err
    return lines[-1]


def parser_error(capsys, argv: list[str]) -> str:
    """argparse's own error: exit status 2 and a last stderr line `<prog>: error: ...`."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert re.match(r"^rag\b.*: error: ", last), err
    return last


def build(corpus, out, *extra) -> list[str]:
    return ["index", "build", "--corpus", str(corpus), "--out", str(out), *extra]


@pytest.fixture
def bm25(small_corpus, tmp_path):
    out = tmp_path / "bm25"
    assert main(build(small_corpus, out, "--kind", "bm25")) == 0
    return out


# ---------------------------------------------------------------- input files

def test_lone_surrogate_in_corpus_text_is_refused_at_validation(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "title": "A", "text": "ok"}\n{"id": "b", "title": "B", "text": "x \\ud800 y"}\n',
                      encoding="utf-8")
    for kind in ("bm25", "dense"):
        out = tmp_path / kind
        assert main(build(corpus, out, "--kind", kind)) == 2
        line = one_error_line(capsys)
        assert str(corpus) in line and "line 2" in line and "'text'" in line and "surrogate" in line
        assert not out.exists()


def test_deeply_nested_json_is_one_line(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "title": "A", "text": "x", "anchors": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
                      encoding="utf-8")
    out = tmp_path / "idx"
    assert main(build(corpus, out, "--kind", "bm25")) == 2
    assert "nested too deeply" in one_error_line(capsys)
    assert not out.exists()


def test_unreadable_file_is_one_line_naming_it(small_corpus, tmp_path, capsys, monkeypatch):
    import rag.commands.index as index_cmd

    def denied(corpus, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(corpus))

    monkeypatch.setattr(index_cmd, "build_index", lambda kind, corpus, *a, **k: denied(corpus))
    assert main(build(small_corpus, tmp_path / "idx", "--kind", "bm25")) == 2
    line = one_error_line(capsys)
    assert str(small_corpus) in line and "Permission denied" in line


@pytest.mark.parametrize("exc, expected", [
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/x"), "/data/x: Is a directory"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/f/out"), "/data/f/out: Not a directory"),
    (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), "invalid Unicode"),
    (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
])
def test_os_unicode_and_recursion_errors_are_one_line(small_corpus, tmp_path, capsys, monkeypatch, exc, expected):
    import rag.commands.index as index_cmd

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(index_cmd, "build_index", fail)
    assert main(build(small_corpus, tmp_path / "idx", "--kind", "bm25")) == 2
    assert expected in one_error_line(capsys)
    with pytest.raises(type(exc)):  # -v: the full traceback
        main(["-v", *build(small_corpus, tmp_path / "idx", "--kind", "bm25")])


def test_ctrl_c_is_exit_130_without_traceback(small_corpus, tmp_path, capsys, monkeypatch):
    import rag.commands.index as index_cmd

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(index_cmd, "build_index", interrupt)
    assert main(build(small_corpus, tmp_path / "idx", "--kind", "bm25")) == 130
    assert one_error_line(capsys) == "rag: error: interrupted"


def test_queries_that_are_a_folder(bm25, tmp_path, capsys):
    (tmp_path / "qdir").mkdir()
    out = tmp_path / "guesses.jsonl"
    assert main(["retrieve", "--index", str(bm25), "--queries", str(tmp_path / "qdir"), "--out", str(out)]) == 2
    assert "is a folder" in one_error_line(capsys)
    assert not out.exists()


def test_out_that_is_a_folder_or_a_file_where_a_folder_belongs(bm25, small_corpus, small_queries, tmp_path, capsys):
    out_dir = tmp_path / "outdir"
    out_dir.mkdir()
    assert main(["retrieve", "--index", str(bm25), "--queries", str(small_queries), "--out", str(out_dir)]) == 2
    assert str(out_dir) in one_error_line(capsys)
    assert not any(out_dir.iterdir())
    a_file = tmp_path / "a-file"
    a_file.write_text("mine\n", encoding="utf-8")
    assert main(build(small_corpus, a_file, "--kind", "bm25")) == 2
    one_error_line(capsys)
    assert a_file.read_text(encoding="utf-8") == "mine\n"
    assert main(build(small_corpus, a_file / "idx", "--kind", "bm25")) == 2
    one_error_line(capsys)


def test_missing_config_file(small_corpus, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(build(small_corpus, out, "--kind", "bm25", "--config", str(tmp_path / "nope.yaml"))) == 2
    line = one_error_line(capsys)
    assert "nope.yaml" in line and "not found" in line
    assert not out.exists()


# ---------------------------------------------------------------- flags out of range

@pytest.mark.parametrize("kind, flags, message", [
    ("bm25", ["--words-per-passage", "0"], "--words-per-passage: must be at least 1"),
    ("bm25", ["--stride", "0"], "--stride: must be at least 1"),
    ("bm25", ["--stride", "-3"], "--stride: must be at least 1"),
    ("bm25", ["--b", "1.5"], "--b: must be at most 1"),
    ("bm25", ["--k1", "nan"], "--k1: must be a finite number"),
    ("dense", ["--shard-size", "0"], "--shard-size: must be at least 1"),
    ("dense", ["--batch-size", "0"], "--batch-size: must be at least 1"),
    ("dense", ["--nprobe", "0"], "--nprobe: must be at least 1"),
    ("dense", ["--words-per-passage", "abc"], "invalid int value"),
    ("dense", ["--gpus-per-worker", "-1", "--ray"], "--gpus-per-worker: must be at least 0"),
])
def test_index_flags_out_of_range_are_argparse_errors(small_corpus, tmp_path, capsys, kind, flags, message):
    out = tmp_path / "idx"
    assert message in parser_error(capsys, build(small_corpus, out, "--kind", kind, *flags))
    assert not out.exists()


def test_stride_longer_than_the_passage_is_refused_before_work(small_corpus, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(build(small_corpus, out, "--kind", "bm25", "--words-per-passage", "50")) == 2
    assert "--stride" in one_error_line(capsys)  # the default stride 80 no longer fits
    assert main(build(small_corpus, out, "--kind", "dense", "--words-per-passage", "50", "--stride", "60")) == 2
    assert "at most --words-per-passage = 50" in one_error_line(capsys)
    assert not out.exists()


def test_config_file_values_meet_the_flag_rules(small_corpus, tmp_path, capsys):
    config = tmp_path / "dense.yaml"
    for text, flag in (("shard_size: 0\n", "--shard-size"), ("batch_size: -2\n", "--batch-size"),
                       ("batch_size: many\n", "--batch-size")):
        config.write_text(text, encoding="utf-8")
        out = tmp_path / "idx"
        assert main(build(small_corpus, out, "--kind", "dense", "--config", str(config))) == 2
        assert flag in one_error_line(capsys)
        assert not out.exists()


def test_missing_gpu_is_refused_before_any_model_loads(small_corpus, tmp_path, capsys):
    out = tmp_path / "idx"
    missing = f"cuda:{torch.cuda.device_count()}"
    assert main(build(small_corpus, out, "--kind", "dense", "--device", missing)) == 2
    assert f"device {missing}" in one_error_line(capsys)
    assert not out.exists()


def test_offline_hub_id_is_one_line(small_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "idx"
    assert main(build(small_corpus, out, "--kind", "dense", "--encoder", "someone/no-such-model")) == 2
    assert "hub is offline" in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("ks", ["abc", "1,x", "0,5", ""])
def test_bad_ks(small_queries, capsys, ks):
    assert "--ks" in parser_error(capsys, ["eval", "kilt", str(small_queries), str(small_queries), "--ks", ks])


# ---------------------------------------------------------------- KILT evaluation

def guesses_of(bm25, queries, tmp_path) -> Path:
    out = tmp_path / "guesses.jsonl"
    assert main(["retrieve", "--index", str(bm25), "--queries", str(queries), "--k", "3", "--out", str(out)]) == 0
    return out


def test_swapped_kilt_arguments_are_named(bm25, small_queries, tmp_path, capsys):
    guesses = guesses_of(bm25, small_queries, tmp_path)
    capsys.readouterr()
    assert main(["eval", "kilt", str(small_queries), str(guesses)]) == 2
    assert "the arguments look swapped: rag eval kilt GUESS GOLD" in one_error_line(capsys)
    assert main(["eval", "kilt", str(guesses), str(small_queries), "--json"]) == 0


@pytest.mark.parametrize("rows, message", [
    ([], "no records"),
    ([{"id": "q1", "input": "x", "output": [{"answer": "Paris"}]}], "no row has provenance"),
    ([{"id": "q1", "input": "x", "output": [{"answer": "Paris", "provenance": "d1"}]}], "output[0].provenance"),
    ([{"id": "q1", "input": "x", "output": [{"provenance": [3, 4]}]}], "output[0].provenance[0]"),
    ([{"id": None, "input": "x", "output": [{"provenance": [{"wikipedia_id": "d1"}]}]}], "field 'id'"),
    ([{"id": 1.0, "input": "x", "output": [{"provenance": [{"wikipedia_id": "d1"}]}]}], "string or an integer"),
    ([{"id": "q\u00001", "input": "x", "output": [{"provenance": [{"wikipedia_id": "d1"}]}]}], "control character"),
    ([{"id": "q1", "input": "x", "output": [{"provenance": [{"wikipedia_id": {"a": 1}}]}]}], "wikipedia_id"),
])
def test_bad_gold_files(bm25, small_queries, tmp_path, capsys, rows, message):
    guesses = guesses_of(bm25, small_queries, tmp_path)
    gold = write_jsonl(tmp_path / "gold.jsonl", rows)
    capsys.readouterr()
    assert main(["eval", "kilt", str(guesses), str(gold)]) == 2
    line = one_error_line(capsys)
    assert message in line and str(gold) in line


# ---------------------------------------------------------------- training

@pytest.fixture
def train_files(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", SMALL_DOCS), write_jsonl(tmp_path / "train.jsonl", SMALL_QUERIES)


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "-5"], "--max-steps: must be at least 1"),
    (["--max-steps", "0"], "--max-steps: must be at least 1"),
    (["--lr", "-0.01"], "--lr: must be greater than 0"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--warmup-steps", "-1"], "--warmup-steps: must be at least 0"),
    (["--grad-clip", "-1"], "--grad-clip: must be at least 0"),
    (["--log-every", "-1"], "--log-every: must be at least 0"),
    (["--scale", "0"], "--scale: must be greater than 0"),
])
def test_trainer_flags_are_checked_before_the_run_folder_exists(train_files, tmp_path, capsys, flags, message):
    corpus, train = train_files
    out = tmp_path / "run"
    argv = ["train", "retriever", "--kind", "dense", "--corpus", str(corpus), "--train", str(train),
            "--out", str(out), *flags]
    assert message in parser_error(capsys, argv)
    assert not out.exists()


def test_trainer_config_file_and_device_are_checked_before_the_run_folder_exists(train_files, tmp_path, capsys):
    corpus, train = train_files
    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text("lr: -0.01\n", encoding="utf-8")
    base = ["train", "reader", "--kind", "fid", "--index", str(tmp_path), "--train", str(train), "--out", str(out)]
    assert main([*base, "--config", str(config)]) == 2
    assert "--lr" in one_error_line(capsys)
    config.write_text("k: 0\n", encoding="utf-8")
    assert main([*base, "--config", str(config)]) == 2
    assert "--k " in one_error_line(capsys)
    assert main([*base, "--peft", "qlora", "--lr", "1e-3"]) == 2
    assert "unknown PEFT method" in one_error_line(capsys)
    assert main([*base, "--device", f"cuda:{torch.cuda.device_count()}"]) == 2
    assert "device cuda:" in one_error_line(capsys)
    assert not out.exists()


def test_causal_reader_from_a_bert_encoder_is_refused(bm25, small_queries, tmp_path, capsys):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from core.models import _minilm_path

    tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
    folder = tmp_path / "tiny-bert"
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                         vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    assert main(["train", "reader", "--kind", "causal", "--model", str(folder), "--index", str(bm25),
                 "--train", str(small_queries), "--k", "2", "--max-steps", "2", "--batch-size", "2",
                 "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "tiny-bert" in line and "no causal-LM head" in line
    assert not (out / "metrics.json").exists()


def test_diverging_training_is_an_error_not_a_success(train_files, tmp_path, capsys, monkeypatch):
    """`--lr 1e6`-style divergence, made certain: the loss turns nan at step 2."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    real_forward = MultipleNegativesRankingLoss.forward
    calls = {"n": 0}

    def nan_from_step_2(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_forward(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(MultipleNegativesRankingLoss, "forward", nan_from_step_2)
    corpus, train = train_files
    out = tmp_path / "run"
    assert main(["train", "retriever", "--kind", "dense", "--corpus", str(corpus), "--train", str(train),
                 "--hard-negatives", "none", "--max-steps", "3", "--batch-size", "2", "--eval-every", "0",
                 "--log-every", "1", "--out", str(out)]) == 2
    assert "diverged at step 2" in one_error_line(capsys)
    assert not (out / "metrics.json").exists()
    assert json.loads((out / "config.json").read_text())["config"]["max_steps"] == 3
