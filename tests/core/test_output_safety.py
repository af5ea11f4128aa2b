"""Outputs never destroy data: --overwrite replaces only what the toolkit made (never the working folder, the
home folder, an input or a folder holding one), the old output stays whole until the new one is complete,
commands never write over their inputs, one writer per output, usual permissions, clean training reruns."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.errors import RagError
from core.io import (
    atomic_dir,
    check_output_file,
    lock_path,
    move_into_place,
    output_lock,
    prepare_output_dir,
    toolkit_kind,
)
from rag.cli import main
from tests.conftest import SMALL_DOCS, SMALL_QUERIES, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def build(corpus: Path | str, out: Path | str, *extra: str) -> int:
    return main(["index", "build", "--corpus", str(corpus), "--out", str(out), "--kind", "bm25", *extra])


def one_error_line(capsys) -> str:
    """The one `rag: error:` line (progress bars before it aside)."""
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert lines and lines[-1].startswith("rag: error: ") and err.count("rag: error") == 1, err
    return lines[-1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder holding a corpus and an unrelated file, as the current directory."""
    work = tmp_path / "work"
    write_jsonl(work / "corpus.jsonl", SMALL_DOCS)
    (work / "notes.txt").write_text("unrelated work\n", encoding="utf-8")
    monkeypatch.chdir(work)
    return work


# --------------------------------------------------------------------------- what --overwrite may replace

def test_overwrite_never_replaces_the_working_folder_or_its_parents(workdir, tmp_path, capsys):
    before = snapshot(tmp_path)
    assert build("corpus.jsonl", ".", "--overwrite") == 2
    assert "it is the working folder" in one_error_line(capsys)
    assert build("corpus.jsonl", "..", "--overwrite") == 2
    assert "it holds the working folder" in one_error_line(capsys)
    assert build(workdir / "corpus.jsonl", workdir, "--overwrite") == 2
    assert "working folder" in one_error_line(capsys)
    assert snapshot(tmp_path) == before  # nothing deleted, not even a lock file left behind


