"""The dense trainer's scale knobs: Ray Train workers, GradCache, bf16, gradient checkpointing, saved folders
that plain sentence-transformers / peft load, and the one-line refusals of bad combinations.

Equivalence is checked on a dropout-free tiny encoder, so two ways of computing one update must give one curve.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import RagError
from rag.cli import main
from retrievers.dense_train import DenseTrainConfig, fit_dense
from retrievers.encoders import load_encoder
from tests.retrievers.dense_fixtures import build_tiny_st, write_toy_data

TEXTS = ["what is the lion known for?", "Tokyo: The tokyo is a famous subject of cities.", "golf"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("toy")
    paths = write_toy_data(folder)
    paths["encoder"] = build_tiny_st(folder / "tiny-st", dropout=0.0)
    return paths


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_HOME", str(tmp_path / "rag-home"))


def config(toy, **kw) -> DenseTrainConfig:
    values = dict(corpus=str(toy["corpus"]), train=str(toy["train"]), dev=None, encoder=str(toy["encoder"]),
                  peft="full", max_steps=6, batch_size=6, lr=1e-3, eval_every=0, save_every=0, log_every=1,
                  eval_docs=0, max_seq_length=48, device="cpu", batch_sampler="random")
    values.update(kw)
    return DenseTrainConfig(**values)


def losses(run: Path) -> list[float]:
    with open(run / "curves.csv") as fh:
        return [float(r["value"]) for r in csv.DictReader(fh) if r["split"] == "train" and r["metric"] == "loss"]


def test_two_ray_workers_train_like_one_worker_of_twice_the_batch_even_after_a_worker_dies(toy, tmp_path,
                                                                                            monkeypatch):
    """MNRL's in-batch negatives are gathered across workers: 2 x 3 examples must be one batch of 6. Worker 1
    dies after step 5 (one Ray run checks both, to keep the suite short); Ray restarts the group, which resumes
    from the step-4 checkpoint and must continue the same curve."""
    from core.training.ray_train import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "1:5")  # inherited by the local Ray that fit_dense starts
    one, _ = fit_dense(config(toy, max_steps=8), tmp_path / "one")
    two, _ = fit_dense(config(toy, max_steps=8, batch_size=3, workers=2, save_every=2), tmp_path / "two")
    assert (tmp_path / "two" / ".fault-injected-1-5").exists()  # it did die once
    assert two["resumed_from"] == 4
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 8 and a[-1] < a[0] - 0.2  # it learns
    np.testing.assert_allclose(b, a, atol=1e-3)  # measured 7e-5 over 20 steps without a failure
    assert two["workers"] == 2 and two["examples_per_step"] == one["examples_per_step"] == 6
    np.testing.assert_allclose(load_encoder(str(tmp_path / "two")).encode_passage(TEXTS),
                               load_encoder(str(tmp_path / "one")).encode_passage(TEXTS), atol=1e-3)
    assert not list((tmp_path / "two").rglob("*.pt")) and not list((tmp_path / "two").rglob("*.pkl"))


def test_gradcache_mini_batches_equal_the_whole_batch(toy, tmp_path):
    fit_dense(config(toy), tmp_path / "plain")
    fit_dense(config(toy, mini_batch_size=2), tmp_path / "cached")
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "plain"), atol=1e-4)
    np.testing.assert_allclose(load_encoder(str(tmp_path / "cached")).encode_passage(TEXTS),
                               load_encoder(str(tmp_path / "plain")).encode_passage(TEXTS), atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "iaa"])
def test_gradient_checkpointing_changes_memory_not_the_result(toy, tmp_path, method):
    fit_dense(config(toy, peft=method, lr=1e-2), tmp_path / "plain")
    metrics, _ = fit_dense(config(toy, peft=method, lr=1e-2, gradient_checkpointing=True), tmp_path / "ckpt")
    assert metrics["gradient_checkpointing"] is True
    np.testing.assert_allclose(losses(tmp_path / "ckpt"), losses(tmp_path / "plain"), atol=1e-5)


def test_bf16_autocast_loss_close_to_fp32(toy, tmp_path):
    fit_dense(config(toy, max_steps=2), tmp_path / "fp32")
    metrics, _ = fit_dense(config(toy, max_steps=2, bf16=True), tmp_path / "bf16")
    assert metrics["precision"] == "bf16"
    assert abs(losses(tmp_path / "bf16")[0] - losses(tmp_path / "fp32")[0]) < 1e-2


def test_gradient_accumulation_counts_examples_per_step(toy, tmp_path):
    metrics, _ = fit_dense(config(toy, batch_size=3, gradient_accumulation_steps=2, max_steps=3), tmp_path / "acc")
    assert metrics["examples_per_step"] == 6 and len(losses(tmp_path / "acc")) == 3


PLAIN_LOAD = """
import json, sys
import numpy as np
from sentence_transformers import SentenceTransformer
run, texts = sys.argv[1], json.loads(sys.argv[2])
out = {"model": SentenceTransformer(run + "/model", device="cpu").encode(texts).tolist()}
if len(sys.argv) > 3:  # the PEFT adapter on the base encoder's transformer
    from peft import PeftModel
    base = SentenceTransformer(sys.argv[3], device="cpu")
    base[0].auto_model = PeftModel.from_pretrained(base[0].auto_model, run + "/adapter")
    out["adapter"] = base.encode(texts).tolist()
