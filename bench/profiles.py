"""Optional py-spy profiles of chosen processes while a measurement runs (MESHRT_BENCH_PROFILE=DIR)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from .plans import BenchError
from .plans import log


class Profiler:
    """py-spy CPU samples (`--gil`: only while a thread runs Python, so idle waits don't count)
    of chosen processes while a measurement runs: folded stacks in DIR/<name>.txt and the
    hottest frames in DIR/<name>.summary.txt. Off unless MESHRT_BENCH_PROFILE names a
    directory; py-spy must be installed (`pip install py-spy`). py-spy pauses the process for
    each sample (exact stacks, slower process), so take the numbers of a run without profiles
    and the profiles of another."""

    def __init__(self, directory: str | None):
        self.dir = Path(directory) if directory else None
        self.capacity_profiled = False
        self.spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if self.dir is not None:
            if not Path(self.spy).exists():
                raise BenchError("MESHRT_BENCH_PROFILE is set but py-spy is not installed (pip install py-spy)")
            self.dir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def record(self, name: str, procs: list[psutil.Process]):
        if self.dir is None or not procs:
            yield
            return
        parts = [self.dir / f"{name}-{p.pid}.txt" for p in procs]
        spies = [
            subprocess.Popen(
                [self.spy, "record", "-p", str(p.pid), "-r", "997", "--gil", "-f", "raw", "-o", str(part)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for p, part in zip(procs, parts)
        ]
        time.sleep(1.0)  # attached
        try:
            yield
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
            merged = "".join(part.read_text() for part in parts if part.exists())
            for part in parts:
                part.unlink(missing_ok=True)
            (self.dir / f"{name}.txt").write_text(merged)
            (self.dir / f"{name}.summary.txt").write_text(summarize_folded(merged))
            log(f"profile {name}: {self.dir / (name + '.summary.txt')}")


def summarize_folded(folded: str, top: int = 40) -> str:
    """Inclusive and self share of samples per frame (file:line), from py-spy's raw output."""
    inclusive, leaf, total = {}, {}, 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), [_short_frame(f) for f in stack.split(";")]
        total += n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
    if not total:
        return "no samples\n"
    out = [f"{total} samples (py-spy --gil: CPU running Python)", "", "inclusive:"]
    out += [f"{100 * n / total:6.1f}%  {f}" for f, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", "self:"]
    out += [f"{100 * n / total:6.1f}%  {f}" for f, n in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out) + "\n"


def _short_frame(frame: str) -> str:
    return re.sub(r"\((?:.*/)?(site-packages|python3\.\d+|main)/", "(", frame)
