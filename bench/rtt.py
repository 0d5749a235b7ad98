"""1. Round-trip latency added by a session, against a direct connection and the floor relay."""

from __future__ import annotations

import psutil

from .clients import Conn
from .clients import append_event
from .clients import client_frame
from .clients import text_event
from .plans import Plan
from .plans import log
from .profiles import Profiler
from .stack import Stack
from .stack import alternate
from .stack import cpu_seconds
from .stats import compare


def _per(after: dict, before: dict, pid: int | None, count: int) -> float | None:
    """µs of CPU per operation; None when the clock (10 ms ticks) saw too little to tell."""
    if pid not in after or pid not in before or after[pid] - before[pid] < 0.02:
        return None
    return round(1e6 * (after[pid] - before[pid]) / count, 1)


def measure_rtt(stack: Stack, plan: Plan, profiler: Profiler) -> dict:
    """Added round-trip latency through a session vs direct, echo mode, 1 KB and 32 KB events.

    One connection to each path stays open; each round times one echo on both, in alternating
    order (pairs interleaved, so drift cancels). Percentiles in µs; added = gateway − direct.
    A third connection goes through a byte-copying uvloop relay (bench/floor.py), timed in the
    same rounds: its added time is the floor for any Python relay on this machine."""
    cases = (("small_1k", text_event(1024), plan.rtt_small), ("large_32k", append_event(size=32768), plan.rtt_large))
    out = {}
    with (
        Conn(stack.direct, "sim_echo=1") as direct,
        Conn(stack.gateway, "sim_echo=1") as gateway,
        Conn(stack.floor, "sim_echo=1") as floor,
    ):
        watched = stack.wait_live(1)[:1] + [psutil.Process(stack.sim.pid)]
        for name, payload, pairs in cases:
            frame = client_frame(payload)
            for _ in range(plan.warmup):
                direct.roundtrip_ns(frame, len(payload))
                gateway.roundtrip_ns(frame, len(payload))
                floor.roundtrip_ns(frame, len(payload))
            times = {"direct": [], "gateway": [], "floor": []}
            with profiler.record(f"rtt-{name}-worker", watched[:-1]):
                cpu0 = cpu_seconds(watched)
                for i in range(pairs):
                    for conn, key in alternate(i, (direct, "direct"), (gateway, "gateway")):
                        times[key].append(conn.roundtrip_ns(frame, len(payload)) / 1000)
                    times["floor"].append(floor.roundtrip_ns(frame, len(payload)) / 1000)
                cpu1 = cpu_seconds(watched)
            worker_pid, sim_pid = (watched[0].pid if len(watched) == 2 else None), stack.sim.pid
            out[name] = {
                "bytes": len(payload),
                "pairs": pairs,
                "unit": "us",
                **compare(times["direct"], times["gateway"]),
                "floor_added": compare(times["direct"], times["floor"])["added"],
                # CPU behind the numbers: the gateway worker per round trip (two frames
                # relayed), the simulator per echo (both paths use it)
                "worker_cpu_us_per_roundtrip": _per(cpu1, cpu0, worker_pid, pairs),
                "sim_cpu_us_per_echo": _per(cpu1, cpu0, sim_pid, 2 * pairs),
            }
            log(f"rtt {name}: added p50 {out[name]['added']['p50']} µs, p99 {out[name]['added']['p99']} µs")
    stack.wait_sessions_ended()
    return out
