"""4. Capacity: a ramp of audio-rate sessions, probed for added latency, with the gateway's CPU."""

from __future__ import annotations

import time

import psutil

from .clients import Conn
from .clients import append_event
from .clients import client_frame
from .clients import text_event
from .loadgen import APPEND_PCM_BYTES
from .loadgen import APPEND_PERIOD_S
from .loadgen import RESPONSE_EVERY_S
from .loadgen import RESPONSE_MS
from .loadgen import LoadGen
from .machine import busy_seconds
from .machine import foreign_cpu_cores
from .plans import BenchError
from .plans import Plan
from .plans import log
from .profiles import Profiler
from .stack import Stack
from .stack import alternate
from .stack import cpu_seconds
from .stats import compare

P99_TARGET_US = 5000.0  # capacity: a step holds while the probes' p99 added latency is below this


def probe(direct: Conn, gateway: Conn, seconds: float, interval_s: float = 0.005) -> tuple[list, list]:
    """Interleaved 1 KB echo round trips on both paths for `seconds`, one pair per interval."""
    payload = text_event(1024)
    frame = client_frame(payload)
    times = {"direct": [], "gateway": []}
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        for conn, key in alternate(i, (direct, "direct"), (gateway, "gateway")):
            times[key].append(conn.roundtrip_ns(frame, len(payload)) / 1000)
        i += 1
        pause = start + i * interval_s - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return times["direct"], times["gateway"]


def _capacity_step(
    stack: Stack, plan: Plan, loadgen: LoadGen, n: int, direct: Conn, gateway: Conn, profiler: Profiler
) -> dict:
    opened = loadgen.open(n)
    time.sleep(plan.settle_s)
    loadgen.stats(reset=True)
    roles = stack.roles()
    gateway_procs = list(roles.values()) + stack.zygote_children()
    others = [psutil.Process(stack.sim.pid), psutil.Process()] + [psutil.Process(pid) for pid in loadgen.pids()]
    # profiles (when asked for) of the first step with ≥ 30 sessions: four workers, the supervisor
    profiled = n >= 30 and not profiler.capacity_profiled
    profiler.capacity_profiled |= profiled
    with (
        profiler.record(f"capacity-{n}-workers", stack.workers()[:4] if profiled else []),
        profiler.record(f"capacity-{n}-supervisor", [stack.roles()["supervisor"]] if profiled else []),
    ):
        cpu0, other0, busy0, t0 = cpu_seconds(gateway_procs), cpu_seconds(others), busy_seconds(), time.monotonic()
        d, g = probe(direct, gateway, plan.hold_s)
        wall = time.monotonic() - t0
        cpu1, other1, busy1 = cpu_seconds(gateway_procs), cpu_seconds(others), busy_seconds()
    stats = loadgen.stats(reset=True)
    role_of = {proc.pid: role for role, proc in roles.items()}
    by_role: dict[str, float] = {}
    for pid in cpu1:
        if pid in cpu0:
            role = role_of.get(pid, "workers")
            by_role[role] = by_role.get(role, 0.0) + cpu1[pid] - cpu0[pid]
    gateway_cpu = sum(by_role.values())
    other_cpu = sum(other1[pid] - other0[pid] for pid in other1 if pid in other0)
    rtt = compare(d, g)
    live = stats["live"]
    rate = stats["appends"] / max(live, 1) / stats["elapsed_s"]
    step = {
        "sessions": n,
        "live": live,
        "dropped": stats["dropped"],
        "failed_opens": opened["failed"],
        "appends_per_session_s": round(rate, 1),
        "rx_kb_per_session_s": round(stats["rx_bytes"] / max(live, 1) / stats["elapsed_s"] / 1000, 1),
        "responses": stats["responses"],
        "loadgen_max_lag_ms": stats["max_lag_ms"],
        "loadgen_skipped_slots": stats["skipped_slots"],
        "probe_pairs": len(d),
        "probe_us": rtt,
        "gateway_cpu_cores": round(gateway_cpu / wall, 3),
        "cpu_per_session_pct": round(100 * gateway_cpu / wall / max(live, 1), 3),
        "cpu_per_session_pct_by_role": {
            role: round(100 * cpu / wall / max(live, 1), 3) for role, cpu in sorted(by_role.items())
        },
        "sim_and_loadgen_cpu_cores": round(other_cpu / wall, 3),  # and the probing client
        "foreign_cpu_cores": foreign_cpu_cores(busy0, busy1, gateway_cpu + other_cpu, wall),
    }
    step["held"] = live == n and stats["dropped"] == 0 and rate >= 0.95 / APPEND_PERIOD_S
    # Past this the box itself (simulator, load generator and gateway share its CPUs) is
    # saturated: the direct baseline is over the threshold and "added" means nothing any more.
    step["baseline_ok"] = rtt["direct"]["p99"] < P99_TARGET_US
    step["pass"] = step["held"] and step["baseline_ok"] and rtt["added"]["p99"] < P99_TARGET_US
    return step


