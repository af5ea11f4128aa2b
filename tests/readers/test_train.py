"""`rag train reader` and `rag answer` end to end on a BM25 index and tiny saved models; the CIT experiment."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rag.cli import main
from tests.conftest import SMALL_QUERIES, write_jsonl
from tests.readers.conftest import build_causal, build_seq2seq

TRAIN = SMALL_QUERIES + [
    {"id": "q4", "input": "Which city is the capital of Germany?", "output": [{"answer": "Berlin",
     "provenance": [{"wikipedia_id": "d2", "title": "Berlin"}]}]},
    {"id": "q5", "input": "What do plants convert light into?", "output": [{"answer": "chemical energy",
     "provenance": [{"wikipedia_id": "d6", "title": "Photosynthesis"}]}]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bert_tokenizer):
    from retrievers.bm25 import build_bm25_index
    from tests.conftest import SMALL_DOCS
    root = tmp_path_factory.mktemp("reader")
    corpus = write_jsonl(root / "corpus" / "corpus.jsonl", SMALL_DOCS)
    build_bm25_index(corpus, root / "bm25")
    write_jsonl(root / "data" / "train.jsonl", TRAIN)
    write_jsonl(root / "data" / "dev.jsonl", SMALL_QUERIES)
    models = {}
    for kind, build, arch in (("fid", build_seq2seq, "t5"), ("causal", build_causal, "gpt2")):
        folder = root / f"tiny-{arch}"
        build(arch, bert_tokenizer).save_pretrained(folder)
        bert_tokenizer.save_pretrained(folder)
        models[kind] = str(folder)
    return root, models


def train_args(root, model, kind, out, *extra):
    return ["train", "reader", "--kind", kind, "--model", model, "--index", str(root / "bm25"),
            "--train", str(root / "data" / "train.jsonl"), "--dev", str(root / "data" / "dev.jsonl"),
            "--k", "2", "--max-steps", "4", "--batch-size", "2", "--lr", "1e-3", "--eval-every", "2",
            "--save-every", "2", "--max-passage-tokens", "32", "--max-answer-tokens", "6",
            "--out", str(out), *extra]


@pytest.mark.parametrize("kind", ["fid", "causal"])
def test_train_writes_run_folder_and_answer_reads_it(setup, tmp_path, kind):
    root, models = setup
    out = tmp_path / "run"
    proxy = ["--cit-proxy", "passage"] if kind == "causal" else []  # these passages have few salient spans
    assert main(train_args(root, models[kind], kind, out, "--cit-weight", "1.0", "--cit-margin", "0.1", *proxy)) == 0
    for name in ("config.json", "metrics.json", "curves.csv", "curves-train.png", "curves-dev.png",
                 "cit_reference.json", "retrieval/train.jsonl", "retrieval/dev.jsonl", "reader/reader.json",
                 "reader/model.safetensors", "dev_predictions.jsonl"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_fraction"] == 1.0 and metrics["seconds_per_step"] > 0 and metrics["peak_rss_mb"] > 0
    assert {"em", "f1", "KILT-em", "KILT-f1"} <= metrics["dev"].keys()
    curves = (out / "curves.csv").read_text()
    for metric in ("nll_theta", "nll_ref", "nll_ratio", "loss_qa", "loss_cit"):
        assert sum(1 for line in curves.splitlines() if f",train,{metric}," in line) == 4  # every step
    guesses = tmp_path / "guesses.jsonl"
    assert main(["answer", "--index", str(root / "bm25"), "--model", str(out), "--queries",
                 str(root / "data" / "dev.jsonl"), "--k", "2", "--out", str(guesses)]) == 0
    rows = [json.loads(line) for line in guesses.read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["output"][0]["answer"], str) for r in rows)
    assert len(rows[0]["output"][0]["provenance"]) == 2
    assert main(["eval", "kilt", str(guesses), str(root / "data" / "dev.jsonl"), "--ks", "1,2"]) == 0


def test_lambda_zero_writes_no_cit_and_references_need_no_copy(setup, tmp_path, monkeypatch):
    from readers import cit

    root, models = setup
    plain = tmp_path / "plain"
    monkeypatch.setattr(cit.ReferenceNLL, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ℓ0")))
    assert main(train_args(root, models["causal"], "causal", plain)) == 0
    monkeypatch.undo()
    assert not (plain / "cit_reference.json").exists()
    curves = (plain / "curves.csv").read_text()
    assert ",train,loss_qa," in curves and ",train,loss_cit," not in curves and ",train,cit_active," not in curves
    assert "cit_reference" not in json.loads((plain / "metrics.json").read_text())
    # full tuning: ℓ0 of every training passage precomputed once; LoRA: scored with the adapters off, no copy
    full, lora = tmp_path / "full", tmp_path / "lora"
    assert main(train_args(root, models["causal"], "causal", full, "--cit-weight", "1")) == 0
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["cit_reference"] == "precomputed" and metrics["cit_proxy"] == "span"
    assert metrics["cit_reference_scored"] == metrics["cit_reference_passages"] > 0
    assert main(train_args(root, models["causal"], "causal", lora, "--cit-weight", "1", "--peft", "lora",
                           "--peft-targets", "all-linear")) == 0
    metrics = json.loads((lora / "metrics.json").read_text())
    assert metrics["cit_reference"] == "adapters-off" and 0 < metrics["trainable_fraction"] < 1
    peft_cfg = json.loads((lora / "reader" / "peft" / "peft_config.json").read_text())
    assert set(peft_cfg["config"]["target_modules"]) == {"c_attn", "c_proj", "c_fc"}


def test_bad_cit_flags_are_refused_before_any_work(setup, tmp_path, capsys):
    root, models = setup
    for extra, message in ((["--cit-weight", "-1"], "cit-weight"), (["--cit-margin", "abc"], "cit-margin"),
                           (["--cit-margin-relative", "1.5"], "cit-margin-relative"),
                           (["--cit-proxy", "span"], "the fid reader implements passage")):
        out = tmp_path / "bad"
        kind = "fid" if "span" in extra else "causal"
        try:
            rc = main(train_args(root, models[kind], kind, out, *extra))
        except SystemExit as exc:  # argparse's own error for a flag's range
            rc = exc.code
        assert rc == 2
        err = capsys.readouterr().err
        assert message in err and not out.exists(), err


def test_same_seed_same_result_and_exact_resume(setup, tmp_path):
    root, models = setup
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out in (a, b):
        assert main(train_args(root, models["fid"], "fid", out, "--cit-weight", "1.0")) == 0
    wa, wb = load_file(str(a / "reader" / "model.safetensors")), load_file(str(b / "reader" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # an interrupted run resumed from its step-2 checkpoint ends where the uninterrupted one did
    assert main(train_args(root, models["fid"], "fid", c, "--cit-weight", "1.0")) == 0
    import shutil
    shutil.rmtree(c / "checkpoints" / "checkpoint-4")
    assert main(train_args(root, models["fid"], "fid", c, "--cit-weight", "1.0", "--resume")) == 0
    assert json.loads((c / "metrics.json").read_text())["resumed_from"] == 2
    wc = load_file(str(c / "reader" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wc[k], wa[k], rtol=0, atol=1e-6)


def test_peft_saves_only_trained_parts(setup, tmp_path):
    root, models = setup
    out = tmp_path / "lora"
    assert main(train_args(root, models["fid"], "fid", out, "--peft", "lora")) == 0
    assert not (out / "reader" / "model.safetensors").exists()
    assert (out / "reader" / "peft" / "peft_weights.safetensors").exists()
    meta = json.loads((out / "reader" / "reader.json").read_text())
    assert meta["peft"] == "lora" and meta["base_model"] == models["fid"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["trainable_fraction"] < 1
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 1e-3
    from readers.base import load_reader
    reader = load_reader(None, str(out))
    assert len(reader.answer(["q"], [[]])) == 1


def test_cit_experiment_small(setup, tmp_path):
    root, models = setup
    out = tmp_path / "exp"
    assert main(["experiment", "cit", "--small", "--corpus", str(root / "corpus"), "--data", str(root / "data"),
                 "--index", str(root / "bm25"), "--model", models["fid"], "--weights", "0,5",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["readers"]) == {"before training", "lambda=0", "lambda=5"}
    row = results["readers"]["lambda=5"]
    assert row["dev (vital10k)"]["n"] == 3 and "memorisation" in row["dev counterfactual"]
    assert (out / "report.md").exists() and (out / "counterfactual" / "corpus.jsonl").exists()


def test_cit_experiment_cloze_topic_split(setup, tmp_path):
    """--train-on cloze-topics: trains on cloze questions of the train topics only; held-out topics stay unseen."""
    from eval.transforms import occurs
    from retrievers.bm25 import build_bm25_index
    _, models = setup
    docs = [{"id": f"{topic[:3]}{i}", "title": f"{topic} item {i}", "domain": topic,
             "text": f"The {topic.lower()} item number {i} was founded by the council in {1700 + 13 * i + len(topic)} "
                     f"after a long public debate."}
            for topic in ("Arts", "Geography", "Science") for i in range(5)]
    corpus = write_jsonl(tmp_path / "corpus" / "corpus.jsonl", docs)
    build_bm25_index(corpus, tmp_path / "bm25")
    out = tmp_path / "exp"
    assert main(["experiment", "cit", "--small", "--train-on", "cloze-topics", "--heldout-topics", "Science",
                 "--corpus", str(tmp_path / "corpus"), "--data", str(tmp_path), "--index", str(tmp_path / "bm25"),
                 "--model", models["fid"], "--weights", "0,1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["topics"] == {"train": ["Arts", "Geography"], "heldout": ["Science"]}
    train_q = [json.loads(line) for line in (out / "questions" / "cloze_train.jsonl").read_text().splitlines()]
    held_q = [json.loads(line) for line in (out / "questions" / "cloze_heldout.jsonl").read_text().splitlines()]
    assert len(train_q) == 6 and {q["meta"]["domain"] for q in train_q} <= {"Arts", "Geography"}
    assert held_q and {q["meta"]["domain"] for q in held_q} == {"Science"}
    row = results["readers"]["lambda=1"]
    assert row["seen cloze (train topics)"]["n"] == 4 and "memorisation" in row["seen cloze counterfactual"]
    assert row["held-out topics counterfactual"]["n"] == len(held_q)
    # the counterfactual corpus carries the new answers where the old ones were
    cf = {json.loads(line)["id"]: json.loads(line)["text"]
          for line in (out / "counterfactual" / "corpus.jsonl").read_text().splitlines()}
    seen_cf = [json.loads(line) for line in
               (out / "counterfactual" / "seen_cloze_counterfactual.jsonl").read_text().splitlines()]
    for q in seen_cf:
        doc = q["output"][0]["provenance"][0]["wikipedia_id"]
        assert occurs(q["meta"]["counterfactual"]["new_answer"], cf[doc])
        assert not occurs(q["meta"]["counterfactual"]["old_answer"], cf[doc])


def test_cit_experiment_rejects_unknown_topic(setup, tmp_path, capsys):
    root, models = setup
    assert main(["experiment", "cit", "--small", "--train-on", "cloze-topics", "--heldout-topics", "Nowhere",
              "--corpus", str(root / "corpus"), "--data", str(root / "data"), "--index", str(root / "bm25"),
              "--model", models["fid"], "--out", str(tmp_path / "x")]) == 2
    assert "unknown topics ['Nowhere']" in capsys.readouterr().err


def test_retrieval_cache_is_keyed_by_the_index_content(setup, tmp_path, caplog):
    import shutil

    from readers.train import retrieve_cached
    from retrievers.bm25 import build_bm25_index
    from tests.conftest import SMALL_DOCS

    root, _ = setup
    index = tmp_path / "bm25"
    shutil.copytree(root / "bm25", index)
    queries = root / "data" / "train.jsonl"
    first, _ = retrieve_cached(tmp_path / "cache", "train", queries, index, 2)
    manifest = (tmp_path / "cache" / "train.manifest.json").read_text()
    retrieve_cached(tmp_path / "cache", "train", queries, index, 2)  # same index: served from the cache
    assert (tmp_path / "cache" / "train.manifest.json").read_text() == manifest and not caplog.records
    # rebuilt in place from a corpus missing the top document: same path, new manifest -> retrieved again
    top = first[0].passages[0].doc_id
    smaller = write_jsonl(tmp_path / "c2" / "corpus.jsonl", [d for d in SMALL_DOCS if d["id"] != top])
    build_bm25_index(smaller, index, overwrite=True)
    again, _ = retrieve_cached(tmp_path / "cache", "train", queries, index, 2)
    assert "stale" in caplog.text
    assert top not in {p.doc_id for p in again[0].passages}


@pytest.mark.slow
def test_cit_smoke_schema_on_a_tiny_causal_reader(setup, tmp_path):
    """`rag experiment cit --smoke` (here with --small sizes and a tiny GPT-2): results.json's `arms`, the penalty
    active on some steps of the λ = 10 arm, a BM25 index built when --index is not given."""
    _, models = setup
    docs = [{"id": f"{topic[:3]}{i}", "title": f"{topic} item {i}", "domain": topic,
             "text": f"The {topic.lower()} item number {i} was founded by the council in {1700 + 13 * i + len(topic)} "
                     f"after a long public debate with {100 + i} members."}
            for topic in ("Arts", "Geography", "Science") for i in range(5)]
    write_jsonl(tmp_path / "corpus" / "corpus.jsonl", docs)
    out = tmp_path / "smoke"
    assert main(["experiment", "cit", "--smoke", "--small", "--heldout-topics", "Science", "--epochs", "2",
                 "--corpus", str(tmp_path / "corpus"), "--model", models["causal"], "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "index" / "manifest.json").exists()
    arms = results["arms"]
    assert [a["name"] for a in arms] == ["lambda=0", "lambda=10"] and [a["cit_weight"] for a in arms] == [0.0, 10.0]
    for arm in arms:
        assert arm["seeds"] == [0] and arm["n"] == 4
        assert {"em_seen", "em_seen_cf", "memorisation_seen_cf", "em_heldout"} <= arm["metrics"].keys()
        for key in ("em_seen", "em_heldout"):
            m = arm["metrics"][key]
            assert 0 <= m["mean"] <= 1 and len(m["ci95"]) == 2 and m["n"] > 0
        assert {"span_nll_ratio", "passage_nll_ratio"} <= arm["metrics"].keys()
    assert arms[0]["cit_active_fraction"] == 0.0 and 0 <= arms[1]["cit_active_fraction"] <= 1
    assert arms[0]["steps"] == arms[1]["steps"] == 6  # 2 epochs x 3 batches of 2; λ = 10 logged L_CIT every step
    diff = arms[1]["vs_first_arm"]["em_seen"]
    assert diff["n"] == 4 and diff["ci95"][0] <= diff["diff"] <= diff["ci95"][1]
    assert not (out / "runs" / "lambda-0" / "seed-0" / "cit_reference.json").exists()
    assert json.loads((out / "runs" / "lambda-10" / "seed-0" / "metrics.json").read_text())["cit_reference"] \
        == "adapters-off"
    assert "penalty active" in (out / "report.md").read_text()


PLAIN_READER_LOAD = """
import json, sys
import torch
import transformers
kind, folder, base = sys.argv[1], sys.argv[2], sys.argv[3]
auto = transformers.AutoModelForSeq2SeqLM if kind == "fid" else transformers.AutoModelForCausalLM
if base == "-":
    model = auto.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
