"""6. The warm pool under a step in arrivals: sessions arrive at one rate, then a higher one, then
the first again (Poisson, seeded); each is held a moment and closed. Per phase: set-up time
(connect → `session.created`), and over time the pool's size, its target, the arrival rate it
measured and the workers' PSS, as the gateway's /metrics reports them."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import urllib.request

from .clients import AsyncSession
from .clients import close_sessions
from .clients import run_async
from .plans import BenchError
from .plans import Plan
from .plans import log
from .stack import Stack
from .stats import summary

GAUGES = (
    "meshrt_live_sessions",
    "meshrt_warm_workers",
    "meshrt_warm_workers_target",
    "meshrt_session_arrival_rate",
    "meshrt_workers",
    "meshrt_workers_pss_bytes",
    "meshrt_warm_workers_pss_bytes",
    "meshrt_warm_worker_setup_seconds",
    "meshrt_sessions_from_pool_total",
    "meshrt_sessions_forked_total",
)
SAMPLE_S = 0.5
MAX_OPEN = 200  # sessions held at once at most: the run stays bounded whatever the plan says


def read_gauges(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in GAUGES:
            out[parts[0]] = float(parts[1])
    return out


class Sampler(threading.Thread):
    """/metrics every SAMPLE_S, off the event loop that times the sessions."""

    def __init__(self, port: int, t0: float):
        super().__init__(daemon=True)
        self.port, self.t0 = port, t0
        self.samples: list[dict] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                gauges = read_gauges(self.port)
            except OSError:
                gauges = None
            if gauges:
                self.samples.append({"t": round(time.monotonic() - self.t0, 2), **gauges})
            self.stopping.wait(SAMPLE_S)


async def _one(target, hold_s: float, started: float, results: list, gate: asyncio.Semaphore) -> None:
    async with gate:
        session = AsyncSession(target)
        try:
            setup_ns = await session.open()
            results.append((started, setup_ns / 1e6))
            await asyncio.sleep(hold_s)
        except (BenchError, OSError, asyncio.TimeoutError):
            results.append((started, None))
        finally:
            await close_sessions([session])


async def _arrivals(target, phases, hold_s: float, t0: float, seed: int) -> list:
    rng = random.Random(seed)
    results: list = []
    tasks = []
    gate = asyncio.Semaphore(MAX_OPEN)
    phase_start = 0.0
    for rate, seconds in phases:
        t = phase_start + rng.expovariate(rate)
        while t < phase_start + seconds:
            delay = t0 + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_one(target, hold_s, time.monotonic() - t0, results, gate)))
            t += rng.expovariate(rate)
        phase_start += seconds
    await asyncio.gather(*tasks)
    return results


def _phase_of(t: float, phases) -> int:
    end = 0.0
    for i, (_, seconds) in enumerate(phases):
        end += seconds
        if t < end:
            return i
    return len(phases) - 1


def measure_pool_step(stack: Stack, plan: Plan) -> dict:
    """Set-up ms per phase; the pool and PSS (MiB) over time, as /metrics reports them."""
    phases = plan.pool_phases
    stack.wait_sessions_ended()
    t0 = time.monotonic()
    sampler = Sampler(stack.gateway.port, t0)
    sampler.start()
    try:
        results = run_async(_arrivals(stack.gateway, phases, plan.pool_hold_s, t0, seed=15))
        time.sleep(plan.pool_tail_s)  # the step down: how the pool shrinks after it
    finally:
        sampler.stopping.set()
        sampler.join(10)
    stack.wait_sessions_ended()
    samples = sampler.samples
    out_phases = []
    start = 0.0
    for i, (rate, seconds) in enumerate(phases):
        setups = [ms for t, ms in results if ms is not None and _phase_of(t, phases) == i]
        failed = sum(1 for t, ms in results if ms is None and _phase_of(t, phases) == i)
        in_phase = [s for s in samples if start <= s["t"] < start + seconds]
        forked = _delta(samples, start, start + seconds, "meshrt_sessions_forked_total")
        out_phases.append(
            {
                "rate_per_s": rate,
                "seconds": seconds,
                "sessions": len(setups),
                "failed": failed,
                "forked_on_the_spot": forked,  # pool misses (as /metrics saw them, ±1 s)
                "setup_ms": summary(setups, 2) if setups else None,
                "warm_workers": _range(in_phase, "meshrt_warm_workers"),
                "target": _range(in_phase, "meshrt_warm_workers_target"),
                "workers_pss_mib": _range(in_phase, "meshrt_workers_pss_bytes", 2**20),
            }
        )
        start += seconds
    timeline = [
        {
            "t": s["t"],
            "live": int(s.get("meshrt_live_sessions", 0)),
            "idle": int(s.get("meshrt_warm_workers", 0)),
            "target": int(s.get("meshrt_warm_workers_target", 0)),
            "rate": s.get("meshrt_session_arrival_rate", 0.0),
            "pss_mib": round(s.get("meshrt_workers_pss_bytes", 0) / 2**20, 1),
            "idle_pss_mib": round(s.get("meshrt_warm_workers_pss_bytes", 0) / 2**20, 1),
        }
        for s in samples
    ]
    out = {
        "unit": "ms",
        "hold_s": plan.pool_hold_s,
        "tail_s": plan.pool_tail_s,
        "phases": out_phases,
        "setup_s_measured": samples[-1].get("meshrt_warm_worker_setup_seconds") if samples else None,
        "timeline": timeline,
    }
    log(
        "pool: "
        + "; ".join(
            f"{p['rate_per_s']:g}/s set-up p50 {p['setup_ms']['p50'] if p['setup_ms'] else '-'} ms, "
            f"idle {p['warm_workers']['min']}–{p['warm_workers']['max']}"
            for p in out_phases
        )
    )
    return out


def _delta(samples: list[dict], start: float, end: float, key: str) -> int | None:
    """How much a counter grew between the last sample before `start` and the last before `end`."""
    before = [s[key] for s in samples if s["t"] < start and key in s]
    upto = [s[key] for s in samples if s["t"] < end and key in s]
    if not upto:
        return None
    return int(upto[-1] - (before[-1] if before else 0))


def _range(samples: list[dict], key: str, scale: float = 1.0) -> dict:
    values = [s[key] / scale for s in samples if key in s]
    if not values:
        return {"min": None, "max": None, "mean": None}
    return {"min": round(min(values), 1), "max": round(max(values), 1), "mean": round(sum(values) / len(values), 1)}
