"""The warm pool's sizing rule (worker/pool.py), sans-I/O: a table of inputs and the pool size."""

from __future__ import annotations

import pytest

from meshrt.shared.settings import SettingsError
from meshrt.shared.settings import load_settings
from meshrt.shared.settings import settings_env
from meshrt.worker.pool import ArrivalRate
from meshrt.worker.pool import RecentMedian
from meshrt.worker.pool import Smoothed
from meshrt.worker.pool import mem_available_bytes
from meshrt.worker.pool import pool_target
from meshrt.worker.pool import private_bytes
from meshrt.worker.pool import pss_bytes

MiB = 1024 * 1024
GiB = 1024 * MiB


@pytest.mark.parametrize(
    "rate, setup_s, mem_available, idle_cost, floor, ceiling, expected",
    [
        (0.0, 0.07, 8 * GiB, 6 * MiB, 2, 32, 2),  # nothing arriving: the floor
        (0.0, 0.07, 8 * GiB, 6 * MiB, 0, 32, 0),  # ... which may be none
        (0.5, 0.07, 8 * GiB, 6 * MiB, 0, 32, 1),  # anything arriving: one at least
        (1.0, 0.07, 8 * GiB, 6 * MiB, 2, 32, 2),  # 0.07 expected: ceil(0.07 + 3 × 0.26) = 1, the floor
        (20.0, 0.07, 8 * GiB, 6 * MiB, 2, 32, 5),  # 1.4 expected: ceil(1.4 + 3 × 1.18) = 5
        (100.0, 0.1, 8 * GiB, 6 * MiB, 2, 32, 20),  # 10 expected: ceil(10 + 3 × 3.16) = 20
        (100.0, 0.3, 8 * GiB, 6 * MiB, 2, 32, 32),  # 30 expected: 47, the ceiling
        (1000.0, 0.1, 8 * GiB, 6 * MiB, 2, 32, 32),  # the ceiling
        (100.0, 0.1, 64 * MiB, 6 * MiB, 2, 32, 2),  # a quarter of 64 MiB holds 2 idle workers
        (100.0, 0.1, 200 * MiB, 6 * MiB, 2, 32, 8),  # a quarter of 200 MiB holds 8
        (100.0, 0.1, 16 * MiB, 6 * MiB, 2, 32, 2),  # memory short: the floor still holds
        (100.0, 0.1, None, 6 * MiB, 2, 32, 20),  # memory unknown: no memory bound
        (100.0, 0.1, 8 * GiB, 0, 2, 32, 20),  # cost unknown: no memory bound
        (100.0, 0.1, 8 * GiB, 6 * MiB, 4, 4, 4),  # MESHRT_WARM_WORKERS=4: fixed
        (0.0, 0.1, 8 * GiB, 6 * MiB, 4, 4, 4),
        (500.0, 0.1, 8 * GiB, 6 * MiB, 0, 0, 0),  # MESHRT_WARM_WORKERS=0: fork per session
        (-1.0, -1.0, 8 * GiB, 6 * MiB, 1, 32, 1),  # nonsense in: the floor
    ],
)
def test_pool_target_table(rate, setup_s, mem_available, idle_cost, floor, ceiling, expected):
    assert pool_target(rate, setup_s, mem_available, idle_cost, floor, ceiling) == expected


def arrivals_at(rate: ArrivalRate, per_s: float, start: float, seconds: float) -> float:
    t, step = start, 1.0 / per_s
    while t < start + seconds:
        rate.arrived(t)
        t += step
    return start + seconds


def test_arrival_rate_rises_within_seconds_and_falls_over_a_minute():
    rate = ArrivalRate()
    assert rate.rate(0.0) == 0.0
    t = arrivals_at(rate, 1, 0.0, 60)
    assert 0.8 < rate.rate(t) < 1.3
    t = arrivals_at(rate, 20, t, 5)
    assert rate.rate(t) > 18  # 5 s into a step to 20/s: the fast average has it
    t = arrivals_at(rate, 1, t, 10)
    assert 3 < rate.rate(t) < 20  # 10 s after the step down: still falling (the slow average)
    t = arrivals_at(rate, 1, t, 120)
    assert 0.8 < rate.rate(t) < 1.3
    assert rate.rate(t + 600) < 0.01  # nothing for 10 min
    rate.arrived(t - 5)  # a clock that steps back counts, decays nothing
    assert rate.rate(t) >= 0


def test_recent_median_ignores_a_slow_sample():
    setup = RecentMedian(0.05, n=5)
    assert setup.value == 0.05
    for sample in (0.010, 0.012, 0.400, 0.011, 0.013):
        setup.add(sample)
    assert setup.value == 0.012
    for _ in range(5):
        setup.add(0.2)
    assert setup.value == 0.2 and len(setup.samples) == 5


def test_smoothed_follows_its_samples():
    setup = Smoothed(0.05)
    for _ in range(50):
        setup.add(0.2)
    assert setup.value == pytest.approx(0.2, rel=1e-3)


def test_proc_parsers():
    rollup = b"55e7-7ffe ---p 00000000 00:00 0  [rollup]\nRss:   9000 kB\nPss:   5026 kB\nPss_Anon:  3000 kB\n"
    assert pss_bytes(rollup) == 5026 * 1024
    assert pss_bytes(b"") is None
    assert private_bytes(rollup + b"Private_Clean:  100 kB\nPrivate_Dirty:  2900 kB\n") == 3000 * 1024
    assert private_bytes(b"") is None
    meminfo = b"MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n"
    assert mem_available_bytes(meminfo) == 8000000 * 1024
    assert mem_available_bytes(b"MemTotal: 1 kB\n") is None


def test_pool_settings():
    sized = load_settings({})
    assert sized.warm_workers is None and sized.warm_pool_bounds == (2, 32)
    assert "MESHRT_WARM_WORKERS" not in settings_env(sized)  # unset stays unset in the front door
    assert load_settings(settings_env(sized)).warm_pool_bounds == (2, 32)
    bounded = load_settings({"MESHRT_WARM_WORKERS_MIN": "1", "MESHRT_WARM_WORKERS_MAX": "8"})
    assert bounded.warm_pool_bounds == (1, 8)
    fixed = load_settings({"MESHRT_WARM_WORKERS": "3", "MESHRT_WARM_WORKERS_MAX": "8"})
    assert fixed.warm_pool_bounds == (3, 3)  # the fixed pool wins
    assert load_settings(settings_env(fixed)).warm_pool_bounds == (3, 3)
    with pytest.raises(SettingsError, match="MESHRT_WARM_WORKERS_MIN"):
        load_settings({"MESHRT_WARM_WORKERS_MIN": "9", "MESHRT_WARM_WORKERS_MAX": "8"})
