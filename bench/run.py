"""`meshrt bench`'s entry: starts the stack, runs the selected measurements, writes the document."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import psutil

from .capacity import measure_capacity
from .machine import busy_seconds
from .machine import code_version
from .machine import cpu_steal_pct
from .machine import foreign_cpu_cores
from .machine import machine_info
from .machine import tree_cpu_seconds
from .memory import measure_memory
from .plans import BenchError
from .plans import Plan
from .plans import choose_plan
from .plans import log
from .pool_step import measure_pool_step
from .profiles import Profiler
from .report import render
from .report import targets_report
from .rtt import measure_rtt
from .setup_time import measure_setup
from .stack import Stack
from .throughput import measure_throughput
from .translation import measure_translation
from .wan import measure_wan


@contextmanager
def _stack(settings, plan: Plan):
    stack = Stack(settings, plan)
    ok = False
    try:
        yield stack.start()
        ok = True
    finally:
        stack.stop(keep=not ok)
        if not ok:
            log(f"logs kept in {stack.tmp}")


def selected_measurements(known) -> list[str]:
    """All of them, or those MESHRT_BENCH_ONLY lists (e.g. "rtt,capacity"), in the usual order."""
    raw = os.environ.get("MESHRT_BENCH_ONLY", "").strip()
    if not raw:
        return list(known)
    wanted = {w.strip() for w in raw.split(",") if w.strip()}
    unknown = wanted - set(known)
    if unknown:
        raise BenchError(
            f"MESHRT_BENCH_ONLY: unknown measurement(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}"
        )
    return [name for name in known if name in wanted]


def run_bench(settings, args) -> int:
    plan = choose_plan(args)
    started = time.monotonic()
    doc = {
        "meshrt_bench": 1,
        "plan": plan.name,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "code": code_version(),
        "config": {"worker_backend": settings.worker_backend, "preauth": settings.preauth, "plan": asdict(plan)},
    }
    cpu_before, busy_before, ours_before = psutil.cpu_times(), busy_seconds(), tree_cpu_seconds()
    doc["machine"]["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        with _stack(settings, plan) as stack:
            log(f"simulator on :{stack.direct.port}, gateway on :{stack.gateway.port} ({plan.name} plan)")
            profiler = Profiler(os.environ.get("MESHRT_BENCH_PROFILE"))
            doc["profiles"] = str(profiler.dir) if profiler.dir else None
            measurements = {
                "rtt": lambda: measure_rtt(stack, plan, profiler),
                "setup": lambda: measure_setup(stack, plan, profiler),
                "memory": lambda: measure_memory(stack, plan),
                "throughput": lambda: measure_throughput(stack, plan),
                "capacity": lambda: measure_capacity(stack, plan, profiler),
                "pool": lambda: measure_pool_step(stack, plan),
                "translation": lambda: measure_translation(plan),
                "wan": lambda: measure_wan(settings, plan),
            }
            for name in selected_measurements(measurements):
                doc[name] = measurements[name]()
            # what the rest of the machine did meanwhile, taken before the stack's processes go
            ours, busy_after, measured_s = tree_cpu_seconds() - ours_before, busy_seconds(), time.monotonic() - started
            doc["machine"]["cpu_steal_pct_during_run"] = cpu_steal_pct(cpu_before, psutil.cpu_times())
            doc["machine"]["foreign_cpu_cores_during_run"] = foreign_cpu_cores(
                busy_before, busy_after, ours, measured_s
            )
    except (BenchError, OSError) as exc:
        print(f"meshrt bench: {exc}", file=sys.stderr)
        return 1
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["targets"] = targets_report(doc)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0