def measure_capacity(stack: Stack, plan: Plan, profiler: Profiler) -> dict:
    """Ramp audio-rate sessions (see the module docstring) through the steps of the plan; at
    each step, after a settle time, probe 1 KB echo round trips (direct and gateway) for
    `hold_s` and account the gateway's CPU. A step passes when every session is held at audio
    rate (≥ 95 % of 50 appends/s), the probes' p99 added latency is under the threshold and the
    direct probe's own p99 is too (else the box, shared by simulator, load generator and
    gateway, is saturated and no "added" figure means anything). Stops after two failing steps
    in a row, a step not held, a p99 (added or direct) past 2× the threshold, or once the time
    budget is spent. Reports the most sessions of a passing step."""
    loadgen = LoadGen(plan.loadgen_procs, stack.gateway)
    steps: list[dict] = []
    stopped = "cap reached"
    started = time.monotonic()
    try:
        with Conn(stack.direct, "sim_echo=1") as direct, Conn(stack.gateway, "sim_echo=1") as gateway:
            probe(direct, gateway, 0.3)  # warm-up
            loadgen.stream(True)
            fails = 0
            for n in plan.capacity_steps:
                if time.monotonic() - started > plan.capacity_budget_s:
                    stopped = f"time budget ({plan.capacity_budget_s:g} s) spent"
                    break
                try:
                    step = _capacity_step(stack, plan, loadgen, n, direct, gateway, profiler)
                except (OSError, BenchError) as exc:  # a probe lost its echo: far past saturation
                    stopped = f"probe failed at {n} sessions: {exc!r}"
                    break
                steps.append(step)
                log(
                    f"capacity {n}: live {step['live']}, appends/s {step['appends_per_session_s']}, "
                    f"added p99 {step['probe_us']['added']['p99']} µs, CPU/session "
                    f"{step['cpu_per_session_pct']} %, {'pass' if step['pass'] else 'FAIL'}"
                )
                fails = 0 if step["pass"] else fails + 1
                if not step["held"]:
                    stopped = f"sessions not held at audio rate at {n}"
                    break
                if (
                    fails >= 2
                    or step["probe_us"]["added"]["p99"] > 2 * P99_TARGET_US
                    or step["probe_us"]["direct"]["p99"] > 2 * P99_TARGET_US
                ):
                    stopped = (
                        f"p99 past the threshold at {n}"
                        if step["baseline_ok"]
                        else f"the direct baseline's own p99 past the threshold at {n} (box saturated)"
                    )
                    break
            loadgen.close_all()
    finally:
        loadgen.stop()
    stack.wait_sessions_ended(timeout=60)
    passing = [s for s in steps if s["pass"]]
    best = max(passing, key=lambda s: s["sessions"]) if passing else None
    if not steps:
        raise BenchError(f"capacity: no step completed ({stopped})")
    return {
        "threshold_p99_added_us": P99_TARGET_US,
        "cap": max(plan.capacity_steps),
        "append_bytes": len(append_event(pcm_bytes=APPEND_PCM_BYTES)),
        "appends_per_s": 1 / APPEND_PERIOD_S,
        "response_every_s": RESPONSE_EVERY_S,
        "response_ms": RESPONSE_MS,
        "loadgen_procs": plan.loadgen_procs,
        "max_sessions": best["sessions"] if best else 0,
        "cpu_per_session_pct": best["cpu_per_session_pct"] if best else None,
        # sessions one core could carry at the measured gateway CPU per session
        "sessions_per_core": (
            round(100 / best["cpu_per_session_pct"], 1) if best and best["cpu_per_session_pct"] else None
        ),
        "stopped": stopped,
        "steps": steps,
    }