def test_overwrite_never_replaces_an_input_or_a_folder_holding_one(tmp_path, capsys, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    corpus_dir = tmp_path / "data" / "corpus"
    write_jsonl(corpus_dir / "corpus.jsonl", SMALL_DOCS)
    (corpus_dir / "README").write_text("mine\n", encoding="utf-8")
    before = snapshot(tmp_path)
    # the corpus folder as --out: not a folder the toolkit made
    assert build(corpus_dir, corpus_dir, "--overwrite") == 2
    assert "refusing to replace" in one_error_line(capsys)
    # the corpus file itself as --out
    assert build(corpus_dir / "corpus.jsonl", corpus_dir / "corpus.jsonl", "--overwrite") == 2
    assert "it is a file" in one_error_line(capsys)
    assert snapshot(tmp_path) == before
    # with the inputs named, the check says so before any work
    for out in (corpus_dir, corpus_dir / "corpus.jsonl", tmp_path / "data"):
        with pytest.raises(RagError, match=r"(it is|it holds) the input --corpus"):
            prepare_output_dir(out, overwrite=True, inputs={"--corpus": corpus_dir / "corpus.jsonl"})
    assert snapshot(tmp_path) == before


def test_a_prepared_data_set_is_not_replaced_by_an_index(tmp_path, capsys):
    """Even when a builder does not name its inputs: a data set folder (a toolkit folder) is no index's to replace."""
    data = tmp_path / "data"
    write_jsonl(data / "corpus.jsonl", SMALL_DOCS)
    (data / "stats.json").write_text('{"documents": 6}\n', encoding="utf-8")
    (data / "run.json").write_text('{"command": "data prepare vital10k"}\n', encoding="utf-8")
    assert toolkit_kind(data) == "corpus data"
    before = snapshot(tmp_path)
    assert build(data, data, "--overwrite") == 2
    assert "it holds corpus data, and the new output is index" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_home_and_root_are_never_outputs(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")
    for out, why in ((home, "it is the home folder"), (tmp_path, "it holds the working folder"),
                     (Path("/"), "filesystem root")):
        with pytest.raises(RagError, match=why):
            prepare_output_dir(out, overwrite=True)
        with pytest.raises(RagError, match=why):
            with atomic_dir(out, overwrite=True):
                pass
    assert (home / "docs").is_dir()


def test_overwrite_refuses_a_folder_the_toolkit_did_not_make(small_corpus, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n", encoding="utf-8")
    (mine / "manifest.json").write_text("[1, 2, 3]\n", encoding="utf-8")  # a JSON file, but no toolkit manifest
    before = snapshot(mine)
    assert build(small_corpus, mine, "--overwrite") == 2
    err = one_error_line(capsys)
    assert str(mine) in err and "the toolkit did not make it" in err
    assert snapshot(mine) == before
    assert build(small_corpus, mine) == 2  # and without --overwrite, as before
    assert "--overwrite" in one_error_line(capsys)
    assert snapshot(mine) == before


def test_toolkit_kinds_from_the_markers_each_writer_leaves(tmp_path):
    def folder(name: str, files: dict[str, str]) -> Path:
        path = tmp_path / name
        path.mkdir()
        for fname, text in files.items():
            (path / fname).write_text(text, encoding="utf-8")
        return path

    assert toolkit_kind(folder("idx", {"manifest.json": '{"kind": "bm25"}'})) == "index"
    assert toolkit_kind(folder("run", {"config.json": '{"kind": "toy", "config": {}, "versions": {}}'})) == "training run"
    assert toolkit_kind(folder("hf", {"config.json": '{"model_type": "bert"}'})) is None
    assert toolkit_kind(folder("derived", {"derive.json": '{"transform": "subsample"}'})) == "corpus data"
    assert toolkit_kind(folder("prepared", {"stats.json": "{}", "train.jsonl": ""})) == "corpus data"
    assert toolkit_kind(folder("stats-alone", {"stats.json": "{}"})) is None
    assert toolkit_kind(folder("ckpt", {"state.json": '{"step": 3}', "weights.safetensors": ""})) == "checkpoint"
    assert toolkit_kind(folder("record", {"run.json": '{"command": "x"}'})) == "toolkit output"
    assert toolkit_kind(folder("user", {"run.json": '{"miles": 5}', "notes.txt": "x"})) is None


# --------------------------------------------------------------------------- the old output stays until the new one is whole

def test_the_old_index_stays_whole_when_the_new_build_fails(small_corpus, small_queries, tmp_path, monkeypatch, capsys):
    import retrievers.bm25 as bm25

    out = tmp_path / "bm25"
    assert build(small_corpus, out) == 0
    before = snapshot(out)

    def broken_manifest(*args, **kwargs):
        raise RagError("disk full (simulated) half-way through the build")

    monkeypatch.setattr(bm25, "write_manifest", broken_manifest)
    capsys.readouterr()
    assert build(small_corpus, out, "--overwrite") == 2
    assert "simulated" in one_error_line(capsys)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bm25", "corpus", "queries.jsonl"]  # no staging, trash, lock
    monkeypatch.undo()
    assert main(["retrieve", "--index", str(out), "--queries", str(small_queries), "--out",
                 str(tmp_path / "guesses.jsonl")]) == 0
    # a complete rebuild replaces it, and leaves nothing beside it
    old_manifest = json.loads((out / "manifest.json").read_text())
    assert build(small_corpus, out, "--overwrite", "--k1", "1.1") == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["k1"] == 1.1 != old_manifest["config"]["k1"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_move_into_place_swaps_by_rename(tmp_path, monkeypatch, exchange):
    import core.io

    if not exchange:
        monkeypatch.setattr(core.io, "_exchange", lambda a, b: False)
    out = tmp_path / "idx"
    out.mkdir()
    (out / "manifest.json").write_text('{"kind": "bm25", "n": 1}', encoding="utf-8")
    new = tmp_path / ".idx.new"
    new.mkdir()
    (new / "manifest.json").write_text('{"kind": "bm25", "n": 2}', encoding="utf-8")
    move_into_place(new, out, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_a_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    import core.io

    monkeypatch.setattr(core.io, "_exchange", lambda a, b: False)
    out = tmp_path / "idx"
    out.mkdir()
    (out / "manifest.json").write_text('{"kind": "bm25", "n": 1}', encoding="utf-8")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old -> trash done; new -> out fails
            raise OSError("simulated")
        return real_replace(src, dst)

    monkeypatch.setattr(core.io.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        with atomic_dir(out, overwrite=True) as staging:
            (staging / "manifest.json").write_text('{"kind": "bm25", "n": 2}', encoding="utf-8")
    monkeypatch.undo()
    assert json.loads((out / "manifest.json").read_text())["n"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


# --------------------------------------------------------------------------- commands never write over their inputs

def test_retrieve_refuses_its_queries_file_as_out(small_corpus, small_queries, tmp_path, capsys):
    index = tmp_path / "bm25"
    assert build(small_corpus, index) == 0
    capsys.readouterr()
    before = small_queries.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(["retrieve", "--index", str(index), "--queries", str(small_queries), "--out",
                     str(small_queries), *extra]) == 2
        err = one_error_line(capsys)
        assert "it is the input --queries" in err
        assert small_queries.read_bytes() == before
    assert main(["retrieve", "--index", str(index), "--queries", str(small_queries), "--out",
                 str(index / "manifest.json"), "--overwrite"]) == 2
    assert "it is inside the input --index" in one_error_line(capsys)
    assert main(["retrieve", "--index", str(index), "--queries", str(small_queries), "--out",
                 str(tmp_path / "g.jsonl"), "--trec", str(small_queries)]) == 2
    assert "--trec" in one_error_line(capsys)
    assert small_queries.read_bytes() == before and not (tmp_path / "g.jsonl").exists()


def test_retrieve_asks_for_overwrite_before_replacing_its_out(small_corpus, small_queries, tmp_path, capsys):
    index = tmp_path / "bm25"
    assert build(small_corpus, index) == 0
    out = tmp_path / "guesses.jsonl"
    out.write_text("earlier guesses\n", encoding="utf-8")
    capsys.readouterr()
    argv = ["retrieve", "--index", str(index), "--queries", str(small_queries), "--out", str(out)]
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert str(out) in err and "--overwrite" in err
    assert out.read_text() == "earlier guesses\n"
    assert main([*argv, "--overwrite"]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["q1", "q2", "q3"]
    assert not lock_path(out).exists()


def test_answer_refuses_its_queries_file_and_an_existing_out(small_queries, tmp_path, capsys):
    before = small_queries.read_bytes()
    index = tmp_path / "no-index-needed"  # refused before anything is loaded
    assert main(["answer", "--index", str(index), "--queries", str(small_queries), "--out", str(small_queries),
                 "--overwrite"]) == 2
    assert "it is the input --queries" in one_error_line(capsys)
    out = tmp_path / "answers.jsonl"
    out.write_text("mine\n", encoding="utf-8")
    assert main(["answer", "--index", str(index), "--queries", str(small_queries), "--out", str(out)]) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert small_queries.read_bytes() == before and out.read_text() == "mine\n"


def test_data_commands_refuse_their_inputs(tmp_path, capsys):
    corpus_dir = tmp_path / "corpus"
    write_jsonl(corpus_dir / "corpus.jsonl", SMALL_DOCS)
    (corpus_dir / "stats.json").write_text("{}\n", encoding="utf-8")  # looks like a prepared data set
    qa = write_jsonl(tmp_path / "qa.jsonl", SMALL_QUERIES)
    before = snapshot(tmp_path)
    assert main(["data", "derive", "--from", str(corpus_dir), "--transform", "subsample", "--out", str(corpus_dir),
                 "--overwrite"]) == 2
    assert "it is the input --from" in one_error_line(capsys)
    assert main(["data", "derive", "--from", str(corpus_dir), "--transform", "counterfactual", "--qa", str(qa),
                 "--out", str(tmp_path), "--overwrite"]) == 2
    assert "it holds the input" in one_error_line(capsys)
    assert main(["data", "prepare", "fanoutqa", "--corpus", str(corpus_dir), "--out", str(corpus_dir),
                 "--overwrite"]) == 2
    assert "it is the input --corpus" in one_error_line(capsys)
    assert snapshot(tmp_path) == before
    # a derived folder is the toolkit's: --overwrite replaces it
    out = tmp_path / "derived"
    opts = ["data", "derive", "--from", str(corpus_dir), "--transform", "subsample", "--option", "sample=2",
            "--out", str(out)]
    assert main(opts) == 0
    assert main(opts) == 2 and "--overwrite" in one_error_line(capsys)
    assert main([*opts, "--overwrite"]) == 0


def test_check_output_file(tmp_path):
    index = tmp_path / "idx"
    index.mkdir()
    with pytest.raises(RagError, match="it is inside the input --index"):
        check_output_file(index / "x.jsonl", inputs={"--index": index})
    with pytest.raises(RagError, match="is a folder"):
        check_output_file(index)


# --------------------------------------------------------------------------- one writer per output

def test_two_concurrent_builds_to_one_out(small_corpus, tmp_path, capsys):
    from retrievers.bm25 import build_bm25_index

    out = tmp_path / "bm25"
    inside, finish = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with atomic_dir(out) as staging:
                (staging / "manifest.json").write_text('{"kind": "first"}', encoding="utf-8")
                inside.set()
                assert finish.wait(30)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(30)
    with pytest.raises(RagError, match=f"{out} is being written by another run"):
        build_bm25_index(small_corpus, out, overwrite=True)
    assert lock_path(out).exists()
    finish.set()
    thread.join(30)
    assert not errors
    assert json.loads((out / "manifest.json").read_text()) == {"kind": "first"}  # whole, and the first one's
    assert not lock_path(out).exists()


def _hold_lock_in_subprocess(out: Path) -> subprocess.Popen:
    code = ("import sys; from core.io import output_lock\n"
            f"with output_lock({str(out)!r}):\n"
            "    print('locked', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_build_while_another_process_writes_the_same_out_fails_at_once(small_corpus, tmp_path, capsys):
    out = tmp_path / "bm25"
    proc = _hold_lock_in_subprocess(out)
    try:
        assert build(small_corpus, out) == 2
        err = one_error_line(capsys)
        assert "is being written by another run" in err and f"pid {proc.pid}" in err
        assert not out.exists()
    finally:
        proc.communicate("", timeout=30)
    assert build(small_corpus, out) == 0
    assert (out / "manifest.json").exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(small_corpus, tmp_path):
    out = tmp_path / "bm25"
    proc = _hold_lock_in_subprocess(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert lock_path(out).exists()  # left behind by the killed run
    assert build(small_corpus, out) == 0
    assert not lock_path(out).exists()
    with output_lock(out):
        with output_lock(out):  # re-entrant in one thread
            pass
        assert lock_path(out).exists()
    assert not lock_path(out).exists()


# --------------------------------------------------------------------------- permissions

def test_outputs_get_the_usual_permissions(small_corpus, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "bm25"
        assert build(small_corpus, out) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        for path in out.rglob("*"):
            assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
        with atomic_dir(tmp_path / "plain") as staging:
            assert stat.S_IMODE(staging.stat().st_mode) == 0o700  # private while it is built
        assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o755
        os.umask(0o027)
        with atomic_dir(tmp_path / "group") as staging:
            pass
        assert stat.S_IMODE((tmp_path / "group").stat().st_mode) == 0o750
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- training runs

@dataclass
class _ToyConfig:
    max_steps: int = 6
    batch_size: int = 4
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0
    save_every: int = 3
    log_every: int = 1
    train: str = ""


def _toy_loop(out: Path, config, resume: bool = False, overwrite: bool = False):
    import torch

    from core.training import RunFolder, TrainLoop
    from core.training.loop import EpochSampler

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    y = x.sum(dim=1, keepdim=True)
    sampler = EpochSampler(len(x), config.batch_size, config.seed)

    def loss_fn(idx):
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        return loss, {}

    run = RunFolder(out, config, "toy", resume=resume, overwrite=overwrite)
    return TrainLoop(run, model, config, sampler.indices, loss_fn, resume=resume)


def test_training_overwrite_starts_from_an_empty_run_folder(tmp_path):
    out = tmp_path / "run"
    _toy_loop(out, _ToyConfig(max_steps=20, save_every=5)).fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-15", "checkpoint-20"]
    (out / "extra-from-old-run.txt").write_text("old\n", encoding="utf-8")

    loop = _toy_loop(out, _ToyConfig(max_steps=6, save_every=2), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # nothing of the old run is left
    original = loop.batch_for_step

    def killed_at_step_5(step):
        if step == 5:
            raise KeyboardInterrupt
        return original(step)

    loop.batch_for_step = killed_at_step_5
    with pytest.raises(KeyboardInterrupt):
        loop.fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    del loop
    metrics = _toy_loop(out, _ToyConfig(max_steps=6, save_every=2), resume=True).fit()
    assert metrics["resumed_from"] == 4 and metrics["steps"] == 6


def test_training_refuses_zero_steps_before_writing(tmp_path):
    from core.training import RunFolder

    for steps in (0, -1):
        with pytest.raises(RagError, match="max_steps must be at least 1"):
            RunFolder(tmp_path / "run", _ToyConfig(max_steps=steps), "toy")
    assert list(tmp_path.iterdir()) == []


def test_training_overwrite_replaces_only_a_run_and_never_its_inputs(tmp_path, monkeypatch):
    from core.training import RunFolder

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RagError, match="working folder"):
        RunFolder(".", _ToyConfig(), "toy", overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    with pytest.raises(RagError, match="not a training run's"):
        RunFolder(mine, _ToyConfig(), "toy", overwrite=True)
    assert (mine / "config.json").read_text() == '{"model_type": "bert"}'

    run = tmp_path / "run"
    RunFolder(run, _ToyConfig(), "toy").close()
    train = write_jsonl(run / "train.jsonl", SMALL_QUERIES)
    with pytest.raises(RagError, match="it holds the input --train"):
        RunFolder(run, _ToyConfig(train=str(train)), "toy", overwrite=True)
    assert train.exists()


def test_a_second_run_to_the_same_folder_fails_at_once(tmp_path):
    from core.training import RunFolder

    first = RunFolder(tmp_path / "run", _ToyConfig(), "toy")
    failures: list[BaseException] = []

    def second() -> None:
        try:
            RunFolder(tmp_path / "run", _ToyConfig(), "toy", overwrite=True)
        except RagError as exc:
            failures.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(30)
    assert len(failures) == 1 and "is being written by another run" in str(failures[0])
    first.close()
    RunFolder(tmp_path / "run", _ToyConfig(), "toy", overwrite=True).close()
