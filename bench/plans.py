"""How much a run measures: the full, quick and smoke plans. Also what every part of a run
shares: its error and its progress log.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Plan:
    name: str
    rtt_small: int  # interleaved round-trip pairs, 1 KB
    rtt_large: int  # interleaved round-trip pairs, 32 KB
    warmup: int
    setup_sequential: int  # sequential opens per path
    burst_size: int
    burst_rounds: int  # bursts per path
    memory_sessions: int
    stream_s: float  # memory sampling window while streaming
    capacity_steps: tuple[int, ...]
    settle_s: float
    hold_s: float
    capacity_budget_s: float  # the ramp starts no new step after this
    throughput_mb: int  # per round
    throughput_rounds: int
    loadgen_procs: int
    # the warm pool under a step in arrivals: (sessions/s, seconds) phases, each session held
    # pool_hold_s, then pool_tail_s of nothing (bench/pool_step.py)
    pool_phases: tuple[tuple[float, float], ...] = ((1.0, 20.0), (20.0, 20.0), (1.0, 40.0))
    pool_hold_s: float = 1.0
    pool_tail_s: float = 0.0
    burst_sizes: tuple[int, ...] = (50, 100)  # the burst figure: wall time until all have session.created
    wan_rtt_ms: float = 30.0  # the WAN-delayed simulator's round trip (bench/wan.py)
    wan_sequential: int = 100  # sequential opens per path over it
    wan_burst_rounds: int = 3  # bursts of burst_size per path over it


# The three plans (counts, seconds), a table kept compact: the formatter leaves it alone.
# fmt: off
FULL = Plan("full", rtt_small=20000, rtt_large=3000, warmup=500, setup_sequential=300, burst_size=100,
            burst_rounds=5, memory_sessions=50, stream_s=60.0, settle_s=3.0, hold_s=5.0,
            capacity_steps=(10, 20, 30, 40, 50, 60, 70, 80, 100, 125, 150, 200, 300, 400, 600, 800, 1000),
            capacity_budget_s=480, throughput_mb=64, throughput_rounds=5, loadgen_procs=2)
QUICK = Plan("quick", rtt_small=2000, rtt_large=300, warmup=200, setup_sequential=30, burst_size=100,
             burst_rounds=1, memory_sessions=10, stream_s=3.0, settle_s=1.0, hold_s=2.0,
             capacity_steps=(10, 25, 50, 100), capacity_budget_s=20, throughput_mb=16, throughput_rounds=2,
             loadgen_procs=1, pool_phases=((1.0, 5.0), (20.0, 5.0), (1.0, 5.0)), wan_sequential=30,
             wan_burst_rounds=1)
SMOKE = Plan("smoke", rtt_small=200, rtt_large=40, warmup=20, setup_sequential=5, burst_size=10, burst_rounds=1,
             memory_sessions=3, stream_s=1.5, settle_s=0.5, hold_s=1.0, capacity_steps=(3, 6), capacity_budget_s=15,
             throughput_mb=2, throughput_rounds=1, loadgen_procs=1, pool_phases=((1.0, 1.0), (10.0, 1.0), (1.0, 1.0)),
             pool_hold_s=0.2, burst_sizes=(5, 10), wan_sequential=4, wan_burst_rounds=1)
# fmt: on


def choose_plan(args) -> Plan:
    if os.environ.get("MESHRT_BENCH_SMOKE", "").strip() in ("1", "true", "yes"):
        return SMOKE
    return QUICK if getattr(args, "quick", False) else FULL


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
