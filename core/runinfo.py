"""Every command records what it ran: resolved config, package versions and timings."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from core.config import to_dict
from core.io import write_json
from core.versions import package_versions


class RunRecord:
    def __init__(self, command: str, config: Any) -> None:
        self.command = command
        self.config = to_dict(config) if config is not None else {}
        self.timings: dict[str, float] = {}
        self.extra: dict[str, Any] = {}
        self._start = time.perf_counter()

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)

    def as_dict(self) -> dict[str, Any]:
        return {"command": self.command, "argv": sys.argv, "config": self.config, "versions": package_versions(),
                "timings": {**self.timings, "total_s": round(time.perf_counter() - self._start, 3)}, **self.extra}

    def write(self, path: str | Path) -> None:
        write_json(path, self.as_dict())


def record_path_for(output: str | Path) -> Path:
    """Where a command's record goes: `run.json` in an output folder, `<file>.run.json` beside a file."""
    output = Path(output)
    return output / "run.json" if output.is_dir() else output.with_name(output.name + ".run.json")
