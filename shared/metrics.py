"""Prometheus metrics. The supervisor counts (it sees every session's life and money) and
publishes a snapshot file in its run dir once a second; the front door serves it at /metrics.
Labels are codes and end reasons only — never keys, ids or anything a tenant typed."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

HELP = {
    "meshrt_live_sessions": ("gauge", "Sessions with a live worker on this node."),
    "meshrt_max_sessions": ("gauge", "Sessions this node takes at most (MESHRT_MAX_SESSIONS); /readyz is 503 at it."),
    "meshrt_warm_workers": ("gauge", "Idle workers forked ahead (the warm pool) now."),
    "meshrt_warm_workers_target": (
        "gauge",
        "The warm pool's size as sized from arrivals, set-up time and memory (MESHRT_WARM_WORKERS_MIN..MAX).",
    ),
    "meshrt_workers": ("gauge", "Workers whose memory is counted: idle ones and those running a session."),
    "meshrt_workers_pss_bytes": (
        "gauge",
        "Proportional set size summed over the workers (pages shared with the zygote divided among their sharers).",
    ),
    "meshrt_warm_workers_pss_bytes": ("gauge", "Of meshrt_workers_pss_bytes, the idle workers'."),
    "meshrt_workers_memory_read_seconds": (
        "gauge",
        "What the zygote's last reading of every worker's smaps_rollup took (every 5 s).",
    ),
    "meshrt_session_arrival_rate": ("gauge", "Sessions per second reaching the zygote, as the pool is sized for."),
    "meshrt_warm_worker_setup_seconds": ("gauge", "A pool worker's fork and rehearsal, as measured (smoothed)."),
    "meshrt_memory_available_bytes": (
        "gauge",
        "MemAvailable, or the room under the cgroup's memory.max if less; -1 unknown.",
    ),
    "meshrt_sessions_from_pool_total": (
        "counter",
        "Sessions handed to an idle pool worker (since the zygote started).",
    ),
    "meshrt_sessions_forked_total": (
        "counter",
        "Sessions that found the warm pool empty and waited for a fork (since the zygote started).",
    ),
    "meshrt_sessions_started_total": ("counter", "Sessions handed to a worker."),
    "meshrt_sessions_ended_total": ("counter", "Sessions finalised, by end reason."),
    "meshrt_handoffs_refused_total": ("counter", "Upgrades the supervisor refused, by error code."),
    "meshrt_usage_increments_total": ("counter", "Usage increments applied to balances."),
    "meshrt_reservations_total": (
        "counter",
        "Reservations for responses, by outcome: granted, insufficient_quota, service_unavailable.",
    ),
    "meshrt_usage_cost_usd_total": ("counter", "USD debited for usage (exact decimal)."),
    "meshrt_worker_crashes_total": ("counter", "Workers that exited without reporting their end."),
    "meshrt_control_version_refused_total": (
        "counter",
        "Control messages of another protocol version refused (workers of another release re-attaching).",
    ),
    "meshrt_nodes_reaped_total": ("counter", "Other nodes this one declared lost (their lease expired)."),
}


class Metrics:
    def __init__(self):
        self.counters: dict[str, dict[tuple, int]] = defaultdict(lambda: defaultdict(int))
        self.gauges: dict[str, int] = {}

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        self.counters[name][tuple(sorted(labels.items()))] += amount

    def snapshot(self) -> dict:
        return {
            "counters": {name: [[dict(k), v] for k, v in series.items()] for name, series in self.counters.items()},
            "gauges": dict(self.gauges),
        }

    def publish(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, path)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


def render(snapshot: dict) -> str:
    """The Prometheus text exposition of a published snapshot."""
    from meshrt.shared.money import Money

    lines = []
    gauges, counters = snapshot.get("gauges", {}), snapshot.get("counters", {})
    for name, (kind, text) in HELP.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        if kind == "gauge":
            lines.append(f"{name} {gauges.get(name, 0)}")
            continue
        series = counters.get(name.replace("_usd_", "_picodollars_"), []) if "usd" in name else counters.get(name, [])
        if not series:
            lines.append(f"{name} 0")
        for labels, value in series:
            shown = Money(value).usd_str() if "usd" in name else value
            lines.append(f"{name}{_labels(labels)} {shown}")
    return "\n".join(lines) + "\n"
