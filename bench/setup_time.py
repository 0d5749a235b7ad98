"""2. Connection set-up added by the gateway, connect → `session.created`, sequential and in bursts."""

from __future__ import annotations

import time

from .clients import Conn
from .clients import open_burst
from .clients import open_burst_counted
from .clients import run_async
from .plans import Plan
from .plans import log
from .profiles import Profiler
from .stack import Stack
from .stack import alternate
from .stats import compare
from .timeline import read_sessions
from .timeline import summarize


def measure_setup(stack: Stack, plan: Plan, profiler: Profiler) -> dict:
    """Added set-up time, connect → `session.created`, sequential and in concurrent bursts.

    Sequential: one connection at a time, closed (close handshake) before the next, direct and
    gateway alternating; a short pause lets the previous session's teardown finish. Bursts:
    `burst_size` opens at once on an asyncio client, per-connection times and the burst's wall
    time; the gateway's workers are left to exit before the next burst. Milliseconds."""
    seq = {"direct": [], "gateway": []}
    roles = stack.roles()
    seq_since = time.time()
    with (
        profiler.record("setup-frontdoor", [roles["frontdoor"]]),
        profiler.record("setup-supervisor", [roles["supervisor"]]),
    ):
        for i in range(plan.setup_sequential):
            for target in alternate(i, stack.direct, stack.gateway):
                conn = Conn(target)
                seq[target.name].append(conn.setup_ns / 1e6)
                conn.close()
            time.sleep(0.02)
    stack.wait_sessions_ended()
    seq_timeline = summarize(read_sessions(stack.tmp / "gateway.err", seq_since))
    burst = {"direct": [], "gateway": []}
    walls = {"direct": [], "gateway": []}
    for r in range(plan.burst_rounds):
        for target in alternate(r, stack.direct, stack.gateway):
            times, wall = run_async(open_burst(target, plan.burst_size))
            burst[target.name] += times
            walls[target.name].append(wall)
            stack.wait_sessions_ended()
            time.sleep(0.2)
    bursts = [_burst_figure(stack, plan, size) for size in plan.burst_sizes]
    since = time.time()
    run_async(open_burst_counted(stack.gateway, plan.burst_size))  # one more, for its timeline
    stack.wait_sessions_ended()
    timeline = summarize(read_sessions(stack.tmp / "gateway.err", since))
    out = {
        "unit": "ms",
        "bursts": bursts,
        "timeline": timeline,
        "sequential_timeline": seq_timeline,
        "sequential": {"connections": plan.setup_sequential, **compare(seq["direct"], seq["gateway"], 3)},
        "burst": {
            "size": plan.burst_size,
            "rounds": plan.burst_rounds,
            **compare(burst["direct"], burst["gateway"], 3),
            "wall_ms": {k: round(sum(v) / len(v), 1) for k, v in walls.items()},
        },
    }
    log(
        f"setup: sequential added p50 {out['sequential']['added']['p50']} ms; "
        f"burst added p50 {out['burst']['added']['p50']} ms; "
        + "; ".join(f"burst of {b['size']} wall {b['wall_ms']} ms" for b in bursts)
    )
    return out


def _burst_figure(stack: Stack, plan: Plan, size: int) -> dict:
    """The burst figure: `size` connects at once, wall time until all have `session.created`,
    per-session p50/p99, refusals counted; `burst_rounds` per path, paths alternating."""
    times = {"direct": [], "gateway": []}
    walls = {"direct": [], "gateway": []}
    refused = {"direct": 0, "gateway": 0}
    for r in range(plan.burst_rounds):
        for target in alternate(r, stack.direct, stack.gateway):
            got, wall, failed = run_async(open_burst_counted(target, size))
            times[target.name] += got
            walls[target.name].append(wall)
            refused[target.name] += failed
            stack.wait_sessions_ended()
            time.sleep(0.2)
    if not times["direct"] or not times["gateway"]:
        return {"size": size, "rounds": plan.burst_rounds, "refused": refused, "wall_ms": walls}
    return {
        "size": size,
        "rounds": plan.burst_rounds,
        **compare(times["direct"], times["gateway"], 3),
        "wall_ms": {k: round(sum(v) / len(v), 1) for k, v in walls.items()},
        "wall_ms_max": {k: round(max(v), 1) for k, v in walls.items()},
        "refused": refused,
    }
