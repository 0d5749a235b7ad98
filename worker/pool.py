"""How many idle workers the zygote keeps forked ahead: the sizing rule, sans-I/O.

The pool must cover the sessions that arrive while a worker it handed out is being replaced
(fork, rehearsal, the refill delay: `setup_s`, measured). Arrivals are taken as Poisson at the
measured rate, so the pool is the expected arrivals in that time plus `BURST_Z` standard
deviations (the burst allowance), rounded up. Idle workers may take at most `MEMORY_SHARE` of the node's available
memory (MemAvailable, at what each costs: its private pages, measured). The result is clamped between the floor and
the ceiling (MESHRT_WARM_WORKERS_MIN / _MAX); the floor wins over the memory bound.

The zygote does the I/O (the clock, /proc/meminfo, its workers' smaps_rollup) and calls these.
"""

from __future__ import annotations

import math

BURST_Z = 3.0  # standard deviations of Poisson arrivals covered: the pool runs dry in ~0.1 % of windows
MEMORY_SHARE = 0.25  # idle workers take at most this share of MemAvailable
FAST_TAU_S = 2.0  # the rate rises within seconds of a step up...
SLOW_TAU_S = 30.0  # ...and falls over a minute: retired workers would have to be forked again


def pool_target(
    rate: float, setup_s: float, mem_available: int | None, idle_cost: int, floor: int, ceiling: int
) -> int:
    """The idle workers to keep: `rate` sessions/s arriving, `setup_s` to replace one handed
    out, `mem_available` bytes (None: unknown, no memory bound), `idle_cost` bytes per idle worker."""
    expected = max(0.0, rate) * max(0.0, setup_s)
    demand = math.ceil(expected + BURST_Z * math.sqrt(expected))
    if mem_available is not None and idle_cost > 0:
        demand = min(demand, int(mem_available * MEMORY_SHARE) // idle_cost)
    return max(floor, min(ceiling, demand))


class ArrivalRate:
    """Sessions per second, as two exponentially weighted moving averages (time constants
    FAST_TAU_S and SLOW_TAU_S) of the arrivals; the estimate is the larger: quick to rise, slow to
    fall. Times are the caller's monotonic clock, in seconds."""

    def __init__(self, fast_tau_s: float = FAST_TAU_S, slow_tau_s: float = SLOW_TAU_S):
        self.taus = (fast_tau_s, slow_tau_s)
        self.values = [0.0, 0.0]
        self.at: float | None = None

    def _decay(self, now: float) -> None:
        if self.at is not None and now > self.at:
            for i, tau in enumerate(self.taus):
                self.values[i] *= math.exp(-(now - self.at) / tau)
        if self.at is None or now > self.at:
            self.at = now

    def arrived(self, now: float, count: int = 1) -> None:
        self._decay(now)
        for i, tau in enumerate(self.taus):
            self.values[i] += count / tau

    def rate(self, now: float) -> float:
        self._decay(now)
        return max(self.values)


class RecentMedian:
    """The median of the last `n` samples (a worker's fork and rehearsal): one slow sample, a
    rehearsal that shared the CPU with a burst of sessions, does not move it."""

    def __init__(self, initial: float, n: int = 15):
        self.initial, self.n = initial, n
        self.samples: list[float] = []

    def add(self, sample: float) -> None:
        self.samples = [*self.samples[-(self.n - 1) :], sample]

    @property
    def value(self) -> float:
        if not self.samples:
            return self.initial
        ordered = sorted(self.samples)
        return ordered[len(ordered) // 2]


class Smoothed:
    """An exponentially weighted mean of samples (a worker's set-up time, an idle worker's PSS)."""

    def __init__(self, initial: float, weight: float = 0.2):
        self.value, self.weight = initial, weight

    def add(self, sample: float) -> None:
        self.value += self.weight * (sample - self.value)


def pss_bytes(smaps_rollup: bytes) -> int | None:
    """The `Pss:` line of /proc/<pid>/smaps_rollup, in bytes (None: not there, e.g. the process is gone)."""
    for line in smaps_rollup.splitlines():
        if line.startswith(b"Pss:"):
            return int(line.split()[1]) * 1024
    return None


def private_bytes(smaps_rollup: bytes) -> int | None:
    """Private_Clean + Private_Dirty of smaps_rollup, in bytes: what one more such process costs
    (its PSS also carries a share of the pages it shares with the zygote and its siblings)."""
    found = [int(line.split()[1]) * 1024 for line in smaps_rollup.splitlines() if line.startswith(b"Private_")]
    return sum(found) if found else None


def mem_available_bytes(meminfo: bytes) -> int | None:
    """`MemAvailable:` of /proc/meminfo, in bytes."""
    for line in meminfo.splitlines():
        if line.startswith(b"MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None
