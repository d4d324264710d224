"""Where a worker's CPU goes: py-spy samples of a running worker, grouped by package.

A target the overhead section misses is explained from this profile: the same jobs run
through `llm.complete` and through the bare task, each sampled, and the self time of
every stack's innermost frame is charged to the package that frame belongs to.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_FRAME = re.compile(r"\((?P<file>[^():]+)(?::\d+)?\)\s*$")
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


@dataclass
class Profile:
    """Samples by package (the innermost frame's), out of `total`."""

    by_package: collections.Counter[str] = field(default_factory=collections.Counter)
    total: int = 0

    def share(self, package: str) -> float:
        """The fraction of samples charged to `package`."""
        return self.by_package[package] / self.total if self.total else 0.0


def py_spy() -> str | None:
    """The py-spy binary (a dev dependency), or None when it is not installed."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, run: Callable[[], None], *, out: Path, rate: int = 200) -> Profile:
    """Sample process `pid` (every thread, idle ones excluded) while `run()` runs."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    spy = subprocess.Popen(
        [
            *(binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"),
            *("--output", str(out), "--nonblocking", "--full-filenames"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        run()
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        _, errors = spy.communicate(timeout=60)
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile: {errors.decode(errors='replace')[-300:]}")
    return parse(out.read_text(errors="replace"))


def parse(text: str) -> Profile:
    """Read py-spy's raw (collapsed stack) output: `frame;frame;... count` per line."""
    profile = Profile()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        profile.by_package[package_of(leaf)] += int(count)
        profile.total += int(count)
    return profile


def package_of(frame: str) -> str:
    """`llmq`, an installed distribution's top-level package, or a stdlib module."""
    found = _FRAME.search(frame)
    if found is None:
        return "other"
    path = found.group("file")
    parts = Path(path).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            rest = parts[parts.index(marker) + 1 :]
            return rest[0].removesuffix(".py") if rest else "other"
    if "worker" in parts or "producer" in parts or path.startswith(("worker/", "producer/")):
        return "llmq"
    try:
        relative = Path(path).resolve().relative_to(_STDLIB)
    except ValueError:
        return "other"
    return f"stdlib:{relative.parts[0].removesuffix('.py')}"