print(json.dumps({"toolkit_imported": any(m.split(".")[0] in ("rag", "retrievers", "core") for m in sys.modules),
                  **out}))
"""


@pytest.mark.parametrize("method", ["full", "lora"])
def test_saved_model_loads_in_plain_sentence_transformers(toy, tmp_path, method):
    run = tmp_path / method
    fit_dense(config(toy, peft=method, lr=1e-2, max_steps=4), run)
    assert (run / "model" / "modules.json").is_file() and not (run / "peft").exists()
    toolkit = load_encoder(str(run)).encode_passage(TEXTS)
    base = load_encoder(str(toy["encoder"])).encode_passage(TEXTS)
    assert not np.allclose(toolkit, base, atol=1e-4)  # it did train
    args = [sys.executable, "-c", PLAIN_LOAD, str(run), json.dumps(TEXTS)]
    if method == "lora":
        assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
        args.append(str(toy["encoder"]))
    done = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, check=True,
                          env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"})
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["toolkit_imported"] is False
    for key in ("model", "adapter") if method == "lora" else ("model",):
        np.testing.assert_allclose(np.asarray(got[key]), toolkit, atol=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "--workers"),
    (["--gradient-accumulation-steps", "-1"], "--gradient-accumulation-steps"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 exclude each other"),
    (["--fp16"], "--fp16 needs a CUDA GPU"),
    (["--gpus-per-worker", "1"], "--gpus-per-worker: this machine has no GPU"),
    (["--report-to", "slack"], "--report-to"),
    (["--moe-experts", "3", "--mini-batch-size", "2"], "not available with --moe-experts"),
])
def test_bad_scale_flags_are_one_line_errors_before_any_work(toy, tmp_path, capsys, flags, message):
    try:
        code = main(["train", "retriever", "--kind", "dense", "--corpus", str(toy["corpus"]), "--train",
                     str(toy["train"]), "--encoder", str(toy["encoder"]), "--max-steps", "1", "--out",
                     str(tmp_path / "r"), *flags])
    except SystemExit as exc:  # argparse's range errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "r").exists()


def test_bf16_with_fp16_refused_however_the_config_is_made(toy):
    with pytest.raises(RagError, match="exclude each other"):
        config(toy, bf16=True, fp16=True)


def test_cli_prints_the_untuned_and_the_final_dev_score_and_says_when_worse(toy, tmp_path, capsys):
    from core.training.hf import report_change

    assert main(["train", "retriever", "--kind", "dense", "--corpus", str(toy["corpus"]), "--train", str(toy["train"]),
                 "--dev", str(toy["dev"]), "--encoder", str(toy["encoder"]), "--max-steps", "2", "--eval-docs", "0",
                 "--max-seq-length", "48", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr()
    assert "at step 0 (untuned) ->" in out.err and "dev Rprec" in out.err
    summary = json.loads(out.out[out.out.index("{"):])
    assert summary["dev_step0"].keys() == summary["dev"].keys()
    lines: list[str] = []
    report_change({"Rprec": 0.75}, {"Rprec": 0.667}, "Rprec", lines.append)
    assert "0.7500 at step 0 (untuned) -> 0.6670 at the end (-0.0830)" in lines[0] and "WORSE" in lines[0]
    report_change({"Rprec": 0.5}, {"Rprec": 0.6}, "Rprec", lines.append)
    assert "WORSE" not in lines[1]


def test_report_to_tensorboard_writes_event_files_into_the_run_folder(toy, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit_dense(config(toy, max_steps=3, report_to="tensorboard"), tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_moe_heads_on_two_ray_workers_follow_one_worker_accumulating_two_batches(toy, tmp_path):
    """Each worker takes its own domain-homogeneous micro-batch and DDP averages the gradients: the curve of one
    worker accumulating the same two micro-batches."""
    fit_dense(config(toy, moe_experts=3, max_steps=4, lr=5e-2, gradient_accumulation_steps=2), tmp_path / "one")
    two, model = fit_dense(config(toy, moe_experts=3, max_steps=4, lr=5e-2, workers=2), tmp_path / "two")
    assert two["workers"] == 2 and (tmp_path / "two" / "moe.safetensors").exists()
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), atol=1e-4)
    domains = ["Animals", "Cities", None]
    one_model = load_encoder(str(tmp_path / "one"))
    np.testing.assert_allclose(model.encode(TEXTS, domains=domains),
                               one_model.model.encode(TEXTS, domains=domains), atol=1e-4)
