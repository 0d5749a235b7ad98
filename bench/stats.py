"""Percentiles and the direct-vs-gateway comparison every measurement reports."""

from __future__ import annotations

import math


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: list[float], digits: int = 1) -> dict:
    ordered = sorted(values)
    out = {f"p{p}": round(percentile(ordered, p), digits) for p in (50, 90, 99)}
    out.update(
        mean=round(sum(ordered) / len(ordered), digits),
        min=round(ordered[0], digits),
        max=round(ordered[-1], digits),
        n=len(ordered),
    )
    return out


def compare(direct: list[float], gateway: list[float], digits: int = 1) -> dict:
    """Direct and gateway distributions, the added cost at each percentile, and the ratio."""
    d, g = summary(direct, digits), summary(gateway, digits)
    return {
        "direct": d,
        "gateway": g,
        "added": {p: round(g[p] - d[p], digits) for p in ("p50", "p90", "p99")},
        "ratio": {p: round(g[p] / d[p], 2) if d[p] > 0 else None for p in ("p50", "p99")},
    }
