"""File helpers: strict JSONL reading with precise errors, atomic writes (temp path, then rename), and
the safety rules of every output: a lock per output, no writing over inputs or the working folder, and
`--overwrite` replacing only folders the toolkit made (swapped in by rename once the new one is whole).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from core.errors import InputError, RagError

logger = logging.getLogger(__name__)

_UMASK_GUARD = threading.Lock()


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; bad UTF-8 or JSON raises InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"invalid UTF-8 at byte {exc.start}", path, lineno) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except RecursionError:
                raise InputError("JSON nested too deeply", path, lineno) from None
            except json.JSONDecodeError as exc:
                raise InputError(f"malformed JSON ({exc.msg} at column {exc.colno})", path, lineno) from None
            if not isinstance(obj, dict):
                raise InputError(f"expected a JSON object, got {type(obj).__name__}", path, lineno)
            yield lineno, obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path)]


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temp file beside `path`; it replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is racy across threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_GUARD:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_file(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, default=str)
        fh.write("\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"invalid UTF-8 at byte {exc.start}", path) from None
    except RecursionError:
        raise InputError("JSON nested too deeply", path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON ({exc.msg})", path, exc.lineno) from None


# --------------------------------------------------------------------------- outputs: what may be replaced

PathLike = str | Path
# The inputs of a command: {"--queries": path, ...} (labels name them in errors) or a plain list of paths.
Inputs = Mapping[str, PathLike | None] | Iterable[PathLike | None]

MARKERS = ("manifest.json (an index)", "config.json of a training run", "derive.json", "run.json",
           "stats.json beside the .jsonl files of `rag data prepare`", "a checkpoint's state.json")
# Kinds that a folder may only be replaced by a folder of the same kind (a data set is never replaced by an index).
_SPECIFIC_KINDS = ("index", "training run", "corpus data", "checkpoint")


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def toolkit_kind(folder: str | Path) -> str | None:
    """What the toolkit wrote in `folder`, from the marker files its writers leave; None: not a toolkit folder.

    "training run" (config.json with kind and config, written by RunFolder), "index" (manifest.json with a
    kind, index.manifest), "corpus data" (derive.json of eval/corpus_variants, or stats.json beside .jsonl
    files: `rag data prepare` / `rag data derive`), "checkpoint" (state.json with a step beside
    weights.safetensors), "toolkit output" (a RunRecord's run.json, any other command's folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    config = _json_object(folder / "config.json")
    if config is not None and "kind" in config and "config" in config:
        return "training run"
    manifest = _json_object(folder / "manifest.json")
    if manifest is not None and "kind" in manifest:
        return "index"
    if _json_object(folder / "derive.json") is not None:
        return "corpus data"
    state = _json_object(folder / "state.json")
    if state is not None and "step" in state and (folder / "weights.safetensors").is_file():
        return "checkpoint"
    if _json_object(folder / "stats.json") is not None and any(folder.glob("*.jsonl")):
        return "corpus data"
    record = _json_object(folder / "run.json")
    if record is not None and "command" in record:
        return "toolkit output"
    return None


def _labelled(inputs: Inputs) -> list[tuple[str, Path]]:
    items = inputs.items() if isinstance(inputs, Mapping) else ((None, p) for p in inputs)
    return [(f"the input {label} {p}" if label else f"the input {p}", Path(p))
            for label, p in items if p is not None and str(p) != ""]


def _spellings(path: Path) -> set[Path]:
    """The path as written (made absolute) and with every link resolved: a check must hold for both."""
    return {Path(os.path.abspath(path)), path.resolve()}


def _protected_reason(out: Path) -> str | None:
    cwd = Path.cwd().resolve()
    try:
        home: Path | None = Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        home = None
    for target in _spellings(out):
        if target.parent == target:
            return "it is the filesystem root"
        if target == cwd:
            return "it is the working folder"
        if target in cwd.parents:
            return "it holds the working folder"
        if home is not None and target == home:
            return "it is the home folder"
        if home is not None and target in home.parents:
            return "it holds the home folder"
    return None


def _input_reason(out: Path, inputs: Inputs) -> str | None:
    targets = _spellings(out)
    for label, path in _labelled(inputs):
        for candidate in _spellings(path):
            if candidate in targets:
                return f"it is {label}"
            if any(t in candidate.parents for t in targets):
                return f"it holds {label}"
    return None


def check_output_location(out: str | Path, inputs: Inputs = ()) -> Path:
    """Refuse an output that is, or holds, the working folder, the home folder, the root or an input."""
    out = Path(out)
    reason = _protected_reason(out) or _input_reason(out, inputs)
    if reason:
        raise RagError(f"refusing to write {out}: {reason}; choose another output folder")
    return out


_refuse_protected = check_output_location


def _check_target(out: Path, overwrite: bool, inputs: Inputs, owned: bool = False) -> None:
    """Raise unless `out` may become the new output: absent, empty, or (with overwrite) a toolkit folder or one
    the caller's own record says it made (`owned`)."""
    _refuse_protected(out, inputs)
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise RagError(f"refusing to replace {out}: it is a file, not an output folder; choose another output folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise RagError(f"{out} already exists; pass --overwrite to replace it")
    if toolkit_kind(out) is None and not owned:
        raise RagError(f"refusing to replace {out}: the toolkit did not make it (it holds none of "
                       f"{', '.join(MARKERS)}); delete it yourself or choose another output folder")


def _check_same_kind(new: Path, out: Path) -> None:
    old_kind, new_kind = toolkit_kind(out), toolkit_kind(new)
    if old_kind in _SPECIFIC_KINDS and new_kind in _SPECIFIC_KINDS and old_kind != new_kind:
        raise RagError(f"refusing to replace {out}: it holds {old_kind}, and the new output is {new_kind}; "
                       "choose another output folder")


def _remove_tree(path: Path) -> None:
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except OSError as exc:
        logger.warning("could not delete the replaced output %s (%s); delete it yourself", path, exc)


def _trash_name(out: Path) -> Path:
    return out.parent / f".{out.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, ImportError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`. An old `out` is exchanged with the new one in one step where the system allows
    (then deleted under the staging name), else renamed aside first and deleted once the new one is in place."""
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700: give the output the usual permissions
    if not os.path.lexists(out):
        os.replace(staging, out)
        return
    if _exchange(staging, out):
        _remove_tree(staging)  # now the old output
        return
    trash = _trash_name(out)
    os.replace(out, trash)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(trash, out)
        raise
    _remove_tree(trash)


def prepare_output_dir(out: str | Path, overwrite: bool = False, *, inputs: Inputs = ()) -> Path:
    """Check that `out` may be (re)written; return it (not created yet).

    Refused, with a one-line RagError: the working folder, a folder holding it, the home folder, the root,
    an input or a folder holding one; an existing non-empty folder without `overwrite`; with `overwrite`,
    a folder the toolkit did not make (see `toolkit_kind`); an output another run is writing (its lock).
    A caller that stages elsewhere should finish with `move_into_place` (and hold `output_lock` throughout).
    """
    out = Path(out)
    _refuse_protected(out, inputs)
    if out.parent.is_dir():
        with output_lock(out):  # only checks: a run holding the lock makes this fail at once
            _check_target(out, overwrite, inputs)
    else:
        _check_target(out, overwrite, inputs)
    return out


def move_into_place(staging: str | Path, out: str | Path, overwrite: bool = False, *, inputs: Inputs = ()) -> Path:
    """Install a finished folder at `out` by rename, after the checks of `prepare_output_dir`.

    The old output (only a toolkit folder of the same kind) stays whole at `out` until the new one is renamed
    in: old -> a hidden trash name beside it, new -> `out`, then the trash is deleted.
    """
    staging, out = Path(staging), Path(out)
    with output_lock(out):
        _check_target(out, overwrite, inputs)
        _check_same_kind(staging, out)
        _swap_in(staging, out)
    return out


def remove_output_dir(out: str | Path, *, kind: str | None = None, inputs: Inputs = ()) -> None:
    """Delete a folder the toolkit made (of `kind`, if given), checked like `--overwrite`; absent is fine."""
    out = Path(out)
    _refuse_protected(out, inputs)
    if not os.path.lexists(out):
        return
    found = toolkit_kind(out)
    if found is None or (kind is not None and found != kind):
        what = "the toolkit did not make it" if found is None else f"it holds {found}, not {kind}"
        raise RagError(f"refusing to delete {out}: {what}; delete it yourself or choose another output folder")
    trash = _trash_name(out)
    os.replace(out, trash)
    _remove_tree(trash)


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, work_dir: str | Path | None = None, *,
               inputs: Inputs = (), owned: bool = False) -> Iterator[Path]:
    """Build a folder under a temp name beside `out` and rename it into place at the end.

    Checked first as in `prepare_output_dir`; `out`'s lock is held for the whole build, so a second build
    to the same `out` fails at once. A failure removes the temp folder, and an old `out` stays whole until
    the new one is complete (see `move_into_place`). The temp folder is private (0700) while it is built;
    the finished folder gets 0777 & ~umask. `work_dir` lets a caller keep a persistent staging folder (for
    resumable builds): it is kept on failure and renamed on success. `owned`: the caller's own record names
    `out` as its product (a training run's model/ in its run metadata), so with `overwrite` it is replaced
    although it carries no toolkit marker (a sentence-transformers folder does not).
    """
    out = Path(out)
    _refuse_protected(out, inputs)
    with output_lock(out):
        _check_target(out, overwrite, inputs, owned)
        keep_on_failure = work_dir is not None
        staging = (Path(work_dir) if work_dir is not None
                   else Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)))
        staging.mkdir(parents=True, exist_ok=True)
        try:
            yield staging
            _check_target(out, overwrite, inputs, owned)  # nothing else may have appeared at `out` meanwhile
            _check_same_kind(staging, out)
            _swap_in(staging, out)
        except BaseException:
            if not keep_on_failure:
                shutil.rmtree(staging, ignore_errors=True)
            raise


def check_output_file(out: str | Path, overwrite: bool = False, *, inputs: Inputs = (), flag: str = "--out") -> Path:
    """Check a file a command is about to write: never one of its inputs (nor inside an input folder), never a
    folder, and an existing file only with `overwrite`."""
    out = Path(out)
    reason = _input_reason(out, inputs)
    for label, path in _labelled(inputs):
        if reason is None and path.is_dir() and any(c in t.parents for c in _spellings(path) for t in _spellings(out)):
            reason = f"it is inside {label}"
    if reason:
        raise RagError(f"refusing to write {flag} {out}: {reason}")
    if out.is_dir():
        raise RagError(f"{flag} {out} is a folder; give the path of a file")
    if os.path.lexists(out) and not overwrite:
        raise RagError(f"{out} already exists; pass --overwrite to replace it")
    return out


# --------------------------------------------------------------------------- outputs: one writer at a time

_LOCKS: dict[str, list[Any]] = {}  # lock file -> [owning thread, depth, fd, pid]
_LOCKS_GUARD = threading.Lock()


def lock_path(path: str | Path) -> Path:
    """The lock file of an output: `.NAME.lock` beside it (its folder resolved, so every spelling agrees)."""
    path = Path(os.path.abspath(path))
    if not path.name:
        raise RagError(f"{path} cannot be an output")
    return path.parent.resolve() / f".{path.name}.lock"


def _busy(target: Path, owner: str) -> RagError:
    return RagError(f"{target} is being written by another run ({owner}); wait for it to finish or choose "
                    "another output")


def _held(key: str) -> list[Any] | None:
    """This process's entry for a lock (an entry inherited through fork belongs to the parent: dropped)."""
    held = _LOCKS.get(key)
    if held is not None and held[3] != os.getpid():
        del _LOCKS[key]
        with contextlib.suppress(OSError):
            os.close(held[2])  # the parent's lock stays: it still holds its own descriptor
        return None
    return held


def _acquire(lock: Path, target: Path) -> None:
    import fcntl

    key, me = str(lock), threading.get_ident()
    with _LOCKS_GUARD:
        held = _held(key)
        if held is not None:
            if held[0] != me:
                raise _busy(target, f"pid {os.getpid()}, another thread")
            held[1] += 1
            return
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    try:
                        owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                    finally:
                        os.close(fd)
                    raise _busy(target, f"pid {owner}" if owner else f"lock {lock}") from None
                except BaseException:
                    os.close(fd)
                    raise
                try:  # the previous holder may have removed the file between our open and our lock
                    same = os.path.samestat(os.fstat(fd), os.stat(lock))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as exc:
            raise RagError(f"cannot lock {target}: {exc.strerror or exc} ({lock})") from None
        _LOCKS[key] = [me, 1, fd, os.getpid()]


def _release(lock: Path) -> None:
    with _LOCKS_GUARD:
        held = _held(str(lock))
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _LOCKS[str(lock)]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # before unlocking: a waiter that opened this file sees it is gone and retries
        os.close(held[2])


def acquire_output_lock(path: str | Path) -> Path:
    """Take `path`'s lock until `release_output_lock` (or exit); see `output_lock`."""
    lock = lock_path(path)
    _acquire(lock, Path(path))
    return lock


def release_output_lock(lock: Path) -> None:
    _release(lock)


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of an output for the block; another holder makes it fail at once (RagError).

    The lock is `fcntl.flock` on `.NAME.lock` beside the output, holding "pid on host": the kernel drops it
    when its process dies, so a lock file left by a killed run is simply taken over. Re-entrant within a
    thread (a builder holding it may call `atomic_dir` on the same output); another thread is refused.
    """
    lock = acquire_output_lock(path)
    try:
        yield lock
    finally:
        release_output_lock(lock)


@atexit.register
def _release_all() -> None:
    for key in list(_LOCKS):
        held = _LOCKS.get(key)
        if held is not None and held[3] == os.getpid():
            held[1] = 1
            _release(Path(key))