else:  # PEFT's adapter on the base model
    from peft import PeftModel
    model = PeftModel.from_pretrained(auto.from_pretrained(base), folder + "/adapter")
    tok = transformers.AutoTokenizer.from_pretrained(base)
model.eval()
batch = tok(["question: where is the eiffel tower? context: Paris"], return_tensors="pt")
extra = {"decoder_input_ids": torch.tensor([[model.config.decoder_start_token_id or 0, 5, 6]])} if kind == "fid" else {}
with torch.no_grad():
    logits = model(**batch, **extra).logits
print(json.dumps({"toolkit_imported": any(m.split(".")[0] in ("rag", "readers", "retrievers", "core")
                                          for m in sys.modules), "logits": logits[0, -1, :50].tolist()}))
"""


@pytest.mark.parametrize("kind, method", [("causal", "full"), ("fid", "full"), ("causal", "lora")])
def test_saved_reader_loads_in_plain_transformers_and_peft(setup, tmp_path, kind, method):
    """A tuned reader is a transformers folder (full) or carries PEFT's adapter (lora): no toolkit needed."""
    import os
    import subprocess
    import sys

    from readers.base import load_reader

    root, models = setup
    out = tmp_path / f"{kind}-{method}"
    targets = ["--peft-targets", "all-linear"] if method == "lora" else []  # GPT-2 has no q/v projections
    assert main(train_args(root, models[kind], kind, out, "--peft", method, *targets)) == 0
    folder = out / "reader"
    if method == "full":
        assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    else:
        assert (folder / "adapter" / "adapter_config.json").exists()
    reader = load_reader(None, str(out), device="cpu")
    tok = reader.tokenizer
    batch = tok(["question: where is the eiffel tower? context: Paris"], return_tensors="pt")
    extra = {}
    if kind == "fid":
        extra = {"decoder_input_ids": torch.tensor([[reader.model.config.decoder_start_token_id or 0, 5, 6]])}
    with torch.no_grad():
        mine = reader.model(**batch, **extra).logits[0, -1, :50]
    done = subprocess.run([sys.executable, "-c", PLAIN_READER_LOAD, kind, str(folder),
                           "-" if method == "full" else models[kind]], capture_output=True, text=True, check=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"})
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["toolkit_imported"] is False
    torch.testing.assert_close(torch.tensor(got["logits"]), mine, rtol=0, atol=1e-5)


def test_readers_answer_in_bfloat16_only_on_a_gpu_that_has_it(monkeypatch):
    from readers.base import inference_dtype

    assert inference_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # before Ampere
    assert inference_dtype(torch.device("cuda")) == torch.float32


def test_reader_with_cit_on_two_ray_workers_follows_one_worker_accumulating_two_batches(setup, tmp_path,
                                                                                         bert_tokenizer):
    """`--workers 2`: each worker its own micro-batch (CIT penalty included), gradients all-reduced; the curve
    of one worker accumulating the same two micro-batches (dropout off). Worker 0 alone writes the run."""
    import csv

    from transformers import T5ForConditionalGeneration

    root, models = setup
    model = T5ForConditionalGeneration.from_pretrained(models["fid"])
    model.config.dropout_rate = 0.0
    plain = tmp_path / "t5-no-dropout"
    model.save_pretrained(plain)
    bert_tokenizer.save_pretrained(plain)

    def losses(run):
        with open(run / "curves.csv") as fh:
            return [float(r["value"]) for r in csv.DictReader(fh) if r["split"] == "train" and r["metric"] == "loss"]

    extra = ["--cit-weight", "1.0", "--eval-every", "0", "--save-every", "0", "--log-every", "1"]
    assert main(train_args(root, str(plain), "fid", tmp_path / "one", *extra,
                           "--gradient-accumulation-steps", "2")) == 0
    assert main(train_args(root, str(plain), "fid", tmp_path / "two", *extra, "--workers", "2")) == 0
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["workers"] == 2 and len(losses(tmp_path / "two")) == 4
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")),
                               rtol=0, atol=1e-4)
    assert (tmp_path / "two" / "reader" / "config.json").exists()
