"""The shared training loop: curves, metrics, no-pickle checkpoints, exact resume, config mismatch."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from core.errors import RagError
from core.training import RunFolder, TrainConfig, TrainLoop
from core.training.loop import EpochSampler


@dataclass
class ToyConfig(TrainConfig):
    hidden: int = 8


def make_loop(out, config: ToyConfig, resume: bool = False, overwrite: bool = False):
    torch.manual_seed(123)
    model = torch.nn.Sequential(torch.nn.Linear(4, config.hidden), torch.nn.Tanh(), torch.nn.Linear(config.hidden, 1))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True)
    sampler = EpochSampler(len(x), config.batch_size, config.seed)

    def loss_fn(idx):
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        return loss, {"mse": float(loss.detach())}

    def evaluate():
        return {"dev_mse": float(torch.nn.functional.mse_loss(model(x), y).detach())}

    run = RunFolder(out, config, "toy", resume=resume, overwrite=overwrite)
    return TrainLoop(run, model, config, sampler.indices, loss_fn, evaluate, resume=resume), model


def test_fit_writes_everything(tmp_path):
    config = ToyConfig(max_steps=60, batch_size=8, lr=3e-2, eval_every=20, save_every=20, log_every=5)
    loop, _ = make_loop(tmp_path / "run", config)
    before = loop.evaluate()["dev_mse"]
    metrics = loop.fit()
    run = tmp_path / "run"
    for name in ("config.json", "metrics.json", "curves.csv", "curves-train.png", "curves-dev.png"):
        assert (run / name).exists(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["trainable_params"] == saved["total_params"] == 4 * 8 + 8 + 8 + 1
    assert saved["dev"]["dev_mse"] < 0.5 * before and saved["seconds_per_step"] > 0
    assert (run / "checkpoints" / "checkpoint-60" / "trainable.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-40", "checkpoint-60"]  # keeps the last two
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))
    assert metrics["final_train"]["loss"] == pytest.approx(saved["final_train"]["loss"])


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full_cfg = ToyConfig(max_steps=30, batch_size=8, lr=1e-2, save_every=10, eval_every=0)
    full, full_model = make_loop(tmp_path / "full", full_cfg)
    full.fit()
    part_cfg = ToyConfig(max_steps=30, batch_size=8, lr=1e-2, save_every=10, eval_every=0)
    part, _ = make_loop(tmp_path / "part", part_cfg)
    part.config.max_steps = 30

    original_batch = part.batch_for_step

    def dying(step):
        if step == 15:
            raise KeyboardInterrupt
        return original_batch(step)

    part.batch_for_step = dying
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed, resumed_model = make_loop(tmp_path / "part", part_cfg, resume=True)
    metrics = resumed.fit()
    assert metrics["resumed_from"] == 10
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_same_seed_same_result(tmp_path):
    cfg = ToyConfig(max_steps=10, batch_size=8, lr=1e-2, eval_every=0)
    a, ma = make_loop(tmp_path / "a", cfg)
    a.fit()
    b, mb = make_loop(tmp_path / "b", cfg)
    b.fit()
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(p, q)


def test_resume_with_different_config_names_keys(tmp_path):
    loop, _ = make_loop(tmp_path / "r", ToyConfig(max_steps=5, batch_size=8, eval_every=0))
    loop.fit()
    with pytest.raises(RagError, match="hidden: run has 8, asked 16") as err:
        make_loop(tmp_path / "r", ToyConfig(max_steps=5, batch_size=8, hidden=16), resume=True)
    assert "lr" not in str(err.value)
    with pytest.raises(RagError, match="--resume"):
        make_loop(tmp_path / "r", ToyConfig(max_steps=5))


def test_gradient_accumulation_of_two_half_batches_equals_one_whole_batch(tmp_path):
    """Micro-batches 2s and 2s+1 of 4 examples are step s's 8 examples (EpochSampler), and a mean loss over
    equal halves averages to the whole batch's: the two runs must end on the same weights."""
    @dataclass
    class AccumConfig(ToyConfig):
        gradient_accumulation_steps: int = 1

    whole, m_whole = make_loop(tmp_path / "whole", AccumConfig(max_steps=8, batch_size=8, lr=1e-2, eval_every=0))
    whole.fit()
    halves, m_halves = make_loop(tmp_path / "halves", AccumConfig(max_steps=8, batch_size=4, lr=1e-2, eval_every=0,
                                                                  gradient_accumulation_steps=2))
    halves.fit()
    for a, b in zip(m_whole.parameters(), m_halves.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_resume_compares_options_added_later_with_what_older_runs_did(tmp_path):
    """A run saved before `positives` existed built page-level positives: resuming it with positives="first" is
    the same run, with "provenance" it is refused; mine_workers never blocks a resume (same negatives)."""
    import json

    from core.errors import RagError

    out = tmp_path / "run"
    RunFolder(out, {"max_steps": 2, "lr": 0.1, "mine_workers": 1}, "toy").close()
    cfg = json.loads((out / "config.json").read_text())
    cfg["config"].pop("positives", None)
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RagError, match=r"--resume refused.*positives: run has 'first' \(it predates the option\), asked 'provenance'"):
        RunFolder(out, {"max_steps": 4, "lr": 0.1, "positives": "provenance"}, "toy", resume=True)
    RunFolder(out, {"max_steps": 4, "lr": 0.1, "positives": "first", "mine_workers": 3}, "toy", resume=True).close()
