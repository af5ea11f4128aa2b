"""`make gpu-check`: run every GPU path of the toolkit once, on small data, and write one JSON report.

The paths (issue 13): a dense build on Ray with one GPU worker (half precision recorded in the manifest),
Flat / IVF search on the GPU against the CPU's top 10, HNSW on the GPU refused in one line, one short
training run per trainer on the GPU (bf16 where the trainer has --bf16; dense also on Ray Train) and one
`rag answer --gpu`. Each step runs as `rag` subprocesses, is timed, and a failure is recorded (the
error's last line) before the next step runs; the exit code is 0 only when every step passed.

    python -m rag.gpu_check [--out runs/gpu-check/report.json] [--only STEP,...] [--dry-run]

Without a visible CUDA GPU it stops at once (exit 2, one line, nothing written): a CPU machine cannot
check GPU paths, and a report of failures there would only mislead. `--dry-run` prints and parses the
planned command lines on any machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_GPU = "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a machine with a GPU"
DEFAULT_OUT = Path("runs/gpu-check/report.json")
BUDGET_S = 480          # the whole check fits 8 minutes on one GPU; later steps are skipped once it is spent
STEP_TIMEOUT_S = 300    # one command never takes the whole budget
FLAT_MIN_OVERLAP = 0.95  # exact search: CPU and GPU top 10 agree up to score ties
FP16_MIN_OVERLAP = 0.90  # float16 vectors move scores slightly; far lower means a broken index
TOP_K = 10
HALF = ("bfloat16", "float16")

Command = tuple[str, ...]  # ("rag", ...) runs the toolkit's CLI, ("python", ...) this interpreter


class StepFailed(Exception):
    """A step's one-line reason, with whatever it measured before failing (kept in the report)."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class WrongResult(StepFailed):
    """The step did its work but the result is wrong: it fails, yet what it wrote can still feed later steps."""


@dataclass
class CommandResult:
    argv: Command
    returncode: int
    seconds: float
    stdout: str = ""
    error_line: str = ""
    log: str = ""

    def summary(self) -> dict[str, Any]:
        return {"command": shlex.join(self.argv), "rc": self.returncode, "seconds": self.seconds, "log": self.log}


Runner = Callable[[Command, str, float], CommandResult]   # (command, log name, timeout seconds)
Check = Callable[[list[CommandResult]], dict[str, Any]]


@dataclass
class Step:
    """Commands run in order (a non-zero exit fails the step unless `may_fail`), then `check` on their results."""
    name: str
    commands: list[Command] = field(default_factory=list)
    check: Check | None = None
    needs: tuple[str, ...] = ()
    may_fail: bool = False
    note: str = ""


@dataclass
class StepResult:
    name: str
    ok: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "ok": self.ok, "seconds": self.seconds, "details": self.details}
        if self.error is not None:
            row["error"] = self.error
        return row


# ---- running steps and writing the report (no GPU needed: tested with fake steps) ----

def last_line(text: str) -> str:
    """The line a reader needs: the CLI's own `rag: error:` line, else the last non-empty one (tqdm's \\r too)."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("rag: error:")]
    return (errors or lines or [""])[-1]


def run_step(step: Step, runner: Runner, timeout: float) -> dict[str, Any]:
    """Run one step; its details, or StepFailed with the failing command's last error line."""
    results: list[CommandResult] = []
    for i, argv in enumerate(step.commands):
        result = runner(argv, f"{step.name}.{i}", timeout)
        results.append(result)
        if result.returncode != 0 and not step.may_fail:
            raise StepFailed(result.error_line or f"exit code {result.returncode}",
                             {"commands": [r.summary() for r in results]})
    details: dict[str, Any] = {"commands": [r.summary() for r in results]} if results else {}
    if step.check is not None:
        try:
            details.update(step.check(results))
        except StepFailed as exc:
            exc.details = {**details, **exc.details}
            raise
    return details


