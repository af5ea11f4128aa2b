"""Start a quiet local Ray, or join a running cluster, for the length of a `with` block.

`ray_session()` starts a local Ray with no dashboard and worker output kept off the driver's
terminal; its session files go into a fresh folder (under `temp_dir` or a short system temp) that is
removed on exit. Ray puts unix sockets under that folder (`<root>/session_<date>_<pid>/sockets/...`),
and AF_UNIX paths are limited to 107 bytes, so the root must stay short: a long one is refused here
with a clear message instead of failing deep inside Ray. `ray_session(address=...)` joins an existing
cluster instead and leaves it running. If Ray is already initialised in this process (a caller's own
session), that one is reused and left alone.

Ray 2.60 quirks: a local `ray.init` turns on token authentication by default (it writes
~/.ray/auth_token once and logs a warning; set RAY_AUTH_MODE=disabled to opt out) and its servers
listen on all interfaces; Ray's SIGTERM handler exits through `sys.exit`, so this block's cleanup
also runs when the build is terminated (SIGKILL leaves the session folder behind).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.errors import RagError

logger = logging.getLogger(__name__)

# Ray's own layout below the root: "/session_2025-01-01_00-00-00_123456_1234567/sockets/plasma_store" is ~70
# bytes, and the limit is 107; keep the root at or below this many bytes.
MAX_TEMP_ROOT = 36
DEFAULT_TEMP_PARENT = "/tmp"


def _short_parent(temp_dir: str | os.PathLike | None) -> Path:
    if temp_dir is not None:
        return Path(temp_dir).expanduser().resolve()
    system = Path(tempfile.gettempdir()).resolve()
    # The system temp may be long (e.g. macOS /var/folders/...); fall back to /tmp then.
    return system if len(str(system)) + 12 <= MAX_TEMP_ROOT else Path(DEFAULT_TEMP_PARENT)


def make_temp_root(temp_dir: str | os.PathLike | None = None) -> Path:
    """A fresh, short folder for one Ray session's files (`<parent>/ray-XXXXXXXX`)."""
    parent = _short_parent(temp_dir)
    if len(str(parent)) + 12 > MAX_TEMP_ROOT:
        raise RagError(f"Ray temp folder parent {str(parent)!r} is too long for Ray's unix sockets "
                       f"(keep it at most {MAX_TEMP_ROOT - 12} characters, e.g. /tmp/ray-x)")
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="ray-", dir=parent))


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                temp_dir: str | os.PathLike | None = None, **init_kwargs: Any) -> Iterator[Any]:
    """Yield the `ray` module with Ray running; shut down and clean up what this call started."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None  # Ray's own convention for "join, don't start"
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING,
                              "configure_logging": True, **init_kwargs}
    root: Path | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            if address:
                ray.init(address=address, **common)
            else:
                root = make_temp_root(temp_dir)
                ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(root), **common)
    except Exception as exc:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        if isinstance(exc, RagError):
            raise
        where = f"join the Ray cluster at {address}" if address else "start a local Ray"
        raise RagError(f"could not {where}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
