"""5. Throughput of one session, one way, and the CPU per MB behind it."""

from __future__ import annotations

import time

import psutil

from .clients import Conn
from .clients import Target
from .clients import append_event
from .clients import client_frame
from .plans import Plan
from .plans import log
from .stack import Stack
from .stack import alternate
from .stack import cpu_seconds


def _one_way(stack: Stack, target: Target, frame: bytes, payload_len: int, count: int) -> tuple[float, float]:
    """One round: (MB/s, CPU seconds per MB of the process doing the relaying's far end:
    the gateway worker for the gateway path, the simulator for the direct path)."""
    clear = client_frame(b'{"type":"input_audio_buffer.clear"}')
    with Conn(target) as conn:
        watched = stack.wait_live(1)[:1] if target.name == "gateway" else [psutil.Process(stack.sim.pid)]
        cpu0 = cpu_seconds(watched)
        t0 = time.perf_counter_ns()
        for _ in range(count):
            conn.sock.sendall(frame)
        conn.sock.sendall(clear)
        conn.recv_until(b'"input_audio_buffer.cleared"')
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        cpu1 = cpu_seconds(watched)
    megabytes = payload_len * count / 1e6
    cpu = sum(cpu1[pid] - cpu0[pid] for pid in cpu1 if pid in cpu0)
    return megabytes / elapsed, (cpu / megabytes if cpu >= 0.02 else None)  # CPU clocks tick at 10 ms


def measure_throughput(stack: Stack, plan: Plan) -> dict:
    """One session, one way (client → upstream): 32 KB append messages back to back, then a
    clear; the clock stops at `cleared`. MB/s (10^6 bytes) of message payload; rounds alternate."""
    payload = append_event(size=32768)
    frame = client_frame(payload)
    count = max(1, plan.throughput_mb * 1_000_000 // len(payload))
    _one_way(stack, stack.direct, frame, len(payload), max(1, count // 10))  # warm-up
    _one_way(stack, stack.gateway, frame, len(payload), max(1, count // 10))
    stack.wait_sessions_ended()
    rates, cpu = {"direct": [], "gateway": []}, {"direct": [], "gateway": []}
    for r in range(plan.throughput_rounds):
        for target in alternate(r, stack.direct, stack.gateway):
            rate, cpu_per_mb = _one_way(stack, target, frame, len(payload), count)
            rates[target.name].append(rate)
            cpu[target.name].append(cpu_per_mb)
            stack.wait_sessions_ended()
    best = {k: round(max(v), 1) for k, v in rates.items()}
    cpu = {k: [x for x in v if x is not None] for k, v in cpu.items()}
    worker_ms_per_mb = 1000 * min(cpu["gateway"]) if cpu["gateway"] else None
    out = {
        "unit": "MB/s",
        "message_bytes": len(payload),
        "messages_per_round": count,
        "rounds": plan.throughput_rounds,
        "direct_mb_s": best["direct"],
        "gateway_mb_s": best["gateway"],
        "direct_rounds": [round(x, 1) for x in rates["direct"]],
        "gateway_rounds": [round(x, 1) for x in rates["gateway"]],
        "ratio": round(best["gateway"] / best["direct"], 2) if best["direct"] else None,
        # what bounds each path: CPU per MB of the simulator (direct) and of the worker (gateway);
        # 1000 / worker ms per MB is the relay's own ceiling with a CPU to itself
        "sim_cpu_ms_per_mb": round(1000 * min(cpu["direct"]), 2) if cpu["direct"] else None,
        "worker_cpu_ms_per_mb": round(worker_ms_per_mb, 2) if worker_ms_per_mb else None,
        "worker_ceiling_mb_s": round(1000 / worker_ms_per_mb, 1) if worker_ms_per_mb else None,
    }
    log(f"throughput: direct {out['direct_mb_s']} MB/s, gateway {out['gateway_mb_s']} MB/s")
    return out