def attempt(step: Step, runner: Runner, timeout: float) -> tuple[StepResult, bool]:
    """One step, caught: its result, and whether its work failed (then the steps that need it skip)."""
    try:
        return StepResult(step.name, True, 0.0, run_step(step, runner, timeout)), False
    except StepFailed as exc:
        return (StepResult(step.name, False, 0.0, exc.details, last_line(str(exc)) or "failed"),
                not isinstance(exc, WrongResult))
    except Exception as exc:  # noqa: BLE001 - a bug in a check is one step's failure, not the run's end
        return StepResult(step.name, False, 0.0, error=last_line(str(exc)) or type(exc).__name__), True


def run_steps(steps: Sequence[Step], runner: Runner, budget_s: float = BUDGET_S,
              step_timeout_s: float = STEP_TIMEOUT_S, clock: Callable[[], float] = time.monotonic,
              log: Callable[[str], None] = lambda line: None) -> list[StepResult]:
    """Every step in order, each timed and caught: one failure never stops the others. A step whose work failed
    makes the steps that need it skip; one whose result was wrong (WrongResult) does not."""
    start = clock()
    results: list[StepResult] = []
    blocking: set[str] = set()
    for step in steps:
        left = budget_s - (clock() - start)
        blocked = [n for n in step.needs if n in blocking]
        if blocked or left <= 0:
            why = f"needs {', '.join(blocked)}, which failed" if blocked else f"the {budget_s:.0f} s budget was spent"
            results.append(StepResult(step.name, False, 0.0, error=f"skipped: {why}"))
            blocking.add(step.name)
            log(f"gpu-check: {step.name}: skipped ({why})")
            continue
        log(f"gpu-check: {step.name} ...")
        t0 = clock()
        result, blocks = attempt(step, runner, min(step_timeout_s, left))
        result.seconds = round(clock() - t0, 2)
        if blocks:
            blocking.add(step.name)
        log(f"gpu-check: {step.name}: {'ok' if result.ok else 'FAILED: ' + str(result.error)} ({result.seconds} s)")
        results.append(result)
    return results


def build_report(results: Sequence[StepResult], machine: dict[str, Any], seconds: float,
                 **meta: Any) -> dict[str, Any]:
    """The report: overall ok, failed step names, per-step rows and the machine's facts."""
    return {"ok": bool(results) and all(r.ok for r in results), "failed": [r.name for r in results if not r.ok],
            "seconds": round(seconds, 2), **meta, "machine": machine, "steps": [r.as_dict() for r in results]}


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """Atomic write, so a killed run never leaves half a report where a previous full one was."""
    from core.io import write_json

    write_json(path, report)


# ---- the subprocess runner ----

def child_env() -> dict[str, str]:
    """What `make` exports: the hub offline (a missing model fails fast), quiet tokenizers, unbuffered logs."""
    env = dict(os.environ)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("PYTHONUNBUFFERED", "1")):
        env.setdefault(key, value)
    return env


def executable(argv: Command) -> list[str]:
    """`rag ...` through this interpreter's `-m rag.cli` (no PATH lookup), `python ...` through this interpreter."""
    head, rest = argv[0], list(argv[1:])
    if head == "rag":
        return [sys.executable, "-m", "rag.cli", *rest]
    if head == "python":
        return [sys.executable, *rest]
    return list(argv)


