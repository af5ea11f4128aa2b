"""`make gpu-check` (rag/gpu_check.py) on a machine without a GPU: the fail-fast exit, the step runner and
report with fake steps, the subprocess runner, and that every planned command line parses (issue 13)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rag import gpu_check as gc
from rag.gpu_check import CommandResult, Step, StepFailed, WrongResult

ROOT = Path(__file__).resolve().parents[2]


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(_has_cuda(), reason="a CUDA GPU is visible: the real check would run")
def test_without_a_gpu_it_stops_at_once_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rag.gpu_check", "--out", str(tmp_path / "r" / "report.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [gc.NO_GPU]
    assert proc.stdout == ""
    assert seconds < 30
    assert list(tmp_path.iterdir()) == []  # no report, no work folder


def fake_runner(outcomes: dict[str, tuple[int, str]]):
    """A Runner answering each command (by its first word after 'rag') with a fixed exit code and error line."""
    calls: list[tuple[str, ...]] = []

    def run(argv, name, timeout):
        calls.append(argv)
        rc, error = outcomes.get(argv[1], (0, ""))
        return CommandResult(argv, rc, 0.5, stdout='{"final_loss": 1.0}', error_line=error, log=f"logs/{name}")
    run.calls = calls  # type: ignore[attr-defined]
    return run


def _raise(exc: Exception):
    def check(results):
        raise exc
    return check


def test_steps_are_timed_caught_and_the_next_ones_still_run(tmp_path: Path) -> None:
    steps = [
        Step("good", [("rag", "fine")], lambda results: {"loss": json.loads(results[0].stdout)["final_loss"]}),
        Step("bad", [("rag", "boom"), ("rag", "never")]),
        Step("needs-bad", [("rag", "fine")], needs=("bad",)),
        Step("wrong", [("rag", "fine")], _raise(WrongResult("overlap 0.5 < 0.95", {"overlap": 0.5}))),
        Step("needs-wrong", [("rag", "fine")], needs=("wrong",)),
        Step("buggy-check", [], _raise(ValueError("first line\nthe last line"))),
        Step("refused", [("rag", "refuse")], lambda results: {"refusal": results[0].error_line}, may_fail=True),
    ]
    runner = fake_runner({"boom": (2, "rag: error: something broke"), "refuse": (2, "rag: error: no HNSW")})
    results = gc.run_steps(steps, runner)
    by = {r.name: r for r in results}
    assert [r.name for r in results] == [s.name for s in steps]
    assert by["good"].ok and by["good"].details["loss"] == 1.0 and by["good"].error is None
    assert not by["bad"].ok and by["bad"].error == "rag: error: something broke"
    assert ("rag", "never") not in runner.calls  # a step stops at its first failing command
    assert by["needs-bad"].error == "skipped: needs bad, which failed"
    assert by["wrong"].error == "overlap 0.5 < 0.95" and by["wrong"].details["overlap"] == 0.5
    assert by["needs-wrong"].ok  # a wrong result still produced the files the next step reads
    assert by["buggy-check"].error == "the last line"
    assert by["refused"].ok and by["refused"].details["refusal"] == "rag: error: no HNSW"

    report = gc.build_report(results, {"cuda": {"count": 1}}, 12.345, budget_s=480)
    gc.write_report(tmp_path / "out" / "report.json", report)
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["ok"] is False
    assert written["failed"] == ["bad", "needs-bad", "wrong", "buggy-check"]
    assert written["machine"] == {"cuda": {"count": 1}} and written["seconds"] == 12.35
    good = written["steps"][0]
    assert set(good) == {"name", "ok", "seconds", "details"} and good["details"]["commands"][0]["rc"] == 0
    assert set(written["steps"][1]) == {"name", "ok", "seconds", "details", "error"}


def test_all_steps_passing_is_ok_and_a_spent_budget_skips_the_rest() -> None:
    ticks = iter([0.0, 0.0, 0.0, 100.0, 100.0])  # start, step one (budget, t0, end), step two (budget)
    steps = [Step("one", [("rag", "fine")]), Step("two", [("rag", "fine")])]
    results = gc.run_steps(steps, fake_runner({}), budget_s=50, clock=lambda: next(ticks))
    assert results[0].ok and results[0].seconds == 100.0
    assert results[1].error == "skipped: the 50 s budget was spent"
    assert gc.build_report(gc.run_steps(steps[:1], fake_runner({})), {}, 1.0)["ok"] is True


def test_last_line_prefers_the_cli_error_over_progress_bars_and_ray_noise() -> None:
    assert gc.last_line("x\nrag: error: bad index\n(raylet) shutting down\n") == "rag: error: bad index"
    assert gc.last_line("Traceback\n  ...\nValueError: nope\n\n") == "ValueError: nope"
    assert gc.last_line("  1%|\r 50%|\r100%|\n") == "100%|"
    assert gc.last_line("") == ""


def test_the_subprocess_runner_logs_and_kills_on_timeout(tmp_path: Path) -> None:
    run = gc.subprocess_runner(tmp_path / "logs")
    failed = run(("python", "-c", "import sys; print('out'); sys.exit('first\\nValueError: bad')"), "fail", 30)
    assert failed.returncode == 1 and failed.error_line == "ValueError: bad" and failed.stdout == "out\n"
    assert (tmp_path / "logs" / "fail.err").exists() and (tmp_path / "logs" / "fail.out").exists()
    ok = run(("python", "-c", "print(1)"), "ok", 30)
    assert ok.returncode == 0 and ok.error_line == ""
    t0 = time.monotonic()
    slow = run(("python", "-c", "import time; time.sleep(60)"), "slow", 1)
    assert slow.returncode != 0 and slow.error_line == "timed out after 1 s" and time.monotonic() - t0 < 20


def test_overlap_of_trec_runs(tmp_path: Path) -> None:
    (tmp_path / "a.trec").write_text("q1 Q0 d1 1 0.9 t\nq1 Q0 d2 2 0.8 t\nq2 Q0 d3 1 0.5 t\n")
    (tmp_path / "b.trec").write_text("q1 Q0 d2 1 0.9 t\nq1 Q0 d9 2 0.1 t\n")
    a, b = gc.trec_top(tmp_path / "a.trec"), gc.trec_top(tmp_path / "b.trec")
    assert a == {"q1": ["d1", "d2"], "q2": ["d3"]}
    assert gc.overlap_at_k(a, b) == 0.25 and gc.overlap_at_k(a, a) == 1.0
    check = gc.compare_runs(tmp_path / "a.trec", tmp_path / "b.trec", 0.95)
    with pytest.raises(WrongResult, match="overlap"):
        check([])
    assert gc.compare_runs(tmp_path / "a.trec", tmp_path / "b.trec", None)([])["overlap@10"] == 0.25


def test_refusal_check_needs_the_word() -> None:
    check = gc.refused_naming("HNSW")
    refused = CommandResult(("rag",), 2, 1.0, error_line="rag: error: Faiss index 'HNSW32' cannot run on a GPU")
    assert check([refused]) == {"refusal": refused.error_line}
    with pytest.raises(StepFailed, match="without naming HNSW"):
        check([CommandResult(("rag",), 2, 1.0, error_line="rag: error: faiss-cpu is installed")])
    with pytest.raises(StepFailed, match="succeeded"):
        check([CommandResult(("rag",), 0, 1.0)])


# ---- the plan: every GPU path, and every command line parses with the CLI's own parsers ----

@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> list[Step]:
    return gc.build_plan(tmp_path_factory.mktemp("work"), "gemma-3-270m", gc.bf16_support())


def test_the_plan_covers_every_gpu_path(plan: list[Step]) -> None:
    names = [s.name for s in plan]
    for name in ("dense-build-ray", "search-flat-gpu", "search-flat-gpu-fp16", "search-ivf-gpu",
                 "search-hnsw-gpu-refused", "train-dense-bf16", "train-dense-ray-bf16", "train-reranker",
                 "train-generative", "train-reader-causal", "answer-gpu"):
        assert name in names
    assert len(set(names)) == len(names)
    for step in plan:
        assert set(step.needs) <= set(names[:names.index(step.name)]), step.name
    lines = {s.name: " ".join(" ".join(c) for c in s.commands) for s in plan}
    assert "--ray --workers 1 --gpus-per-worker 1" in lines["dense-build-ray"]
    assert "--bf16" in lines["train-dense-bf16"] and "--workers 1 --gpus-per-worker 1" in lines["train-dense-ray-bf16"]
    assert all("--device cuda" in lines[n] for n in names if n.startswith("train-"))
    assert "--gpu" in lines["answer-gpu"] and "--gpu-fp16" in lines["search-flat-gpu-fp16"]


def test_every_planned_command_parses(plan: list[Step]) -> None:
    problems = {" ".join(c): gc.command_problem(c) for s in plan for c in s.commands}
    assert {c: p for c, p in problems.items() if p} == {}


def test_trainers_without_bf16_run_plain_and_say_so(tmp_path: Path) -> None:
    steps = gc.build_plan(tmp_path, "gemma-3-270m", dict.fromkeys(gc.TRAINERS, False))
    for step in (s for s in steps if s.name.startswith("train-")):
        assert "--bf16" not in step.commands[0]
    run_dir = tmp_path / "train" / "reranker"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"kind": "reranker", "config": {"device": "cuda", "bf16": False}}))
    reranker = next(s for s in steps if s.name == "train-reranker")
    assert reranker.check is not None
    details = reranker.check([CommandResult(reranker.commands[0], 0, 1.0, stdout='{"train_loss": 0.5}')])
    assert details["precision"] == "fp32 (no --bf16 flag yet)" and details["device"] == "cuda"
    assert details["summary"] == {"train_loss": 0.5}


def test_command_problem_catches_bad_lines() -> None:
    assert gc.command_problem(("rag", "retrieve", "--index", "i", "--queries", "q", "--out", "o", "--gpu-bogus"))
    assert "does not take --model" in str(gc.command_problem(
        ("rag", "index", "build", "--kind", "dense", "--corpus", "c", "--out", "o", "--model", "m")))
    assert gc.command_problem(("rag", "train", "reranker", "--kind", "cross-encoder", "--out", "o", "--no-such"))
    assert gc.command_problem(("python", "-c", "print(")) is not None


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gc.main(["--dry-run", "--out", str(tmp_path / "report.json"), "--only", "data,search-flat-gpu"]) == 0
    out = capsys.readouterr()
    assert "# data" in out.out and "rag retrieve" in out.out and "--gpu" in out.out
    assert "3 of 3 commands parse" in out.err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit, match="unknown step"):
        gc.main(["--dry-run", "--only", "nope"])
