"""3. Memory of each session's worker, idle and streaming, and of the other gateway processes."""

from __future__ import annotations

import time

from .loadgen import LoadGen
from .plans import BenchError
from .plans import Plan
from .plans import log
from .stack import Stack
from .stack import memory_mib
from .stats import summary


def _memory_table(samples: list[dict]) -> dict:
    return {k: summary([s[k] for s in samples], 2) for k in ("uss", "pss", "rss")}


def measure_memory(stack: Stack, plan: Plan) -> dict:
    """USS/PSS per worker with `memory_sessions` sessions open and idle, then the per-worker
    maximum over samples (30 of them, ≥ 0.5 s apart) while they stream audio at 50 appends/s and receive
    paced responses; plus the supervisor, front door and zygote, and the zygote's pre-forked
    idle workers (no session yet) if it keeps any. MiB (2^20 bytes)."""
    loadgen = LoadGen(1, stack.gateway)
    try:
        opened = loadgen.open(plan.memory_sessions)
        if opened["live"] < plan.memory_sessions:
            raise BenchError(f"memory: opened only {opened['live']} of {plan.memory_sessions} sessions")
        time.sleep(1.0)
        workers = stack.wait_live(plan.memory_sessions)
        idle = [m for m in map(memory_mib, workers) if m]
        session_pids = {p.pid for p in workers}
        warm = [m for m in map(memory_mib, (p for p in stack.zygote_children() if p.pid not in session_pids)) if m]
        roles_idle = {role: memory_mib(p) for role, p in stack.roles().items()}
        loadgen.stream(True)
        peak: dict[int, dict] = {}
        deadline = time.monotonic() + plan.stream_s
        while time.monotonic() < deadline:
            time.sleep(max(0.5, plan.stream_s / 30))
            for proc in stack.workers():
                m = memory_mib(proc)
                if m:
                    old = peak.get(proc.pid)
                    peak[proc.pid] = m if old is None else {k: max(old[k], m[k]) for k in m}
        stats = loadgen.stats()
        roles_streaming = {role: memory_mib(p) for role, p in stack.roles().items()}
        loadgen.close_all()
    finally:
        loadgen.stop()
    stack.wait_sessions_ended()
    out = {
        "unit": "MiB",
        "sessions": plan.memory_sessions,
        "stream_s": plan.stream_s,
        "responses_during_streaming": stats["responses"],
        "worker_idle": _memory_table(idle),
        "worker_streaming": _memory_table(list(peak.values())),
        "warm_workers": len(warm),
        "warm_worker": _memory_table(warm) if warm else None,
        "processes_idle": {r: {k: round(v, 2) for k, v in m.items()} for r, m in roles_idle.items() if m},
        "processes_streaming": {r: {k: round(v, 2) for k, v in m.items()} for r, m in roles_streaming.items() if m},
    }
    log(
        f"memory: worker USS idle p50 {out['worker_idle']['uss']['p50']} MiB, "
        f"streaming p50 {out['worker_streaming']['uss']['p50']} MiB"
    )
    return out