def subprocess_runner(log_dir: Path) -> Runner:
    """A Runner writing each command's stdout/stderr under `log_dir`; on timeout its process group is killed."""
    def run(argv: Command, name: str, timeout: float) -> CommandResult:
        log_dir.mkdir(parents=True, exist_ok=True)
        out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        t0 = time.monotonic()
        with open(out_path, "w", encoding="utf-8") as out, open(err_path, "w", encoding="utf-8") as err:
            proc = subprocess.Popen(executable(argv), stdout=out, stderr=err, env=child_env(), start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the command and what it started (Ray), nothing else
                rc, timed_out = proc.wait(), True
        seconds = round(time.monotonic() - t0, 2)
        stdout = out_path.read_text(encoding="utf-8", errors="replace")
        error = (f"timed out after {timeout:.0f} s" if timed_out else
                 last_line(err_path.read_text(encoding="utf-8", errors="replace")) or last_line(stdout))
        return CommandResult(argv, rc, seconds, stdout, error if rc else "", str(log_dir / f"{name}.{{out,err}}"))
    return run


# ---- checks of what the commands wrote ----

def trec_top(path: str | Path, k: int = TOP_K) -> dict[str, list[str]]:
    """Each query's first k document ids of a TREC run, in rank order."""
    ranked: dict[str, list[tuple[int, str]]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 6:
            ranked.setdefault(parts[0], []).append((int(parts[3]), parts[2]))
    return {q: [d for _, d in sorted(hits)[:k]] for q, hits in ranked.items()}


def overlap_at_k(reference: dict[str, list[str]], other: dict[str, list[str]], k: int = TOP_K) -> float:
    """Mean share of the reference's top k that the other run also has in its top k (a missing query: 0)."""
    shares = [len(set(docs[:k]) & set(other.get(q, [])[:k])) / len(docs[:k]) for q, docs in reference.items() if docs]
    return round(sum(shares) / len(shares), 4) if shares else 0.0


def compare_runs(cpu: Path, gpu: Path, min_overlap: float | None) -> Check:
    """Check: the GPU run's top 10 against the CPU run's (a floor fails the step; None only reports)."""
    def check(_: list[CommandResult]) -> dict[str, Any]:
        ref = trec_top(cpu)
        overlap = overlap_at_k(ref, trec_top(gpu))
        details = {"queries": len(ref), f"overlap@{TOP_K}": overlap, "min_overlap": min_overlap}
        if min_overlap is not None and overlap < min_overlap:
            raise WrongResult(f"GPU top-{TOP_K} overlap with the CPU {overlap} < {min_overlap}", details)
        return details
    return check


def half_precision_on_cuda(index_dir: Path) -> Check:
    """Check: the manifest's `encoding` says the passages were encoded in half precision on a CUDA device."""
    def check(_: list[CommandResult]) -> dict[str, Any]:
        from core.io import read_json

        manifest = read_json(index_dir / "manifest.json")
        encoding = manifest.get("encoding") or {}
        details = {"encoding": encoding, "counts": manifest.get("counts")}
        if encoding.get("passage_precision") not in HALF or "cuda" not in str(encoding.get("device")):
            raise WrongResult(f"manifest encoding {encoding} is not half precision on cuda", details)
        return details
    return check


def refused_naming(word: str) -> Check:
    """Check: the (one) command failed, and its error line names `word` (an expected, clear refusal)."""
    def check(results: list[CommandResult]) -> dict[str, Any]:
        result = results[-1]
        details = {"refusal": result.error_line}
        if result.returncode == 0:
            raise WrongResult(f"expected a refusal naming {word}, but the command succeeded", details)
        if word not in result.error_line:
            raise WrongResult(f"refused without naming {word}: {result.error_line}", details)
        return details
    return check


def training_run(out: Path, precision: str) -> Check:
    """Check: the run folder's device and precision, and the trainer's printed summary."""
    def check(results: list[CommandResult]) -> dict[str, Any]:
        from core.io import read_json

        config = read_json(out / "config.json") if (out / "config.json").exists() else {}
        config = config.get("config", config) if isinstance(config, dict) else {}
        try:
            summary = json.loads(results[-1].stdout)
        except (json.JSONDecodeError, IndexError):
            summary = None
        return {"precision": precision, "device": config.get("device"), "bf16": config.get("bf16"),
                "workers": config.get("workers"), "gpus_per_worker": config.get("gpus_per_worker"),
                "summary": summary}
    return check


def answered(out: Path, expected: int) -> Check:
    """Check: one KILT guess per question, and how many carry a non-empty answer."""
    def check(_: list[CommandResult]) -> dict[str, Any]:
        from core.io import read_jsonl

        rows = read_jsonl(out)
        answers = [str((r.get("output") or [{}])[0].get("answer") or "").strip() for r in rows]
        details = {"questions": len(rows), "non_empty_answers": sum(bool(a) for a in answers),
                   "example": {"input": rows[0].get("input"), "answer": answers[0]} if rows else None}
        if len(rows) != expected:
            raise WrongResult(f"{len(rows)} guesses for {expected} questions", details)
        return details
    return check


# ---- the plan ----

def supports_flag(what: str, kind: str, flag: str) -> bool:
    """Whether `rag train WHAT --kind KIND` has FLAG now (trainers gain --bf16 over time; the plan follows)."""
    from rag.commands.train import trainer_parser

    return any(flag in action.option_strings for action in trainer_parser(what, kind)._actions)


def make_slice(data: Path, out: Path, n_queries: int, n_docs: int, n_answer: int) -> Check:
    """Check of the data step: a fixed slice (as repro's `slice`) and the questions the reader answers."""
    def check(_: list[CommandResult]) -> dict[str, Any]:
        from core.io import read_jsonl, write_jsonl
        from rag.repro import slice_task

        slice_task(str(data / "vital10k"), str(data / "fanoutqa" / "dev.jsonl"), str(out), n_queries, n_docs)
        queries = read_jsonl(out / "queries.jsonl")
        write_jsonl(out / "answer-queries.jsonl", queries[:n_answer])
        return {"slice_docs": len(read_jsonl(out / "corpus.jsonl")), "slice_queries": len(queries),
                "answer_queries": min(n_answer, len(queries))}
    return check


def retrieve(index: Path, queries: Path, out: Path, *flags: str) -> Command:
    return ("rag", "retrieve", "--index", str(index), "--queries", str(queries), "--k", str(TOP_K),
            "--out", f"{out}.jsonl", "--trec", f"{out}.trec", "--overwrite", *flags)


def dense_build(corpus: Path, out: Path, factory: str, *flags: str) -> Command:
    return ("rag", "index", "build", "--kind", "dense", "--corpus", str(corpus), "--out", str(out),
            "--faiss", factory, "--overwrite", *flags)


TRAIN_COMMON = ("--eval-every", "0", "--save-every", "0", "--log-every", "5", "--device", "cuda", "--overwrite")


def train_step(name: str, what: str, kind: str, out: Path, args: Sequence[str], needs: tuple[str, ...],
               bf16: bool) -> Step:
    """One short training run on the GPU, with --bf16 where the trainer has it (else recorded as fp32)."""
    precision = "bf16" if bf16 else "fp32 (no --bf16 flag yet)"
    argv: Command = ("rag", "train", what, "--kind", kind, "--out", str(out), *args, *TRAIN_COMMON,
                     *(("--bf16",) if bf16 else ()))
    return Step(name, [argv], training_run(out, precision), needs)


def reader_model_code(model: str) -> str:
    """Python that loads (for Gemma: converts once, cached under RAG_HOME) the reader model and prints its path."""
    if model == "gemma-3-270m":
        return "from core.gemma import gemma_path; print(gemma_path())"
    return f"from core.models import resolve_model; print(resolve_model({model!r}))"


def build_plan(work: Path, reader_model: str, bf16: dict[str, bool], n_docs: int = 3000, n_queries: int = 100,
               n_answer: int = 20) -> list[Step]:
    """The steps, in order, writing under `work`; `bf16` says which trainers ('retriever/dense', ...) have --bf16."""
    data, sliced, idx, r, runs = work / "data", work / "slice", work / "idx", work / "search", work / "train"
    corpus, train = data / "vital10k", data / "fanoutqa" / "train.jsonl"
    queries, flat, ivf, hnsw = sliced / "queries.jsonl", idx / "flat-ray", idx / "ivf", idx / "hnsw"
    bm25 = str(idx / "bm25")
    return [
        Step("data", [("rag", "data", "prepare", "vital10k", "--out", str(corpus), "--overwrite"),
                      ("rag", "data", "prepare", "fanoutqa", "--corpus", str(corpus), "--out", str(data / "fanoutqa"),
                       "--overwrite")],
             make_slice(data, sliced, n_queries, n_docs, n_answer),
             note=f"then in-process: slice of the first {n_queries} dev questions + gold pages + {n_docs} pages"),
        Step("bm25-index", [("rag", "index", "build", "--kind", "bm25", "--corpus", str(corpus), "--out",
                             bm25, "--overwrite")], needs=("data",),
             note="CPU: hard negatives for the dense and reranker trainers"),
        Step("dense-build-ray", [dense_build(sliced, flat, "Flat", "--ray", "--workers", "1", "--gpus-per-worker", "1")],
             half_precision_on_cuda(flat), ("data",)),
        Step("dense-build-ivf", [dense_build(sliced, ivf, "IVF64,Flat")], half_precision_on_cuda(ivf), ("data",)),
        Step("dense-build-hnsw", [dense_build(sliced, hnsw, "HNSW32")], half_precision_on_cuda(hnsw), ("data",)),
        Step("search-flat-cpu", [retrieve(flat, queries, r / "flat-cpu")], needs=("dense-build-ray",),
             note="CPU Faiss: the reference top 10"),
        Step("search-ivf-cpu", [retrieve(ivf, queries, r / "ivf-cpu", "--nprobe", "16")], needs=("dense-build-ivf",),
             note="CPU Faiss: the reference top 10"),
        Step("search-flat-gpu", [retrieve(flat, queries, r / "flat-gpu", "--gpu")],
             compare_runs(r / "flat-cpu.trec", r / "flat-gpu.trec", FLAT_MIN_OVERLAP), ("search-flat-cpu",)),
        Step("search-flat-gpu-fp16", [retrieve(flat, queries, r / "flat-gpu-fp16", "--gpu", "--gpu-fp16")],
             compare_runs(r / "flat-cpu.trec", r / "flat-gpu-fp16.trec", FP16_MIN_OVERLAP), ("search-flat-cpu",)),
        Step("search-ivf-gpu", [retrieve(ivf, queries, r / "ivf-gpu", "--nprobe", "16", "--gpu")],
             compare_runs(r / "ivf-cpu.trec", r / "ivf-gpu.trec", None), ("search-ivf-cpu",),
             note="overlap reported, no floor"),
        Step("search-hnsw-gpu-refused", [retrieve(hnsw, queries, r / "hnsw-gpu", "--gpu")], refused_naming("HNSW"),
             ("dense-build-hnsw",), may_fail=True, note="ok when --gpu is refused with an error naming HNSW"),
        Step("reader-model", [("python", "-c", reader_model_code(reader_model))],
             lambda results: {"model_path": last_line(results[-1].stdout)},
             note="converts the packaged Gemma GGUF once (cached under RAG_HOME), so the runs below time only training"),
        train_step("train-dense-bf16", "retriever", "dense", runs / "dense",
                   ["--corpus", str(corpus), "--train", str(train), "--bm25-index", bm25,
                    "--max-steps", "20", "--batch-size", "16", "--max-seq-length", "64"],
                   ("bm25-index",), bf16["retriever/dense"]),
        train_step("train-dense-ray-bf16", "retriever", "dense", runs / "dense-ray",
                   ["--corpus", str(corpus), "--train", str(train), "--bm25-index", bm25,
                    "--max-steps", "20", "--batch-size", "16", "--max-seq-length", "64",
                    "--workers", "1", "--gpus-per-worker", "1"],
                   ("bm25-index",), bf16["retriever/dense"]),
        train_step("train-reranker", "reranker", "cross-encoder", runs / "reranker",
                   ["--corpus", str(corpus), "--train", str(train), "--bm25-index", bm25,
                    "--max-steps", "10", "--batch-size", "4", "--warmup-steps", "1"],
                   ("bm25-index",), bf16["reranker/cross-encoder"]),
        train_step("train-generative", "retriever", "generative", runs / "generative",
                   ["--stage", "finetune", "--model", reader_model, "--corpus", str(corpus), "--train", str(train),
                    "--max-source-length", "64", "--max-steps", "10", "--batch-size", "8"],
                   ("data", "reader-model"), bf16["retriever/generative"]),
        train_step("train-reader-causal", "reader", "causal", runs / "reader",
                   ["--model", reader_model, "--index", str(flat), "--train", str(train), "--k", "2",
                    "--max-passage-tokens", "64", "--max-answer-tokens", "12", "--max-steps", "5", "--batch-size", "4"],
                   ("dense-build-ray", "reader-model"), bf16["reader/causal"]),
        Step("answer-gpu", [("rag", "answer", "--index", str(flat), "--queries", str(sliced / "answer-queries.jsonl"),
                             "--kind", "causal", "--model", reader_model, "--k", "3", "--max-answer-tokens", "16",
                             "--device", "cuda", "--gpu", "--out", str(work / "answer.jsonl"), "--overwrite")],
             answered(work / "answer.jsonl", n_answer), ("dense-build-ray", "reader-model")),
    ]


TRAINERS = ("retriever/dense", "reranker/cross-encoder", "retriever/generative", "reader/causal")


def bf16_support() -> dict[str, bool]:
    return {f"{what}/{kind}": supports_flag(what, kind, "--bf16")
            for what, kind in (key.split("/") for key in TRAINERS)}


# ---- validating command lines without running them (the dry run) ----

def command_problem(argv: Command) -> str | None:
    """Why the CLI would reject `argv` before doing any work (None: it parses), checked with its own parsers."""
    if argv[0] == "python":
        try:
            compile(argv[argv.index("-c") + 1], "<gpu-check>", "exec")
        except (SyntaxError, ValueError, IndexError) as exc:
            return f"python code does not compile: {exc}"
        return None
    from rag.cli import build_parser

    try:
        args = build_parser().parse_args(list(argv[1:]))
        if args.command == "train":
            kind, rest = split_kind(list(args.rest))
            from rag.commands.train import trainer_parser
            trainer_parser(args.train_what, kind).parse_args(rest)
        if args.command == "index" and args.index_cmd == "build":
            return foreign_index_flags(args.kind, argv)
    except SystemExit:
        return "argparse refused it (see the usage message above)"
    except Exception as exc:  # noqa: BLE001 - an unknown kind, a registry error: all one line
        return last_line(str(exc)) or type(exc).__name__
    return None


def split_kind(rest: list[str]) -> tuple[str, list[str]]:
    i = rest.index("--kind")
    return rest[i + 1], rest[:i] + rest[i + 2:]


def foreign_index_flags(kind: str, argv: Command) -> str | None:
    """Flags of another index kind (parse fine, refused at run time by `rag index build`)."""
    import dataclasses

    from retrievers.index_kinds import INDEX_KINDS, config_class

    own = {f.name for f in dataclasses.fields(config_class(kind))}
    other = {f.name for k in INDEX_KINDS for f in dataclasses.fields(config_class(k))} - own
    bad = [a for a in argv if a.startswith("--") and a[2:].replace("-", "_") in other]
    return f"--kind {kind} does not take {', '.join(bad)}" if bad else None


def dry_run(steps: Sequence[Step]) -> int:
    """Print every planned command, then parse each; 1 when any would be refused."""
    problems = []
    for step in steps:
        needs = f" (needs {', '.join(step.needs)})" if step.needs else ""
        print(f"# {step.name}{needs}{': ' + step.note if step.note else ''}")
        for argv in step.commands:
            print(shlex.join(argv))
            problem = command_problem(argv)
            if problem:
                problems.append(f"{step.name}: {problem}: {shlex.join(argv)}")
    for line in problems:
        print(f"gpu-check: dry run: {line}", file=sys.stderr)
    n = sum(len(s.commands) for s in steps)
    print(f"# dry run: {n - len(problems)} of {n} commands parse", file=sys.stderr)
    return 1 if problems else 0


# ---- machine facts ----

def _fact(get: Callable[[], Any]) -> Any:
    try:
        return get()
    except Exception as exc:  # noqa: BLE001 - a missing package is a fact too
        return f"unavailable: {last_line(str(exc)) or type(exc).__name__}"


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def gpu_facts() -> dict[str, Any]:
    import torch

    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return {"count": len(props), "devices": [{"name": d.name, "memory_gib": round(d.total_memory / 2**30, 1),
                                              "capability": f"{d.major}.{d.minor}"} for d in props],
            "bf16_supported": torch.cuda.is_bf16_supported(), "torch_cuda": torch.version.cuda}


def faiss_facts() -> dict[str, Any]:
    import faiss

    gpu_build = hasattr(faiss, "StandardGpuResources")
    return {"version": faiss.__version__, "gpu_build": gpu_build,
            "gpus": int(faiss.get_num_gpus()) if gpu_build else 0}


def machine_facts() -> dict[str, Any]:
    """What the report needs to be read later: GPUs, library versions, and whether faiss sees the GPUs."""
    return {"host": platform.node(), "python": platform.python_version(),
            "cuda": _fact(gpu_facts), "faiss": _fact(faiss_facts),
            "versions": {d: _version(d) for d in ("torch", "transformers", "sentence-transformers", "faiss-cpu",
                                                  "faiss-gpu-cu12", "ray", "peft")}}


# ---- the command ----

def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rag.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default: {DEFAULT_OUT})")
    parser.add_argument("--work", type=Path, help="data, indexes, runs and logs (default: a work/ folder beside --out)")
    parser.add_argument("--only", help="comma-separated step names to run (default: all)")
    parser.add_argument("--reader-model", default="gemma-3-270m",
                        help="causal reader / generative model (default: gemma-3-270m, the packaged one)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help=f"skip the remaining steps once this many seconds are spent (default: {BUDGET_S})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the planned commands and check that each parses; runs on any machine (default: off)")
    return parser.parse_args(argv)


def select(steps: list[Step], only: str | None) -> list[Step]:
    if not only:
        return steps
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - {s.name for s in steps})
    if unknown:
        raise SystemExit(f"gpu-check: unknown step(s) {', '.join(unknown)}; steps: {', '.join(s.name for s in steps)}")
    return [s for s in steps if s.name in names]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not cuda_available():  # before any work: nothing written, in about two seconds
        print(NO_GPU, file=sys.stderr)
        return 2
    work = (args.work or args.out.parent / "work").resolve()
    steps = select(build_plan(work, args.reader_model, bf16_support()), args.only)
    if args.dry_run:
        return dry_run(steps)
    start = time.monotonic()
    machine = machine_facts()
    results = run_steps(steps, subprocess_runner(work / "logs"), args.budget_s,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    report = build_report(results, machine, time.monotonic() - start, budget_s=args.budget_s,
                          work=str(work), command=shlex.join(["python", "-m", "rag.gpu_check", *(argv or sys.argv[1:])]))
    write_report(args.out, report)
    print(f"gpu-check: {'all ' + str(len(results)) + ' steps passed' if report['ok'] else 'FAILED: ' + ', '.join(report['failed'])}"
          f" in {report['seconds']:.0f} s; report: {args.out}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
