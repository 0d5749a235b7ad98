"""The machine and the code under test, and the CPU the rest of the machine used meanwhile."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import psutil


def machine_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "versions": {name: _version(name) for name in ("websockets", "uvicorn", "anyio", "uvloop", "psutil")},
        "load_generator_loop": _loop_name(),
    }


def code_version() -> dict:
    """The commit under test, and whether the working tree differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty)}


def tree_cpu_seconds() -> float:
    """CPU time of this process and everything under it, the reaped included."""
    total = 0.0
    for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def foreign_cpu_cores(busy_before: float, busy_after: float, ours: float, wall: float) -> float:
    """Cores' worth of CPU that processes outside the benchmark used during the run (others'
    tests, builds …): the machine's busy time minus the benchmark's own, per second."""
    return round(max(0.0, (busy_after - busy_before) - ours) / wall, 2) if wall > 0 else 0.0


def busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)


def cpu_steal_pct(before, after) -> float | None:
    """Share of CPU time the hypervisor took from this VM between two psutil.cpu_times()."""
    if not hasattr(before, "steal"):
        return None
    total = sum(after) - sum(before)
    return round(100 * (after.steal - before.steal) / total, 2) if total > 0 else None


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401

        return "uvloop"
    except ImportError:
        return "asyncio"
